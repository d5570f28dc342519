"""Application builder named by Serve config files: `import_path: softthought.server.app:build_app`."""

from __future__ import annotations

from pathlib import Path

from ray.serve import Application

from ..aux_model import read_config
from .aux_deployment import AuxDeployment
from .backbone_deployment import BackboneDeployment
from .config import ServerConfig
from .ingress import Ingress


def backbone_options(config: ServerConfig) -> dict:
    """Deployment options the settings imply: with tensor parallelism, vLLM's workers, one per GPU, in one placement
    group packed on one node (the replica itself takes no GPU)."""
    if config.tensor_parallel_size == 1:
        return {}
    return {"ray_actor_options": {"num_cpus": 1, "num_gpus": 0},
            "placement_group_bundles": [{"CPU": 1}] + [{"GPU": 1, "CPU": 1}] * config.tensor_parallel_size,
            "placement_group_strategy": "STRICT_PACK"}


def engine_for(config: ServerConfig) -> str:
    """The configured engine; for "auto", not vLLM when the checkpoint hides its thoughts with a mask or guides its
    replies, which vLLM cannot (the reference engine serves it as measured)."""
    checkpoint = config.resolved_aux_checkpoint()
    if config.engine == "auto" and checkpoint:
        aux = read_config(Path(checkpoint))
        if aux.placement.reply_only or aux.guidance != 1:
            return "hf"
    return config.engine


def build_app(args: dict) -> Application:
    config = ServerConfig.model_validate(args or {})
    backbone = BackboneDeployment.options(**backbone_options(config)).bind(
        backbone=config.backbone, dtype=config.dtype, max_batch_size=config.max_batch_size,
        max_prompt_tokens=config.max_prompt_tokens, threads=config.backbone_threads, device=config.device,
        engine=engine_for(config), max_tokens=config.max_tokens_limit, tensor_parallel_size=config.tensor_parallel_size,
        gpu_memory_utilization=config.gpu_memory_utilization, kv_cache_gib=config.kv_cache_gib,
        enforce_eager=config.enforce_eager,
    )
    aux = AuxDeployment.bind(
        backbone, checkpoint=config.resolved_aux_checkpoint(), cache_size=config.thought_cache_size,
        threads=config.aux_threads,
    )
    return Ingress.bind(aux, backbone, config.model_dump())
