"""Auxiliary deployment: preference summary -> soft thoughts, with an LRU cache per checkpoint version.

The checkpoint comes from the application args and can be replaced live through `user_config`
({"checkpoint": DIR}); a checkpoint that does not fit the backbone is refused and the loaded one stays.
"""

from __future__ import annotations

import asyncio
import logging
import time

import torch
from ray import serve

from ..aux_model import CheckpointError, SoftThoughtAux
from ..thought_cache import ThoughtCache
from .rollout import load_checkpoint

log = logging.getLogger("softthought.aux")


def _encode(model: SoftThoughtAux, summary: str):
    with torch.inference_mode():
        return model.encode([summary])[0].numpy()


@serve.deployment(name="Aux", max_ongoing_requests=64)
class AuxDeployment:
    async def __init__(self, backbone, checkpoint: str | None = None, cache_size: int = 4096, threads: int = 1) -> None:
        torch.set_num_threads(threads)
        self._backbone_info = await backbone.info.remote()
        self.cache = ThoughtCache(cache_size)
        self.model: SoftThoughtAux | None = None
        self.checkpoint: str | None = None
        self.last_error: str | None = None
        if checkpoint:
            self.model, self.checkpoint = await asyncio.to_thread(load_checkpoint, checkpoint, self._backbone_info), checkpoint

    async def reconfigure(self, user_config: dict) -> None:
        path = (user_config or {}).get("checkpoint")
        if not path:
            return
        try:
            model = await asyncio.to_thread(load_checkpoint, path, self._backbone_info)
        except (CheckpointError, OSError) as exc:
            self.last_error = f"refused checkpoint {path}: {exc}"
            log.error(self.last_error)
            return
        if self.model is None or model.version != self.model.version:
            log.info("auxiliary checkpoint %s (version %s) is live", path, model.version)
        self.model, self.checkpoint, self.last_error = model, path, None

    def info(self) -> dict:
        m = self.model
        return {
            "checkpoint": self.checkpoint,
            "version": m.version if m else None,
            "num_thoughts": m.config.total_thoughts if m else None,  # the positions the backbone reads
            "copy_thoughts": m.config.copy_thoughts if m else None,
            "thoughts_seen_by": m.config.thoughts_seen_by if m else None,
            "thoughts_at": m.config.thoughts_at if m else None,
            "guidance": m.config.guidance if m else None,
            "guidance_gate": m.config.guidance_gate if m else None,
            "cached": len(self.cache),
            "last_error": self.last_error,
        }

    async def thoughts(self, summary: str) -> dict:
        model = self.model  # one version for the whole request, even if a rollout swaps it meanwhile
        if model is None:
            return {"error": "no auxiliary checkpoint is loaded, so preference summaries cannot be used"}
        start = time.perf_counter()
        thoughts = self.cache.get(model.version, summary)
        hit = thoughts is not None
        if not hit:
            thoughts = await asyncio.to_thread(_encode, model, summary)
            self.cache.put(model.version, summary, thoughts)
        return {"thoughts": thoughts, "placement": model.placement, "guidance": model.config.guidance,
                "guidance_gate": model.config.guidance_gate,
                "version": model.version, "cache_hit": hit, "latency_s": time.perf_counter() - start}
