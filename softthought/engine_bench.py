"""`softthought bench --engine hf --engine vllm`: the backbone engines side by side, in one run.

Each engine is started in this process (vLLM's core in its child process), measured through the
`engine.ServingEngine` interface the Backbone deployment uses, and closed before the next starts: single stream,
concurrency 8 and 16 (users with their own thoughts at the end of the prompt), time to first token, and 16 users
sharing a long system prompt, each with their own thoughts (the first request against the rest: a prefix cache hit
across users). Writes engines.json, engines.md and engines.png.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import time
from pathlib import Path

import torch

from .aux_model import AuxConfig, SoftThoughtAux
from .bench import STORY_PROMPTS, SUMMARY_SENTENCES, process_tree_rss_mb
from .engine import EngineSpec, make_engine
from .generation import SamplingParams
from .pipeline import default_aux_dir
from .splice import Placement, build_chat_prompt

END = Placement(at_end=True)


def _thoughts(aux_dir: str | None, n: int) -> tuple[list[torch.Tensor], AuxConfig]:
    """n users' thoughts from the auxiliary checkpoint (placed at the end whatever the checkpoint's placement: speed
    does not depend on what they say), and its config."""
    aux = SoftThoughtAux.from_pretrained(aux_dir or default_aux_dir())
    with torch.inference_mode():
        thoughts = [aux.encode([f"{SUMMARY_SENTENCES[i % len(SUMMARY_SENTENCES)]} Reader {i}."])[0] for i in range(n)]
    return thoughts, aux.config


async def _one(engine, prompt, params, rid) -> dict:
    start, first = time.perf_counter(), None
    async for item in engine.generate(prompt, params, rid):
        if first is None and item.get("delta"):
            first = time.perf_counter()
        last = item
    end = time.perf_counter()
    return {"ttft_s": (first or end) - start, "latency_s": end - start, "tokens": last["completion_tokens"]}


async def _concurrent(engine, prompts, params, tag) -> dict:
    start = time.perf_counter()
    done = await asyncio.gather(*(_one(engine, p, params, f"{tag}-{i}") for i, p in enumerate(prompts)))
    wall = time.perf_counter() - start
    return {"tokens_per_s": sum(d["tokens"] for d in done) / wall, "mean_ttft_s": statistics.mean(d["ttft_s"] for d in done)}


def _shared_system_prompt(tokenizer, n_tokens: int) -> str:
    text, i = "", 0
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < n_tokens:
        text = (text + " " + SUMMARY_SENTENCES[i % len(SUMMARY_SENTENCES)]).strip()
        i += 1
    return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens])


async def measure(engine, thoughts: list[torch.Tensor], max_tokens: int, system_tokens: int) -> dict:
    tok = engine.tokenizer
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)  # equal work per reply

    def chat(i, system=None):
        msgs = ([{"role": "system", "content": system}] if system else []) + \
               [{"role": "user", "content": STORY_PROMPTS[i % len(STORY_PROMPTS)]}]
        return build_chat_prompt(tok, msgs, thoughts[i % len(thoughts)], placement=END)

    await _one(engine, chat(0), SamplingParams(max_tokens=2, temperature=0), "warm-up")
    single = [await _one(engine, chat(i), params, f"single-{i}") for i in range(3)]
    out = {"single_stream": {"tokens_per_s": sum(s["tokens"] for s in single) / sum(s["latency_s"] for s in single),
                             "ttft_s": statistics.median(s["ttft_s"] for s in single)}}
    for c in (8, 16):
        out[f"concurrency_{c}"] = await _concurrent(engine, [chat(i) for i in range(c)], params, f"c{c}")
    system = _shared_system_prompt(tok, system_tokens)
    one_token = SamplingParams(max_tokens=1, temperature=0)
    shared = [await _one(engine, chat(i, system), one_token, f"shared-{i}") for i in range(16)]  # one after another
    rest = statistics.mean(s["ttft_s"] for s in shared[1:])
    out["shared_system_prompt"] = {"users": 16, "system_tokens": system_tokens, "prompt_tokens": chat(0, system).num_tokens,
                                   "first_ttft_s": shared[0]["ttft_s"], "rest_mean_ttft_s": rest,
                                   "rest/first": rest / shared[0]["ttft_s"]}
    return out


def run(engines: list[str], out_dir: Path, aux: str | None, dtype: str, max_tokens: int = 64,
        system_tokens: int = 1000) -> dict:
    # The thoughts first, on one OpenMP thread: torch ops run on this thread once the reference engine's thread has
    # set its thread count would start a second OpenMP worker pool beside the engine's, which slows its decoding by a
    # third on 2 cores (the server encodes in another process).
    torch.set_num_threads(1)
    thoughts, aux_config = _thoughts(aux, 16)
    results: dict = {"meta": {"cores": os.cpu_count(), "dtype": dtype, "max_tokens": max_tokens,
                              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}}
    for kind in engines:
        before = process_tree_rss_mb(os.getpid())
        started = time.perf_counter()
        loop = asyncio.new_event_loop()  # vLLM's AsyncLLM belongs to the loop it starts on

        async def start(kind=kind):
            return make_engine(kind, EngineSpec(dtype=dtype, max_batch_size=16, max_prompt_tokens=2048,
                                                max_tokens=max_tokens, kv_cache_gib=2.0))

        engine = loop.run_until_complete(start())
        startup = time.perf_counter() - started
        try:
            aux_config.check_backbone(engine.info()["fingerprint"], aux or "(the shipped one)")
            entry = loop.run_until_complete(measure(engine, thoughts, max_tokens, system_tokens))
            entry.update(startup_s=startup, rss_mb=process_tree_rss_mb(os.getpid()) - before, info=engine.info())
        finally:
            engine.close()
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.sleep(0.5))  # let the engine's tasks wind down
            loop.close()
        results[kind] = entry
        print(f"{kind}: {json.dumps({k: v for k, v in entry.items() if k != 'info'}, default=str)}", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "engines.json").write_text(json.dumps(results, indent=2))
    (out_dir / "engines.md").write_text(markdown(results, engines))
    plot(results, engines, out_dir / "engines.png")
    return results


def markdown(r: dict, engines: list[str]) -> str:
    m = r["meta"]
    lines = ["# Backbone engines, one run", "", f"{m['gpu'] or str(m['cores']) + ' CPU cores'}, {m['dtype']}, "
             f"{m['max_tokens']} new tokens per reply, each user's 8 thoughts at the end of the prompt.", "",
             "| | " + " | ".join(engines) + " |", "|---|" + "---|" * len(engines)]

    def row(name, get, fmt):
        lines.append(f"| {name} | " + " | ".join(fmt.format(get(r[e])) for e in engines) + " |")

    row("single stream (tok/s)", lambda e: e["single_stream"]["tokens_per_s"], "{:.1f}")
    row("concurrency 8 (tok/s)", lambda e: e["concurrency_8"]["tokens_per_s"], "{:.1f}")
    row("concurrency 16 (tok/s)", lambda e: e["concurrency_16"]["tokens_per_s"], "{:.1f}")
    row("first token, single stream (ms)", lambda e: 1000 * e["single_stream"]["ttft_s"], "{:.0f}")
    row("first token at concurrency 16 (ms)", lambda e: 1000 * e["concurrency_16"]["mean_ttft_s"], "{:.0f}")
    row("shared system prompt: first request's first token (ms)", lambda e: 1000 * e["shared_system_prompt"]["first_ttft_s"], "{:.0f}")
    row("shared system prompt: the next 15 users' (ms, mean)", lambda e: 1000 * e["shared_system_prompt"]["rest_mean_ttft_s"], "{:.0f}")
    row("shared system prompt: rest / first", lambda e: e["shared_system_prompt"]["rest/first"], "{:.2f}")
    row("start-up (s)", lambda e: e["startup_s"], "{:.1f}")
    row("memory added (MB, this process and its children)", lambda e: e["rss_mb"], "{:.0f}")
    return "\n".join(lines) + "\n"


def plot(r: dict, engines: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    levels = ["single_stream", "concurrency_8", "concurrency_16"]
    for k, e in enumerate(engines):
        axes[0].bar([i + 0.4 * k for i in range(3)], [r[e][lv]["tokens_per_s"] for lv in levels], width=0.4, label=e)
        s = r[e]["shared_system_prompt"]
        axes[1].bar([0.4 * k, 1 + 0.4 * k], [1000 * s["first_ttft_s"], 1000 * s["rest_mean_ttft_s"]], width=0.4, label=e)
    axes[0].set_xticks([0.2, 1.2, 2.2], ["1 stream", "8 users", "16 users"])
    axes[0].set(ylabel="output tokens/s", title="Throughput")
    axes[1].set_xticks([0.2, 1.2], ["first user", "next 15 users (mean)"])
    axes[1].set(ylabel="time to first token (ms)", title="16 users sharing a long system prompt")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
