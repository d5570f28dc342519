"""Every metric a Grafana panel queries is one the running server (or Ray beside it) actually exports."""

import time

import httpx
import pytest

from tests.deploy.test_configs import dashboard_metrics

pytestmark = pytest.mark.slow


def test_dashboard_metrics_exist_live(server, client, http):
    client.chat.completions.create(model="softthought", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                   extra_body={"preference_summary": "dashboard check"})
    wanted = dashboard_metrics()
    assert {m for m in wanted if m.startswith("softthought_")} and {m for m in wanted if m.startswith("ray_")}
    ours = http.get("/metrics").text
    missing = {m for m in wanted if m.startswith("softthought_") and m not in ours}
    assert not missing, missing
    deadline = time.monotonic() + 90  # Ray's metrics appear with a delay of seconds
    while True:
        ray = httpx.get(f"http://127.0.0.1:{server.ray_metrics_port}/metrics", timeout=10).text
        missing = {m for m in wanted if m.startswith("ray_") and m not in ray}
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert not missing, missing
