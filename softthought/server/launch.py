"""Start a local Ray cluster on 127.0.0.1 and deploy a Serve config file onto it (`softthought serve`)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import yaml

# On Linux, Ray turns 127.0.0.1 into the machine's routable address, so its GCS, raylet, agents and workers listen
# on every interface. Declared a single-machine install, it keeps the node address (and so those listeners) on
# loopback. Ray reads this when it is imported: it must be set before any `import ray` in this process.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")

log = logging.getLogger("softthought.serve")
DEFAULT_CONFIG = Path(__file__).with_name("serve_local.yaml")
APP_NAME = "softthought"


def load_serve_config(path: str | Path | None = None, http: dict | None = None, args: dict | None = None,
                      replicas: dict[str, int] | None = None):
    """Read a Serve config file, apply overrides to http_options, to the softthought app's args and to its
    deployments' replica counts, validate."""
    from ray.serve.schema import ServeDeploySchema

    data = yaml.safe_load(Path(path or DEFAULT_CONFIG).read_text())
    data.setdefault("http_options", {}).update(http or {})
    apps = data.get("applications") or []
    target = next((a for a in apps if a.get("name") == APP_NAME), apps[0] if len(apps) == 1 else None)
    if (args or replicas) and target is None:
        raise ValueError(f"the config has no application named {APP_NAME!r} to apply overrides to")
    if args:
        target.setdefault("args", {}).update(args)
    for name, n in (replicas or {}).items():
        deployments = target.setdefault("deployments", [])
        entry = next((d for d in deployments if d.get("name") == name), None)
        if entry is None:
            deployments.append(entry := {"name": name})
        entry.pop("autoscaling_config", None)
        entry["num_replicas"] = n
    return ServeDeploySchema.model_validate(data)


def _wait_until_running(timeout_s: float) -> None:
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    start = time.monotonic()
    last = None
    while time.monotonic() - start < timeout_s:
        statuses = serve.status().applications
        states = {name: app.status for name, app in statuses.items()}
        if states and all(s == ApplicationStatus.RUNNING for s in states.values()):
            return
        failed = {n: statuses[n].message for n, s in states.items() if s == ApplicationStatus.DEPLOY_FAILED}
        if failed:
            raise RuntimeError(f"deployment failed: {failed}")
        if states != last:
            log.info("waiting for the applications: %s", {n: str(s) for n, s in states.items()})
            last = states
        time.sleep(1)
    raise TimeoutError(f"the applications were not running after {timeout_s:.0f} s")


def start(config, num_cpus: int | None = None, metrics_export_port: int | None = None,
          ready_timeout_s: float = 900) -> float:
    """Start Ray (loopback only, no dashboard) and Serve, deploy `config`, wait until it runs. Returns seconds taken."""
    import ray
    from ray.serve._private import api as serve_api  # what `serve run CONFIG` uses; Ray is pinned

    t0 = time.perf_counter()
    ray.init(
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        num_cpus=num_cpus,
        namespace="serve",
        _metrics_export_port=metrics_export_port,
        log_to_driver=True,
    )
    node_ip = ray.util.get_node_ip_address()
    if node_ip not in LOOPBACK:
        ray.shutdown()
        raise RuntimeError(f"Ray's node address is {node_ip}, not loopback: softthought serve keeps Ray on "
                           "127.0.0.1 and needs RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 set before ray is imported")
    client = serve_api.serve_start(
        http_options=config.http_options.model_dump(),
        proxy_location=config.proxy_location,
        grpc_options=None,
        controller_options=config.controller_options,
    )
    client.deploy_apps(config, _blocking=False)
    _wait_until_running(ready_timeout_s)
    return time.perf_counter() - t0


def serve_forever(config, **kwargs) -> int:
    import ray
    from ray import serve

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        seconds = start(config, **kwargs)
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        ray.shutdown()
        return 1
    http = config.http_options
    print(f"softthought is serving on http://{http.host}:{http.port} (ready in {seconds:.1f} s)", file=sys.stderr,
          flush=True)
    stop.wait()
    print("shutting down", file=sys.stderr, flush=True)
    serve.shutdown()
    ray.shutdown()
    return 0
