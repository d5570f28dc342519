"""The vLLM serving engine: vLLM's AsyncLLM (V1) reading our prompts as token ids with the thoughts' rows given
as embeddings, prefix caching on.

A prompt without thoughts goes in as token ids. One with thoughts goes in as vLLM's mixed prompt: every position's
token id, the thoughts' positions marked as embeddings (`prompt_is_token_ids`) with their rows in `prompt_embeds`.
vLLM hashes the embedding rows into the prefix cache's block keys, so thoughts placed at the end of the prompt
(`splice.Placement.at_end`) leave every earlier block shared between users. vLLM has no per-request attention mask:
a prompt whose thoughts must be hidden from its own text (`Prompt.reply_only`) is refused, never served otherwise.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator

import torch

from .backbone import EMBEDDED_BACKBONE, eos_ids, files_fingerprint, longest_token_chars, resolve_backbone_path
from .engine import EngineSpec, ServingEngine
from .generation import SamplingParams
from .splice import Prompt

log = logging.getLogger("softthought.engine")

#: A placeholder id at the thoughts' positions: vLLM reads their rows from prompt_embeds instead.
_THOUGHT_ID = 0


class VllmEngine(ServingEngine):
    kind = "vllm"

    def __init__(self, spec: EngineSpec) -> None:
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        path = resolve_backbone_path(spec.backbone)
        started = time.perf_counter()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
        try:
            generation_config = GenerationConfig.from_pretrained(path)
        except OSError:  # a model directory without generation_config.json
            generation_config = None
        self._eos = sorted(eos_ids(generation_config, self.tokenizer))
        self._info = {
            "name": spec.backbone or EMBEDDED_BACKBONE,
            "fingerprint": files_fingerprint(path),
            "hidden_size": config.get_text_config().hidden_size,
            "max_context": int(getattr(config.get_text_config(), "max_position_embeddings", 2048)),
            "max_token_chars": longest_token_chars(self.tokenizer),
            "dtype": spec.dtype,
            "engine": self.kind,
        }
        self._dtype = getattr(torch, spec.dtype)  # vLLM casts the rows to the model's dtype: send no more than that
        self.llm = _start_vllm(path, spec, self._info["max_context"])
        self._info["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        log.info("vLLM engine started in %.1f s", time.perf_counter() - started)

    def info(self) -> dict:
        return dict(self._info)

    def check(self, prompt: Prompt) -> None:
        if prompt.hidden_thoughts() is not None:
            raise ValueError("this checkpoint hides its thoughts from the prompt with an attention mask, which the "
                             "vLLM engine cannot apply: serve it with engine 'hf', or use a checkpoint with "
                             "thoughts_at: end")
        if prompt.guide is not None:
            raise ValueError("guidance on the thoughts needs engine 'hf' (it decodes a guide sequence beside each reply)")

    async def generate(self, prompt: Prompt, params: SamplingParams, request_id: str,
                       stream: bool = True) -> AsyncIterator[dict]:
        self.check(prompt)
        inputs, sampling = self._inputs(prompt), self._sampling(params)
        added = time.perf_counter()
        outputs = self.llm.generate(inputs, sampling, request_id)
        try:
            yield {"prompt_tokens": prompt.num_tokens}
            first_at, tokens, pending = None, 0, {"delta": "", "batch_sizes": []}
            async for out in outputs:
                done = out.outputs[0]
                first_at = first_at or time.perf_counter()
                tokens += len(done.token_ids)
                pending["delta"] += done.text
                pending["batch_sizes"].append(self.unfinished())  # the requests in flight: about the batch it ran in
                if out.finished:
                    pending.update(finish_reason="length" if done.finish_reason == "length" else "stop",
                                   completion_tokens=tokens, prompt_tokens=prompt.num_tokens, ttft_s=first_at - added)
                if stream or out.finished:
                    yield pending
                    pending = {"delta": "", "batch_sizes": []}
        except Exception:  # vLLM's engine died or refused the request after admission: no client waits forever
            log.exception("vLLM failed on request %s", request_id)
            yield {"delta": "", "batch_sizes": [], "finish_reason": "error", "error": "the backbone failed on this request"}
        finally:
            await outputs.aclose()  # aborts the request in vLLM if it is still running

    def unfinished(self) -> int:
        return self.llm.get_num_unfinished_requests()

    def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:  # shut down now, not from its __del__ at interpreter exit, when vLLM's modules are gone
            llm.shutdown()

    def _inputs(self, prompt: Prompt) -> dict:
        if not prompt.num_thoughts:
            return {"prompt_token_ids": prompt.token_ids}
        ids, is_token, rows = [], [], []
        for seg in prompt.segments:
            if isinstance(seg, torch.Tensor):
                ids += [_THOUGHT_ID] * seg.shape[0]
                is_token += [False] * seg.shape[0]
                rows.append(seg.to(self._dtype))
            else:
                ids += seg
                is_token += [True] * len(seg)
                rows.append(torch.zeros(len(seg), self._info["hidden_size"], dtype=self._dtype))  # unread: vLLM embeds ids
        return {"prompt_token_ids": ids, "prompt_is_token_ids": is_token, "prompt_embeds": torch.cat(rows)}

    def _sampling(self, params: SamplingParams):
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind

        return VllmSamplingParams(
            max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p, seed=params.seed,
            presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
            stop=list(params.stop), ignore_eos=params.ignore_eos, stop_token_ids=[] if params.ignore_eos else self._eos,
            output_kind=RequestOutputKind.DELTA, skip_special_tokens=True,
        )


def _start_vllm(path: str, spec: EngineSpec, max_context: int):
    from vllm import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    on_gpu = torch.cuda.is_available()
    if not on_gpu:  # the CPU build's OpenMP workers: every core this replica was given, not all but one
        cores = spec.threads or os.cpu_count() or 1
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}")
    args = AsyncEngineArgs(
        model=path, tokenizer=path, dtype=spec.dtype, enable_prompt_embeds=True, enable_prefix_caching=True,
        max_model_len=min(max_context, spec.max_prompt_tokens + spec.max_tokens), max_num_seqs=spec.max_batch_size,
        tensor_parallel_size=spec.tensor_parallel_size, enforce_eager=spec.enforce_eager,
        generation_config="vllm",  # sampling is what the request says, not the model's generation defaults
        disable_log_stats=True,
        **({"gpu_memory_utilization": spec.gpu_memory_utilization} if on_gpu
           else {"kv_cache_memory_bytes": int(spec.kv_cache_gib * (1 << 30))}),
        **({"distributed_executor_backend": "ray"} if spec.tensor_parallel_size > 1 else {}),
    )
    return AsyncLLM.from_engine_args(args)
