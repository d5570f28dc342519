"""`softthought loadtest URL`: load, client disconnects and replica kills against a running server; prints what was lost.

A client here behaves as the OpenAI SDK does: a 503 or 429 with `Retry-After`, or a stream that ends with an error
event saying a replica is restarting, is retried after the pause the server asks for. A request is *lost* when it
still fails after that (another status, a dropped connection, a stream cut without an error event, a malformed
body, no answer within the deadline). A preference write is lost when the server acknowledged it and a later read
does not return it. A generation is *left running* when it keeps the backbone busy after its client disconnected.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from dataclasses import dataclass, field

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

PROMPTS = ["Say hi.", "Name a colour.", "What is 2 + 2?", "Give me one word for happy.", "Name a fruit.",
           "Which day comes after Monday?", "Say something kind.", "Name an animal."]
SUMMARIES = ["Answer in lowercase.", "End every reply with 'Cheers!'.", "I like short answers.",
             "Write to me in French.", "Use no commas.", "Put the answer in a title like <<this>>."]
RETRYABLE_CODES = {"replica_unavailable", "unavailable", "rate_limit_exceeded"}


@dataclass
class Outcome:
    kind: str  # chat | chat-stream | completion
    ok: bool = False
    retries: int = 0
    detail: str = ""
    started: float = 0.0
    ended: float = 0.0


@dataclass
class Phase:
    name: str
    outcomes: list[Outcome] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        lost = [o for o in self.outcomes if not o.ok]
        return {"requests": len(self.outcomes), "retried": sum(o.retries > 0 for o in self.outcomes),
                "lost": len(lost), "lost_examples": sorted({o.detail for o in lost})[:5], **self.extra}


# ------------------------------------------------------------------------------------------ one request
def _body(kind: str, rng: random.Random, users: list[str], max_tokens: int) -> dict:
    personal = {"user": rng.choice(users)} if users and rng.random() < 0.7 else {}
    if kind == "completion":
        return {"model": "softthought", "prompt": rng.choice(PROMPTS), "max_tokens": max_tokens, "temperature": 0, **personal}
    body = {"model": "softthought", "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
            "max_tokens": max_tokens, "temperature": 0, **personal}
    if kind == "chat-stream":
        body.update(stream=True, stream_options={"include_usage": True})
    return body


def _retry_after(resp: httpx.Response) -> float | None:
    """The pause a 503/429 asks for, or None when the response is not one to retry."""
    if resp.status_code in (429, 503) and "retry-after" in resp.headers:
        return float(resp.headers["retry-after"])
    return None


async def _attempt(client: httpx.AsyncClient, kind: str, body: dict) -> tuple[str, float | None]:
    """One try: ("ok", None), ("retry", seconds) or ("lost: why", None)."""
    path = "/v1/completions" if kind == "completion" else "/v1/chat/completions"
    if kind != "chat-stream":
        resp = await client.post(path, json=body)
        if (pause := _retry_after(resp)) is not None:
            return "retry", pause
        if resp.status_code != 200:
            return f"lost: HTTP {resp.status_code}", None
        choices = resp.json().get("choices")
        return ("ok", None) if choices and choices[0].get("finish_reason") else ("lost: no finished choice", None)
    async with client.stream("POST", path, json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            pause = _retry_after(resp)
            return ("retry", pause) if pause is not None else (f"lost: HTTP {resp.status_code}", None)
        finished = False
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return ("ok", None) if finished else ("lost: [DONE] before a finish_reason", None)
            chunk = json.loads(line[6:])
            if "error" in chunk:
                code = chunk["error"].get("code")
                return ("retry", 1.0) if code in RETRYABLE_CODES else (f"lost: stream error {code}", None)
            finished = finished or any(c.get("finish_reason") for c in chunk.get("choices") or [])
    return "lost: stream cut without [DONE] or an error event", None


async def request(client: httpx.AsyncClient, kind: str, body: dict, deadline_s: float) -> Outcome:
    out = Outcome(kind, started=time.monotonic())
    give_up = out.started + deadline_s
    while True:
        try:
            verdict, pause = await asyncio.wait_for(_attempt(client, kind, body), max(give_up - time.monotonic(), 0.1))
        except (TimeoutError, httpx.HTTPError, json.JSONDecodeError) as exc:
            verdict, pause = f"lost: {type(exc).__name__}", None
        if verdict == "retry" and time.monotonic() + pause < give_up:
            out.retries += 1
            await asyncio.sleep(pause)
            continue
        out.ok = verdict == "ok"
        out.detail = "still unavailable at the deadline" if verdict == "retry" else verdict.removeprefix("lost: ")
        out.ended = time.monotonic()
        return out


async def load(client: httpx.AsyncClient, n: int, concurrency: int, users: list[str], max_tokens: int,
               deadline_s: float, seed: int, on_progress=None) -> list[Outcome]:
    rng = random.Random(seed)
    kinds = [rng.choice(("chat", "chat-stream", "completion")) for _ in range(n)]
    bodies = [_body(k, rng, users, max_tokens) for k in kinds]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    results: list[Outcome | None] = [None] * n

    async def worker():
        while not queue.empty():
            i = queue.get_nowait()
            results[i] = await request(client, kinds[i], bodies[i], deadline_s)
            if on_progress:
                on_progress(sum(r is not None for r in results))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


# ------------------------------------------------------------------------------------------ preferences
async def write_preferences(client: httpx.AsyncClient, n: int, prefix: str) -> dict[str, dict]:
    """PUT a summary for n users; returns what the server acknowledged for each."""
    acked = {}
    for i in range(n):
        user = f"{prefix}-{i}"
        resp = await client.put(f"/v1/users/{user}/preferences", json={"summary": SUMMARIES[i % len(SUMMARIES)]})
        if resp.status_code == 200:
            acked[user] = resp.json()
    return acked


async def lost_preferences(client: httpx.AsyncClient, acked: dict[str, dict]) -> list[str]:
    lost = []
    for user, written in acked.items():
        resp = await client.get(f"/v1/users/{user}/preferences")
        if resp.status_code != 200 or resp.json().get("summary") != written.get("summary") or \
                resp.json().get("version") != written.get("version"):
            lost.append(user)
    return lost


# ------------------------------------------------------------------------------------------ disconnects
async def _metrics(client: httpx.AsyncClient) -> dict[str, float]:
    resp = await client.get("/metrics")
    resp.raise_for_status()
    return {s.name + json.dumps(s.labels, sort_keys=True): s.value
            for fam in text_string_to_metric_families(resp.text) for s in fam.samples}


async def disconnects(client: httpx.AsyncClient, n: int, seed: int) -> dict:
    """Open n long streams, read the first event of each and hang up; then check the backbone is idle again:
    no request in flight, and a lone request runs in batches of one (a leaked generation would share its steps)."""
    rng = random.Random(seed)

    async def hang_up():
        body = _body("chat-stream", rng, [], 256) | {"messages": [{"role": "user", "content": "Write a long story."}]}
        async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    return  # leaving the block closes the connection mid-stream

    await asyncio.gather(*(hang_up() for _ in range(n)))
    deadline, in_flight = time.monotonic() + 60, None
    while time.monotonic() < deadline:
        in_flight = (await _metrics(client)).get("softthought_requests_in_flight{}", 0.0)
        if in_flight <= 1:  # the /metrics request itself is in flight
            break
        await asyncio.sleep(0.5)
    before = await _metrics(client)
    lone = await request(client, "chat", _body("chat", rng, [], 16), 120)
    after = await _metrics(client)
    key_all, key_one = 'softthought_batch_size_count{}', 'softthought_batch_size_bucket{"le": "1.0"}'
    steps = int(after.get(key_all, 0) - before.get(key_all, 0))
    shared = steps - int(after.get(key_one, 0) - before.get(key_one, 0))
    return {"disconnected_streams": n, "in_flight_after": int(max(in_flight - 1, 0)), "lone_request_ok": lone.ok,
            "lone_request_steps": steps, "steps_shared_with_left_running_generations": shared}


# ------------------------------------------------------------------------------------------ replica kills
def replica_pids(deployment: str, app: str = "softthought", server_pid: int | None = None) -> list[int]:
    """Pids of this machine's replicas of `deployment` (Ray names the process ray::ServeReplica:APP:DEPLOYMENT), of
    the server process `server_pid` alone if given."""
    name = f"ray::ServeReplica:{app}:{deployment}"
    procs = psutil.Process(server_pid).children(recursive=True) if server_pid else psutil.process_iter()
    pids = []
    for proc in procs:
        try:
            cmdline = proc.cmdline()
        except psutil.Error:
            continue
        if cmdline and cmdline[0].split(" ")[0] == name:
            pids.append(proc.pid)
    return pids


async def kill_under_load(client: httpx.AsyncClient, deployment: str, n: int, concurrency: int, users: list[str],
                          max_tokens: int, seed: int) -> Phase:
    pids = replica_pids(deployment)
    if not pids:
        raise RuntimeError(f"no {deployment} replica runs on this machine: --kill needs the server to run here")
    phase = Phase(f"kill -9 {deployment}")
    kill_at: list[float] = []  # when the replica was killed, once it was

    def progress(done: int):
        if not kill_at and done >= n // 4:
            os.kill(pids[0], signal.SIGKILL)
            kill_at.append(time.monotonic())

    phase.outcomes = await load(client, n, concurrency, users, max_tokens, 300, seed, progress)
    after = [o.ended for o in phase.outcomes if o.ok and kill_at and o.started > kill_at[0]]
    phase.extra = {"killed_pid": pids[0],
                   "recovered_after_s": round(min(after) - kill_at[0], 1) if after else None}
    return phase


# ------------------------------------------------------------------------------------------ the run
async def run(url: str, api_key: str | None, requests: int, concurrency: int, disconnect: int, kill: list[str],
              max_tokens: int, users: int, seed: int, log=print) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency * 2 + 8)
    async with httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=300, limits=limits) as client:
        acked = await write_preferences(client, users, f"loadtest-{seed}")
        log(f"preferences: {len(acked)}/{users} acknowledged")
        names = list(acked)
        t0 = time.monotonic()
        phases = [Phase("load", await load(client, requests, concurrency, names, max_tokens, 300, seed))]
        phases[0].extra = {"seconds": round(time.monotonic() - t0, 1)}
        log(f"load: {phases[0].summary()}")
        if disconnect:
            leak = await disconnects(client, disconnect, seed)
            log(f"disconnects: {leak}")
        for i, deployment in enumerate(kill):
            phase = await kill_under_load(client, deployment, max(requests // 4, 16), concurrency, names, max_tokens,
                                          seed + 1 + i)
            phases.append(phase)
            log(f"{phase.name}: {phase.summary()}")
        lost_writes = await lost_preferences(client, acked)
    report = {"url": url, "phases": {p.name: p.summary() for p in phases},
              "preference_writes": {"acknowledged": len(acked), "lost": len(lost_writes)}}
    lost = sum(s["lost"] for s in report["phases"].values()) + len(lost_writes)
    if disconnect:
        report["disconnects"] = leak
        lost += leak["in_flight_after"] + leak["steps_shared_with_left_running_generations"] + (not leak["lone_request_ok"])
    report["lost"] = lost
    return report


def markdown(report: dict) -> str:
    rows = ["| phase | requests | retried | lost | notes |", "|---|---|---|---|---|"]
    for name, s in report["phases"].items():
        notes = ", ".join(f"{k}={v}" for k, v in s.items() if k not in ("requests", "retried", "lost", "lost_examples"))
        notes += f"; e.g. {'; '.join(s['lost_examples'])}" if s["lost_examples"] else ""
        rows.append(f"| {name} | {s['requests']} | {s['retried']} | {s['lost']} | {notes} |")
    w = report["preference_writes"]
    rows.append(f"| preference writes | {w['acknowledged']} | - | {w['lost']} | read back after everything |")
    if "disconnects" in report:
        d = report["disconnects"]
        rows.append(f"| disconnects | {d['disconnected_streams']} | - | "
                    f"{d['in_flight_after'] + d['steps_shared_with_left_running_generations']} | "
                    f"in flight after: {d['in_flight_after']}; steps a lone request shared with left-running "
                    f"generations: {d['steps_shared_with_left_running_generations']} of {d['lone_request_steps']} |")
    rows.append(f"\n**lost: {report['lost']}**")
    return "\n".join(rows)
