"""Application builder named by Serve config files: `import_path: softthought.server.app:build_app`."""

from __future__ import annotations

from ray.serve import Application

from .aux_deployment import AuxDeployment
from .backbone_deployment import BackboneDeployment
from .config import ServerConfig
from .ingress import Ingress


def build_app(args: dict) -> Application:
    config = ServerConfig.model_validate(args or {})
    backbone = BackboneDeployment.bind(
        backbone=config.backbone, dtype=config.dtype, max_batch_size=config.max_batch_size,
        max_prompt_tokens=config.max_prompt_tokens, threads=config.backbone_threads, device=config.device,
    )
    aux = AuxDeployment.bind(
        backbone, checkpoint=config.resolved_aux_checkpoint(), cache_size=config.thought_cache_size,
        threads=config.aux_threads,
    )
    return Ingress.bind(aux, backbone, config.model_dump())
