"""A real `softthought serve` (Ray Serve on 127.0.0.1) in a subprocess, shared by the server tests."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest
import yaml

from softthought.server.launch import DEFAULT_CONFIG
from softthought.server.process import ServerProcess, free_port

API_KEY = "test-key"
OTHER_TENANT_KEY = "test-key-of-another-tenant"
ADMIN_KEY = "test-admin-key"
CLI = str(Path(sys.executable).parent / "softthought")


def write_config(path: Path, **args) -> Path:
    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    data["applications"][0]["args"].update(args)
    path.write_text(yaml.safe_dump(data))
    return path


def start_server(args: list[str], log_dir: Path) -> ServerProcess:
    """`softthought serve ARGS` on free ports (its HTTP port and Ray's metrics port), healthy."""
    port, ray_metrics = free_port(), free_port()
    srv = ServerProcess([CLI, "serve", *args, "--port", str(port), "--ray-metrics-port", str(ray_metrics)], port,
                        log_dir / "server.log")
    srv.ray_metrics_port = ray_metrics
    srv.start()
    return srv


def _shared_server(tmp_path_factory, aux_dir, engine: str):
    tmp = tmp_path_factory.mktemp(f"server-{engine}")
    config = write_config(
        tmp / "serve.yaml",
        engine=engine,
        dtype="float32",  # bit-exact batching, so concurrent results can be compared with single ones
        aux_checkpoint=str(aux_dir),
        store=str(tmp / "prefs.db"),
        api_keys={API_KEY: "tenant-a", OTHER_TENANT_KEY: "tenant-b"},
        admin_keys=[ADMIN_KEY],
        checkpoint_roots=[str(tmp_path_factory.getbasetemp())],  # where the tests write the checkpoints they roll out
        max_prompt_tokens=512,
        max_summary_chars=500,
        max_tokens_limit=256,
        **({"enforce_eager": True, "kv_cache_gib": 1.0} if engine == "vllm" else {}),
    )
    return start_server(["--config", str(config)], tmp)


@pytest.fixture(scope="session")
def server(tmp_path_factory, aux_dir):
    srv = _shared_server(tmp_path_factory, aux_dir, "hf")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory, aux_dir):
    """The same server with the backbone on vLLM (`engine: vllm`, the CPU build in tests)."""
    srv = _shared_server(tmp_path_factory, aux_dir, "vllm")
    yield srv
    srv.stop()


def on_each_engine(request, server):
    """For a module's `server` fixture parametrized by engine: the shared reference server, or the vLLM one."""
    return server if request.param == "hf" else request.getfixturevalue("vllm_server")


@pytest.fixture()
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


@pytest.fixture()
def admin(server):
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=600) as c:
        yield c
