"""`softthought bench`: soft thoughts vs text summaries, server overhead, batching across users, cache, load.

Starts its own server (or uses --url) and an in-process pipeline on the same models, measures everything
in one run, and writes bench.json, bench.md and bench.png. Figures are ratios against baselines measured in
the same run, so they compare like with like on whatever machine runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from .generation import SamplingParams
from .pipeline import Pipeline
from .splice import build_chat_prompt, with_system_text

# Sentences a real preference summary ("semantic memory") is made of; cut to a token budget.
SUMMARY_SENTENCES = [
    "The user is a high-school chemistry teacher from Lyon who moved to Toronto three years ago.",
    "She prefers short, direct answers and dislikes filler phrases such as 'great question'.",
    "When explaining science, she wants one concrete everyday example before any formula.",
    "She reads on her phone during the commute, so long paragraphs should be split into short ones.",
    "She likes metric units, 24-hour times and dates written day-month-year.",
    "She is vegetarian and allergic to peanuts, which matters for any recipe or restaurant suggestion.",
    "She is learning Spanish and enjoys the occasional Spanish word with its translation.",
    "For code, she uses Python 3 and prefers the standard library over third-party packages.",
    "She does not want emojis, exclamation marks or marketing language in answers.",
    "She appreciates a one-line summary at the end of longer explanations.",
    "Her two children are eight and eleven, and she often asks for explanations she can pass on to them.",
    "She runs on weekends and trains for a half marathon in the spring.",
    "She votes in local elections and wants political topics presented with both sides.",
    "She prefers British spelling, cites sources when she can, and distrusts unsourced statistics.",
    "She uses Linux at home and a managed Windows laptop at school, where she cannot install software.",
    "She likes jazz, especially Bill Evans, and listens to podcasts about history.",
    "When she asks for advice, she wants a clear recommendation first and the reasoning after it.",
    "She finds analogies to cooking and gardening especially helpful.",
    "She grades papers on Sunday evenings and often asks for feedback phrasing that is kind but precise.",
    "She wants answers to acknowledge uncertainty honestly instead of guessing.",
]
PROMPTS = ["Explain how a refrigerator keeps food cold.", "What should I pack for a weekend hike?",
           "Give me an idea for a quick dinner.", "Why do leaves change colour in autumn?",
           "How can I help my kids with homework?", "What is a good way to start running?",
           "Tell me about the history of jazz.", "How do vaccines work?"]
LONG_TEXT_PROMPT = "Here is a list of numbers: 1, 2, 3, 4, 5, 6, 7,"  # a raw continuation that runs long
# Requests that run to max_tokens: throughput comparisons then measure batching, not where replies happen to end.
STORY_PROMPTS = [f"Write a long, detailed story about {t}." for t in
                 ("a dragon who bakes bread", "a lighthouse keeper", "a robot gardener", "a lost violin", "a city under the sea",
                  "a talking owl", "a winter market", "a time-travelling cat")]


def summary_of(tokenizer, n_tokens: int) -> str:
    text, i = "", 0
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < n_tokens:
        text = (text + " " + SUMMARY_SENTENCES[i % len(SUMMARY_SENTENCES)]).strip()
        i += 1
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    return tokenizer.decode(ids)


@dataclass
class Timed:
    ttft_s: float
    latency_s: float
    prompt_tokens: int
    completion_tokens: int
    extension: dict | None = None


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


# ------------------------------------------------------------------------------------------ in-process
def run_in_process(pipe: Pipeline, prompt, max_tokens: int) -> Timed:
    start = time.perf_counter()
    first = None
    for out in pipe.engine.stream(prompt, pipe.params(prompt, SamplingParams(max_tokens=max_tokens, temperature=0))):
        first = first or time.perf_counter()
        if out.finished:
            r = out.result
            return Timed(first - start, time.perf_counter() - start, r.prompt_tokens, r.completion_tokens)
    raise RuntimeError("stream ended without a result")


def prompt_cost(pipe: Pipeline, lengths=(60, 150, 300), repeats: int = 3, max_tokens: int = 32) -> dict:
    """Same requests with the summary as text (system message) vs as K soft thoughts, in-process."""
    tok = pipe.backbone.tokenizer
    results = {}
    for n in lengths:
        summary = summary_of(tok, n)
        rows = {"text": [], "soft_cached": [], "soft_cold": []}
        for r in range(repeats):
            for prompt in PROMPTS[:3]:
                msgs = [{"role": "user", "content": prompt}]
                rows["text"].append(run_in_process(pipe, build_chat_prompt(tok, with_system_text(tok, msgs, summary)), max_tokens))
                # cold: the encoder pass is part of the request (a new user, or the first request after a rollout)
                t0 = time.perf_counter()
                thoughts = pipe.thoughts(summary + " " * r)  # distinct text defeats any cache
                encode_s = time.perf_counter() - t0
                personal = pipe.place(msgs, thoughts)
                cold = run_in_process(pipe, personal, max_tokens)
                rows["soft_cold"].append(Timed(cold.ttft_s + encode_s, cold.latency_s + encode_s, cold.prompt_tokens,
                                               cold.completion_tokens))
                # cached: what the server does for a returning user (thoughts from the LRU)
                rows["soft_cached"].append(run_in_process(pipe, personal, max_tokens))
        entry = {"summary_tokens": n}
        for k, v in rows.items():
            entry[k] = {"prompt_tokens": _median([t.prompt_tokens for t in v]), "ttft_s": _median([t.ttft_s for t in v]),
                        "latency_s": _median([t.latency_s for t in v])}
        for k in ("soft_cached", "soft_cold"):
            entry[f"{k}/text"] = {m: entry[k][m] / entry["text"][m] for m in ("prompt_tokens", "ttft_s", "latency_s")}
        results[str(n)] = entry
    return results


# ------------------------------------------------------------------------------------------ over HTTP
async def http_chat(client: httpx.AsyncClient, body: dict) -> Timed:
    start = time.perf_counter()
    first, usage, ext = None, None, None
    async with client.stream("POST", "/v1/chat/completions",
                             json={**body, "stream": True, "stream_options": {"include_usage": True}}) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            ext = ext or chunk.get("softthought")
            if chunk.get("usage"):
                usage = chunk["usage"]
            choices = chunk.get("choices") or []
            if first is None and choices and choices[0]["delta"].get("content"):
                first = time.perf_counter()
    end = time.perf_counter()
    return Timed((first or end) - start, end - start, usage["prompt_tokens"], usage["completion_tokens"], ext)


async def http_nonstreaming(client: httpx.AsyncClient, body: dict) -> Timed:
    start = time.perf_counter()
    resp = await client.post("/v1/chat/completions", json=body)
    resp.raise_for_status()
    data = resp.json()
    latency = time.perf_counter() - start
    return Timed(float("nan"), latency, data["usage"]["prompt_tokens"], data["usage"]["completion_tokens"],
                 data.get("softthought"))


async def server_overhead(client, pipe: Pipeline, model: str, repeats: int = 5, sizes=(32, 64)) -> dict:
    """The same greedy completions through HTTP (non-streaming) and in-process, alternating, medians."""
    msgs = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]
    results = {}
    for max_tokens in sizes:
        body = {"model": model, "messages": msgs, "max_tokens": max_tokens, "temperature": 0}
        http, local = [], []
        for _ in range(repeats):  # alternate so drift affects both sides alike
            http.append(await http_nonstreaming(client, body))
            local.append(run_in_process(pipe, build_chat_prompt(pipe.backbone.tokenizer, msgs), max_tokens))
        assert http[0].completion_tokens == local[0].completion_tokens, "server and in-process runs differ"
        remote, here = _median([t.latency_s for t in http]), _median([t.latency_s for t in local])
        results[str(max_tokens)] = {"completion_tokens": local[0].completion_tokens, "http_latency_s": remote,
                                    "in_process_latency_s": here, "http/in_process": remote / here}
    return results


def process_tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (the whole local Ray cluster of a server)."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a worker may exit while we look
            total += p.memory_info().rss
    return total / 2**20


async def batching(client, model: str, levels=(1, 2, 4, 8, 16), max_tokens: int = 64, rounds: int = 3) -> dict:
    """Aggregate tokens/s and TTFT at each concurrency: all requests from one user vs all from different users."""
    summaries = [f"{SUMMARY_SENTENCES[i % len(SUMMARY_SENTENCES)]} Reader number {i}." for i in range(max(levels))]
    for s in summaries:  # warm the thought cache: this section measures the backbone's batching
        await http_nonstreaming(client, {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                                         "preference_summary": s})
    results = {}
    for c in levels:
        entry = {}
        for mode in ("one_user", "different_users"):
            tokens, wall, ttfts = 0, 0.0, []
            for _ in range(rounds):
                bodies = [{"model": model, "messages": [{"role": "user", "content": STORY_PROMPTS[i % len(STORY_PROMPTS)]}],
                           "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,  # equal work per reply
                           "preference_summary": summaries[0] if mode == "one_user" else summaries[i]} for i in range(c)]
                start = time.perf_counter()
                done = await asyncio.gather(*(http_chat(client, b) for b in bodies))
                wall += time.perf_counter() - start
                tokens += sum(t.completion_tokens for t in done)
                ttfts += [t.ttft_s for t in done]
            entry[mode] = {"tokens_per_s": tokens / wall, "mean_ttft_s": statistics.mean(ttfts)}
        entry["different/one"] = entry["different_users"]["tokens_per_s"] / entry["one_user"]["tokens_per_s"]
        results[str(c)] = entry
    single = results[str(levels[0])]["one_user"]["tokens_per_s"]
    for c in levels:
        results[str(c)]["speedup_vs_single_stream"] = results[str(c)]["different_users"]["tokens_per_s"] / single
    return results


async def cache(client, model: str, repeats: int = 5) -> dict:
    miss, hit = [], []
    for i in range(repeats):
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                "preference_summary": f"{SUMMARY_SENTENCES[i]} Cache probe {time.time_ns()}."}
        first, second = await http_nonstreaming(client, body), await http_nonstreaming(client, body)
        assert not first.extension["aux_cache_hit"] and second.extension["aux_cache_hit"]
        miss.append(first.extension["aux_latency_ms"])
        hit.append(second.extension["aux_latency_ms"])
    m, h = _median(miss), _median(hit)
    return {"miss_ms": m, "hit_ms": h, "hit/miss": h / m}


async def under_load(client, model: str, background: int = 8, probes: int = 3) -> dict:
    """TTFT of a new request while long generations run, vs on an idle server."""
    probe = {"model": model, "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 8, "temperature": 0}
    idle = [(await http_chat(client, probe)).ttft_s for _ in range(probes)]
    started = asyncio.Event()
    first_tokens = 0

    async def long_generation():
        nonlocal first_tokens
        body = {"model": model, "prompt": LONG_TEXT_PROMPT, "max_tokens": 400, "temperature": 0, "stream": True}
        counted = False
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            async for line in resp.aiter_lines():  # read to the end: the stream is the load
                if not counted and line.startswith("data: {"):
                    counted = True
                    first_tokens += 1
                    if first_tokens == background:
                        started.set()

    tasks = [asyncio.create_task(long_generation()) for _ in range(background)]
    await started.wait()
    await asyncio.sleep(1.0)
    loaded = []
    for _ in range(probes):
        loaded.append((await http_chat(client, probe)).ttft_s)
        await asyncio.sleep(0.3)
    still_running = sum(not t.done() for t in tasks)
    await asyncio.gather(*tasks)
    quiet, busy = _median(idle), _median(loaded)
    return {"background_streams": background, "still_running_at_end": still_running, "idle_ttft_s": quiet,
            "loaded_ttft_s": busy, "loaded/idle": busy / quiet}


# ------------------------------------------------------------------------------------------ report
CRITERIA = [
    ("TTFT soft/text, 150-token summary (cached thoughts)", lambda r: r["prompt_cost"]["150"]["soft_cached/text"]["ttft_s"], "<=", 0.6),
    ("Server overhead, 64-token completion (HTTP / in-process)", lambda r: r["server_overhead"]["64"]["http/in_process"], "<=", 1.10),
    ("Throughput different users / one user, concurrency 8", lambda r: r["batching"]["8"]["different/one"], ">=", 0.95),
    ("Aggregate tokens/s at concurrency 8 / single stream", lambda r: r["batching"]["8"]["speedup_vs_single_stream"], ">=", 2.5),
    ("TTFT of a new request under load / idle", lambda r: r["under_load"]["loaded/idle"], "<=", 2.0),
]


def markdown(r: dict) -> str:
    lines = ["# softthought benchmark", "", f"{r['meta']['device']}; backbone {r['meta']['backbone']} ({r['meta']['dtype']}), "
             f"K={r['meta']['num_thoughts']} soft thoughts; server start-up {r['meta']['server_startup_s']:.1f} s, "
             f"{r['meta']['server_rss_mb']:.0f} MB resident for the whole local cluster after the run.", "",
             "| figure | value | target | holds |", "|---|---|---|---|"]
    for name, get, op, target in CRITERIA:
        v = get(r)
        ok = v <= target if op == "<=" else v >= target
        lines.append(f"| {name} | {v:.3f} | {op} {target} | {'yes' if ok else 'NO'} |")
    lines += ["", "## Prompt cost (in-process, medians)", "",
              "| summary tokens | condition | prompt tokens | TTFT (ms) | latency (ms) |", "|---|---|---|---|---|"]
    for n, e in r["prompt_cost"].items():
        for cond in ("text", "soft_cached", "soft_cold"):
            lines.append(f"| {n} | {cond} | {e[cond]['prompt_tokens']:.0f} | {1000 * e[cond]['ttft_s']:.1f} | "
                         f"{1000 * e[cond]['latency_s']:.1f} |")
    lines += ["", "## Server overhead (non-streaming, medians)", ""]
    for so in r["server_overhead"].values():
        lines.append(f"- {so['completion_tokens']} tokens: HTTP {so['http_latency_s']:.3f} s, in-process "
                     f"{so['in_process_latency_s']:.3f} s, ratio {so['http/in_process']:.3f}.")
    lines += ["", "## Batching across users (HTTP, streaming)", "",
              "| concurrency | one user tok/s | different users tok/s | ratio | TTFT one (ms) | TTFT different (ms) | vs single stream |",
              "|---|---|---|---|---|---|---|"]
    for c, e in r["batching"].items():
        lines.append(f"| {c} | {e['one_user']['tokens_per_s']:.1f} | {e['different_users']['tokens_per_s']:.1f} | "
                     f"{e['different/one']:.3f} | {1000 * e['one_user']['mean_ttft_s']:.0f} | "
                     f"{1000 * e['different_users']['mean_ttft_s']:.0f} | {e['speedup_vs_single_stream']:.2f}x |")
    c, u = r["cache"], r["under_load"]
    lines += ["", "## Thought cache", "", f"Aux latency: miss {c['miss_ms']:.2f} ms, hit {c['hit_ms']:.3f} ms.", "",
              "## Under load", "", f"TTFT idle {1000 * u['idle_ttft_s']:.0f} ms, with {u['background_streams']} long "
              f"generations running {1000 * u['loaded_ttft_s']:.0f} ms (ratio {u['loaded/idle']:.2f}).", ""]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    lengths = list(r["prompt_cost"])
    for k, cond in enumerate(("text", "soft_cached", "soft_cold")):
        axes[0, 0].bar([i + 0.27 * (k - 1) for i in range(len(lengths))],
                       [1000 * r["prompt_cost"][n][cond]["ttft_s"] for n in lengths], width=0.27, label=cond)
    axes[0, 0].set_xticks(range(len(lengths)), [f"{n}-token summary" for n in lengths])
    axes[0, 0].set_ylabel("time to first token (ms)")
    axes[0, 0].set_title("Summary as text vs as soft thoughts")
    axes[0, 0].legend()
    levels = [int(c) for c in r["batching"]]
    for mode in ("one_user", "different_users"):
        axes[0, 1].plot(levels, [r["batching"][str(c)][mode]["tokens_per_s"] for c in levels], marker="o", label=mode)
        axes[1, 0].plot(levels, [1000 * r["batching"][str(c)][mode]["mean_ttft_s"] for c in levels], marker="o", label=mode)
    axes[0, 1].set(xscale="log", xlabel="concurrent requests", ylabel="aggregate output tokens/s", title="Batching across users")
    axes[1, 0].set(xscale="log", xlabel="concurrent requests", ylabel="mean TTFT (ms)", title="Time to first token")
    axes[0, 1].legend()
    axes[1, 0].legend()
    u = r["under_load"]
    axes[1, 1].bar(["idle", f"{u['background_streams']} long generations"], [1000 * u["idle_ttft_s"], 1000 * u["loaded_ttft_s"]])
    axes[1, 1].set(ylabel="TTFT of a new request (ms)", title="New request under load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def _http_sections(url: str, pipe: Pipeline, model: str, api_key: str | None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300, limits=limits) as client:
        return {
            "server_overhead": await server_overhead(client, pipe, model),
            "cache": await cache(client, model),
            "batching": await batching(client, model),
            "under_load": await under_load(client, model),
        }


def run(out_dir: Path, url: str | None, aux: str | None, model: str, api_key: str | None, dtype: str) -> dict:
    import platform
    import tempfile

    from .server.process import ServerProcess, free_port

    server = None
    if url is None:
        port = free_port()
        tmp = Path(tempfile.mkdtemp(prefix="softthought-bench-"))
        cmd = [str(Path(sys.executable).parent / "softthought"), "serve", "--port", str(port), "--store", str(tmp / "p.db"),
               "--dtype", dtype]
        if aux:
            cmd += ["--aux", aux]
        server = ServerProcess(cmd, port, tmp / "server.log")
        print(f"starting a server (log: {tmp / 'server.log'})", file=sys.stderr)
        server.start()
        url = server.base_url
    rss = float("nan")
    try:
        health = httpx.get(url + "/health", timeout=10).json()
        pipe = Pipeline.load(health["backbone"]["name"], aux=health["aux"]["checkpoint"], dtype=dtype)
        print("measuring prompt cost (in-process)", file=sys.stderr)
        results = {"prompt_cost": prompt_cost(pipe)}
        print("measuring through HTTP", file=sys.stderr)
        results.update(asyncio.run(_http_sections(url, pipe, model, api_key)))
        if server is not None:
            rss = process_tree_rss_mb(server.proc.pid)
    finally:
        if server is not None:
            server.stop()
    results["meta"] = {"device": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
                       "backbone": health["backbone"]["name"], "dtype": dtype, "num_thoughts": health["aux"]["num_thoughts"],
                       "aux_version": health["aux"]["version"],
                       "server_startup_s": server.startup_s if server else float("nan"), "server_rss_mb": rss}
    results["criteria"] = {name: {"value": get(results), "target": f"{op} {t}",
                                  "holds": get(results) <= t if op == "<=" else get(results) >= t}
                           for name, get, op, t in CRITERIA}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(results, indent=2))
    (out_dir / "bench.md").write_text(markdown(results))
    plot(results, out_dir / "bench.png")
    return results
