"""`softthought loadtest` against the real server: load, disconnects and a replica kill, nothing lost (issue 29)."""

import asyncio
import json
import subprocess

import httpx
import pytest

from softthought.loadtest import request

from .conftest import API_KEY, CLI

pytestmark = pytest.mark.slow


def test_loadtest_reports_nothing_lost(server, tmp_path):
    out = tmp_path / "report.json"
    done = subprocess.run([CLI, "loadtest", server.base_url, "--api-key", API_KEY, "--requests", "48", "--concurrency",
                           "8", "--users", "4", "--disconnects", "8", "--kill", "Aux", "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["lost"] == 0
    assert report["phases"]["load"]["requests"] == 48 and report["phases"]["load"]["lost"] == 0
    assert report["preference_writes"] == {"acknowledged": 4, "lost": 0}
    leak = report["disconnects"]
    assert leak["lone_request_ok"] and leak["lone_request_steps"] >= 1
    assert leak["in_flight_after"] == 0 and leak["steps_shared_with_left_running_generations"] == 0
    kill = report["phases"]["kill -9 Aux"]
    assert kill["lost"] == 0 and kill["recovered_after_s"] is not None
    assert "**lost: 0**" in done.stdout


def test_a_request_the_server_refuses_counts_as_lost(server):
    async def go():
        async with httpx.AsyncClient(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
            bad_model = {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            return await request(c, "chat", bad_model, deadline_s=30)

    outcome = asyncio.run(go())
    assert not outcome.ok and outcome.detail == "HTTP 404" and outcome.retries == 0
