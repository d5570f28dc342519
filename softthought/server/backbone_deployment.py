"""Backbone deployment: one serving engine per replica (`engine.make_engine`), fed by concurrent requests of any
users."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import torch
from ray import serve

from ..engine import EngineSpec, make_engine
from ..generation import SamplingParams
from ..splice import OPENING, PromptError, build_chat_prompt, build_text_prompt


@serve.deployment(name="Backbone", max_ongoing_requests=64)
class BackboneDeployment:
    def __init__(self, backbone: str | None = None, dtype: str = "bfloat16", max_batch_size: int = 16,
                 max_prompt_tokens: int = 4096, threads: int | None = None, device: str = "auto", engine: str = "hf",
                 **engine_options) -> None:
        self.max_prompt_tokens = max_prompt_tokens
        self.engine = make_engine(engine, EngineSpec(backbone=backbone, dtype=dtype, device=device, threads=threads,
                                                     max_batch_size=max_batch_size, max_prompt_tokens=max_prompt_tokens,
                                                     **engine_options))

    def info(self) -> dict:
        return self.engine.info()

    async def generate(self, request: dict) -> AsyncIterator[dict]:
        """Stream of dicts: first {"error"} or {"prompt_tokens"}, then the engine's items (`ServingEngine.generate`).

        Tokens already produced are coalesced into one item, and a non-streaming request ("stream": false) gets
        only the final item: per-token messages through Ray would cost the cores the matmuls need.
        """
        outputs = None
        try:
            thoughts = request.get("thoughts")
            thoughts = None if thoughts is None else torch.from_numpy(np.asarray(thoughts))
            tok = self.engine.tokenizer
            placement = request.get("placement", OPENING)
            guidance = request.get("guidance", 1.0)  # the checkpoint's: the plain prompt guides the reply
            # tokenized off the event loop: a long prompt must not hold up every other request's stream
            if request["kind"] == "chat":
                prompt = await asyncio.to_thread(build_chat_prompt, tok, request["messages"], thoughts,
                                                 placement=placement, guided=guidance != 1)
            else:
                prompt = await asyncio.to_thread(build_text_prompt, tok, request["prompt"], thoughts,
                                                 placement=placement, guided=guidance != 1)
            if prompt.num_tokens > self.max_prompt_tokens:
                raise PromptError(f"the prompt is {prompt.num_tokens} tokens long; the limit is {self.max_prompt_tokens}")
            params = SamplingParams(**request["params"], guidance=guidance, guidance_gate=request.get("guidance_gate", 0.0))
            outputs = self.engine.generate(prompt, params, request["request_id"], request.get("stream", True))
            first = await anext(outputs)
        except (PromptError, ValueError) as exc:
            yield {"error": str(exc)}
            return
        try:
            yield first
            async for item in outputs:
                yield item
        finally:
            await outputs.aclose()  # the client went away: the engine frees the batch slot
