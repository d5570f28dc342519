"""`softthought serve` keeps Ray on loopback: every listener of the cluster binds 127.0.0.1, except the one per
Serve replica that Ray 2.60 hard-codes to all interfaces, and that one refuses a client without Ray's token."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import grpc
import psutil

from softthought.server.launch import LOOPBACK

# Ray's inter-deployment gRPC service on every Serve replica (`ray/serve/_private/replica.py` binds it to "[::]:0").
HANDLE_REQUEST = "/ray.serve.ASGIService/HandleRequest"


def _listeners(root_pid: int) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket of the server and the Ray cluster it started."""
    root = psutil.Process(root_pid)
    rows = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            conns, name = proc.net_connections(kind="tcp"), " ".join(proc.cmdline())
        except psutil.NoSuchProcess:
            continue
        rows += [(c.laddr.ip, c.laddr.port, name) for c in conns if c.status == psutil.CONN_LISTEN]
    return rows


def _routable_address() -> str:
    """Where a client on the network would connect: this machine's first non-loopback IPv4 address, if it has one."""
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return "127.0.0.1"


def _ray_token() -> str:
    """Ray's own lookup order: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"]
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token")).read_text().strip()


def _call(address: str, port: int, metadata=()) -> grpc.StatusCode:
    with grpc.insecure_channel(f"{address}:{port}") as channel:
        call = channel.unary_unary(HANDLE_REQUEST, request_serializer=None, response_deserializer=None)
        try:
            call(b"", timeout=20, metadata=metadata)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_every_listener_is_loopback_but_the_replicas_inter_deployment_grpc(server):
    listeners = _listeners(server.proc.pid)
    assert any(port == server.port for _, port, _ in listeners), "the HTTP proxy's port was not found"
    assert len(listeners) >= 10, listeners  # GCS, raylet, agents, controller, proxy, replicas: the whole cluster

    open_to_all = [(ip, port, name) for ip, port, name in listeners if ip not in LOOPBACK]
    replicas = {name for ip, port, name in open_to_all if name.startswith("ray::ServeReplica")}
    assert all(name.startswith("ray::ServeReplica") for _, _, name in open_to_all), open_to_all
    assert len(open_to_all) == len(replicas) == 3, open_to_all  # one each: Ingress, Aux, Backbone


def test_the_open_replica_port_refuses_a_client_without_rays_token(server):
    open_ports = [port for ip, port, _ in _listeners(server.proc.pid) if ip not in LOOPBACK]
    assert open_ports
    address = _routable_address()
    for port in open_ports:
        assert _call(address, port) == grpc.StatusCode.UNAUTHENTICATED
        assert _call(address, port, metadata=(("authorization", "Bearer not-the-token"),)) == \
            grpc.StatusCode.UNAUTHENTICATED
    # The control: with Ray's token the same call gets past authentication (and fails on its empty request).
    assert _call(address, open_ports[0], metadata=(("authorization", f"Bearer {_ray_token()}"),)) not in (
        grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE)
