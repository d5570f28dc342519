"""Backbone deployment: one continuous-batching engine per replica, fed by concurrent requests of any users."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator

import numpy as np
import torch
from ray import serve

from ..backbone import load_backbone
from ..generation import Engine, SamplingParams
from ..splice import PromptError, build_chat_prompt, build_text_prompt

log = logging.getLogger("softthought.backbone")


@serve.deployment(name="Backbone", max_ongoing_requests=64)
class BackboneDeployment:
    def __init__(self, backbone: str | None = None, dtype: str = "bfloat16", max_batch_size: int = 16,
                 max_prompt_tokens: int = 4096, threads: int | None = None, device: str = "auto") -> None:
        # Ray sets OMP_NUM_THREADS to the actor's num_cpus; the engine should use the cores it was given.
        self._threads = threads or os.cpu_count() or 1
        torch.set_num_threads(self._threads)
        if device == "auto":  # a replica placed with num_gpus sees its GPU through CUDA_VISIBLE_DEVICES
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.backbone = load_backbone(backbone, dtype=dtype, device=device)
        self.max_prompt_tokens = max_prompt_tokens
        self.engine = Engine(self.backbone, max_batch_size=max_batch_size)
        self._subscribers: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        threading.Thread(target=self._run_engine, name="engine", daemon=True).start()

    def info(self) -> dict:
        return {
            "name": self.backbone.name,
            "fingerprint": self.backbone.fingerprint,
            "hidden_size": self.backbone.hidden_size,
            "max_context": self.backbone.max_context,
            "dtype": str(self.backbone.dtype).removeprefix("torch."),
            "device": str(self.backbone.device),
        }

    async def generate(self, request: dict) -> AsyncIterator[dict]:
        """Stream of dicts: first {"error"} or {"prompt_tokens"}, then {"delta", "batch_sizes", ...} items; the last
        one has "finish_reason", "completion_tokens" and "ttft_s" (engine admission to first token).

        Tokens already produced are coalesced into one item, and a non-streaming request ("stream": false) gets
        only the final item: per-token messages through Ray would cost the cores the matmuls need.
        """
        try:
            thoughts = request.get("thoughts")
            thoughts = None if thoughts is None else torch.from_numpy(np.asarray(thoughts))
            tok = self.backbone.tokenizer
            if request["kind"] == "chat":
                prompt = build_chat_prompt(tok, request["messages"], thoughts)
            else:
                prompt = build_text_prompt(tok, request["prompt"], thoughts)
            if prompt.num_tokens > self.max_prompt_tokens:
                raise PromptError(f"the prompt is {prompt.num_tokens} tokens long; the limit is {self.max_prompt_tokens}")
            params = SamplingParams(**request["params"])
            queue: asyncio.Queue = asyncio.Queue()
            rid = request["request_id"]
            self._subscribers[rid] = (asyncio.get_running_loop(), queue)
            self.engine.add(prompt, params, rid)
        except (PromptError, ValueError) as exc:
            self._subscribers.pop(request.get("request_id"), None)
            yield {"error": str(exc)}
            return
        self._wake.set()
        added = time.perf_counter()
        yield {"prompt_tokens": prompt.num_tokens}
        stream = request.get("stream", True)
        finished, first, pending = False, None, {"delta": "", "batch_sizes": []}
        try:
            while not finished:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                first = first or time.perf_counter()
                for item in items:
                    pending["delta"] += item.pop("delta")
                    pending["batch_sizes"].append(item.pop("batch_size"))
                    pending.update(item)
                finished = "finish_reason" in pending
                if finished:
                    pending["ttft_s"] = first - added
                if finished or stream:
                    yield pending
                    pending = {"delta": "", "batch_sizes": []}
        finally:
            self._subscribers.pop(rid, None)
            if not finished:  # the client went away: free the batch slot
                self.engine.abort(rid)

    def _run_engine(self) -> None:
        # OpenMP's thread count is per thread: without this the engine thread keeps Ray's OMP_NUM_THREADS.
        torch.set_num_threads(self._threads)
        while True:
            self._wake.wait()
            self._wake.clear()  # cleared before looking for work, so an add() after this is never missed
            while self.engine.has_work():
                try:
                    outputs = self.engine.step()
                except Exception:  # a broken step must not leave clients waiting forever
                    log.exception("engine step failed; failing the running requests")
                    self._fail_all()
                    break
                for out in outputs:
                    item = {"delta": out.delta, "batch_size": len(outputs)}
                    if out.finished:
                        r = out.result
                        item.update(finish_reason=r.finish_reason, completion_tokens=r.completion_tokens,
                                    prompt_tokens=r.prompt_tokens)
                    self._publish(out.request_id, item)

    def _publish(self, request_id: str, item: dict) -> None:
        sub = self._subscribers.get(request_id)
        if sub is not None:
            loop, queue = sub
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def _fail_all(self) -> None:
        self.engine = Engine(self.backbone, max_batch_size=self.engine.max_batch_size)
        for rid in list(self._subscribers):
            self._publish(rid, {"delta": "", "batch_size": 0, "finish_reason": "error", "error": "the backbone failed on this batch"})
