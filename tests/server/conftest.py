"""A real `softthought serve` (Ray Serve on 127.0.0.1) in a subprocess, shared by the server tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from softthought.server.launch import DEFAULT_CONFIG

API_KEY = "test-key"
CLI = str(Path(sys.executable).parent / "softthought")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server started by `command` in its own process group, healthy on 127.0.0.1:`port`."""

    def __init__(self, command: list[str], port: int, log: Path, env=None, cwd=None) -> None:
        self.command, self.port, self.log, self.cwd = command, port, log, cwd
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.startup_s = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 420) -> None:
        t0 = time.monotonic()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=self.env, cwd=self.cwd)
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log}")
            try:
                if httpx.get(self.base_url + "/health", timeout=5).status_code == 200:
                    self.startup_s = time.monotonic() - t0
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"server not healthy after {timeout} s; see {self.log}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGINT)  # graceful: serve.shutdown() + ray.shutdown()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


def write_config(path: Path, **args) -> Path:
    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    data["applications"][0]["args"].update(args)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="session")
def server(tmp_path_factory, aux_dir):
    tmp = tmp_path_factory.mktemp("server")
    config = write_config(
        tmp / "serve.yaml",
        dtype="float32",  # bit-exact batching, so concurrent results can be compared with single ones
        aux_checkpoint=str(aux_dir),
        store_path=str(tmp / "prefs.db"),
        api_keys=[API_KEY],
        max_prompt_tokens=512,
        max_summary_chars=500,
        max_tokens_limit=256,
    )
    port = free_port()
    srv = ServerProcess([CLI, "serve", "--config", str(config), "--port", str(port)], port, tmp / "server.log")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture()
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c
