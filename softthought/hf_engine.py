"""The reference serving engine: `generation.Engine` (our transformers loop) on a thread of its own, behind the
asynchronous `engine.ServingEngine` interface."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from .backbone import load_backbone, longest_token_chars, resolve_device
from .engine import EngineSpec, ServingEngine
from .generation import Engine, SamplingParams
from .splice import Prompt

log = logging.getLogger("softthought.engine")


@dataclass
class _Subscriber:
    """Where a request's engine outputs go: its event loop and queue."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    stream: bool
    held: dict | None = None  # non-streaming: what the engine produced so far, handed over at the end
    first_token_at: float | None = None


class HFEngine(ServingEngine):
    kind = "hf"

    def __init__(self, spec: EngineSpec) -> None:
        # Ray sets OMP_NUM_THREADS to the actor's num_cpus; the engine should use the cores it was given.
        self._threads = spec.threads or os.cpu_count() or 1
        device = resolve_device(spec.device)  # a replica placed with num_gpus sees its GPU through CUDA_VISIBLE_DEVICES
        self._subscribers: dict[str, _Subscriber] = {}
        self._wake = threading.Event()
        self._stopped = False
        # Every parallel torch op of this process runs on the engine thread, loading included. libgomp keeps one
        # worker pool per calling thread and throttles spin-waiting to 100 spins once its pools hold more threads
        # than there are cores: a second pool (say, from loading on this thread) makes each of the decoder's
        # small ops wait on a futex wake-up, and decoding ran 30-40% slower on 2 cores.
        loaded: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(spec, device, loaded), name="engine", daemon=True)
        self._thread.start()
        loaded.result()

    def info(self) -> dict:
        return {
            "name": self.backbone.name,
            "fingerprint": self.backbone.fingerprint,
            "hidden_size": self.backbone.hidden_size,
            "max_context": self.backbone.max_context,
            "max_token_chars": self.max_token_chars,
            "dtype": str(self.backbone.dtype).removeprefix("torch."),
            "device": str(self.backbone.device),
            "engine": self.kind,
        }

    async def generate(self, prompt: Prompt, params: SamplingParams, request_id: str,
                       stream: bool = True) -> AsyncIterator[dict]:
        sub = self._subscribers[request_id] = _Subscriber(asyncio.get_running_loop(), asyncio.Queue(), stream)
        added = time.perf_counter()
        try:
            self.engine.add(prompt, params, request_id)
        except ValueError:
            self._subscribers.pop(request_id, None)
            raise
        self._wake.set()
        finished = False
        try:
            yield {"prompt_tokens": prompt.num_tokens}
            first_at, pending = None, {"delta": "", "batch_sizes": []}
            while not finished:
                items = [await sub.queue.get()]
                while not sub.queue.empty():
                    items.append(sub.queue.get_nowait())
                for item in items:
                    at = item.pop("first_token_at")
                    first_at = first_at or at
                    pending["delta"] += item.pop("delta")
                    pending["batch_sizes"] += item.pop("batch_sizes")
                    pending.update(item)
                finished = "finish_reason" in pending
                if finished:
                    pending["ttft_s"] = first_at - added
                yield pending
                pending = {"delta": "", "batch_sizes": []}
        finally:
            self._subscribers.pop(request_id, None)
            if not finished:  # the client went away: free the batch slot
                self.engine.abort(request_id)

    def unfinished(self) -> int:
        return self.engine.num_unfinished()

    def close(self) -> None:
        # joined, not left to die with the interpreter: a thread still inside torch when the process exits aborts it
        # ("terminate called without an active exception")
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=60)

    def _run(self, spec: EngineSpec, device: str, loaded: Future) -> None:
        # OpenMP's thread count is per thread: without this the engine thread keeps Ray's OMP_NUM_THREADS.
        torch.set_num_threads(self._threads)
        try:
            self.backbone = load_backbone(spec.backbone, dtype=spec.dtype, device=device)
            self.tokenizer = self.backbone.tokenizer
            self.max_token_chars = longest_token_chars(self.backbone.tokenizer)
            self.engine = Engine(self.backbone, max_batch_size=spec.max_batch_size)
        except BaseException as exc:  # the constructor re-raises it, so Serve reports the replica as failed
            loaded.set_exception(exc)
            return
        loaded.set_result(None)
        while not self._stopped:
            self._wake.wait()
            self._wake.clear()  # cleared before looking for work, so an add() after this is never missed
            while self.engine.has_work():
                try:
                    outputs = self.engine.step()
                except Exception:  # a broken step must not leave clients waiting forever
                    log.exception("engine step failed; failing the running requests")
                    self._fail_all()
                    break
                now = time.perf_counter()
                for out in outputs:
                    item = {"delta": out.delta, "batch_sizes": [len(outputs)], "at": now}
                    if out.finished:
                        r = out.result
                        item.update(finish_reason=r.finish_reason, completion_tokens=r.completion_tokens,
                                    prompt_tokens=r.prompt_tokens)
                    self._publish(out.request_id, item)

    def _publish(self, request_id: str, item: dict) -> None:
        """Hand an engine output to its request's event loop: every step for a stream; for a non-streaming request,
        which only needs the result, once at the end (the engine thread gathers the steps in between)."""
        sub = self._subscribers.get(request_id)
        if sub is None:
            return
        at = item.pop("at", time.perf_counter())
        sub.first_token_at = sub.first_token_at or at
        if sub.held is not None:
            item = {**item, "delta": sub.held["delta"] + item["delta"], "batch_sizes": sub.held["batch_sizes"] + item["batch_sizes"]}
            sub.held = None
        if not sub.stream and "finish_reason" not in item:
            sub.held = item
            return
        sub.loop.call_soon_threadsafe(sub.queue.put_nowait, {**item, "first_token_at": sub.first_token_at})

    def _fail_all(self) -> None:
        self.engine = Engine(self.backbone, max_batch_size=self.engine.max_batch_size)
        for rid in list(self._subscribers):
            self._publish(rid, {"delta": "", "batch_sizes": [], "finish_reason": "error", "error": "the backbone failed on this batch"})
