"""A cold server polled the way start-up scripts and load balancers poll it: `/health` answers 200 or 503 and nothing
else, and a poll whose client gave up is counted as a 499, never as a server error."""

import re
import threading
import time

import httpx
import pytest

from softthought.server.process import ServerProcess, free_port

from .conftest import CLI, write_config

pytestmark = pytest.mark.slow
# client time-outs around the route's own 2 s probe of the models, and far below it
TIMEOUTS = (0.05, 0.3, 1.0, 1.9, 2.0, 2.1, 5.0)


def test_cold_start_polls_are_200_or_503_and_abandoned_ones_499(tmp_path, aux_dir):
    config = write_config(tmp_path / "serve.yaml", dtype="float32", aux_checkpoint=str(aux_dir),
                          store_path=str(tmp_path / "prefs.db"))
    port = free_port()
    server = ServerProcess([CLI, "serve", "--config", str(config), "--port", str(port)], port, tmp_path / "server.log")
    answers, gave_up, ready = [], [0], threading.Event()
    lock = threading.Lock()

    def poll(timeout: float) -> None:
        while not ready.is_set():
            try:
                status = httpx.get(server.base_url + "/health", timeout=timeout).status_code
                with lock:
                    answers.append(status)
                if status == 200:
                    ready.set()
            except httpx.TimeoutException:
                with lock:
                    gave_up[0] += 1
            except httpx.TransportError:  # nothing listening yet
                time.sleep(0.2)

    import subprocess

    with open(server.log, "ab") as log:
        server.proc = subprocess.Popen(server.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    pollers = [threading.Thread(target=poll, args=(t,), daemon=True) for t in TIMEOUTS]
    try:
        for p in pollers:
            p.start()
        assert ready.wait(420), f"never healthy; see {server.log}"
        for p in pollers:
            p.join(10)
        metrics = httpx.get(server.base_url + "/metrics").text
    finally:
        server.stop()
    # Before the application is deployed, Ray's proxy answers 404 for every path (the route does not exist yet)
    assert set(answers) <= {200, 404, 503}, answers
    assert 500 not in answers and answers[-1] == 200
    counted = {int(s): float(n) for s, n in re.findall(r'softthought_requests_total\{route="/health",status="(\d+)"\} (\S+)',
                                                        metrics)}
    assert set(counted) <= {200, 499, 503}, counted
    assert gave_up[0] > 0, "no poll timed out: the test did not exercise an abandoned request"
    # every answer the clients read was counted; a poll that gave up is counted once at most (not at all when it
    # gave up before the ingress saw it, as its answer when that was sent just before the client left)
    answered = sum(s in (200, 503) for s in answers)
    assert answered <= counted.get(200, 0) + counted.get(503, 0)
    assert sum(counted.values()) <= answered + gave_up[0]
