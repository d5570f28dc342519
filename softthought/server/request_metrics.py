"""ASGI middleware that counts every request once, by the status it really sent.

A plain ASGI wrapper rather than Starlette's `BaseHTTPMiddleware`: that one reads the status off a response object
built before the body is sent, so a stream left the in-flight gauge as soon as its headers were out, and a request
whose client went away surfaced there as whatever the cancellation turned into on its way through the task groups
(Ray's `RequestCancelledError`, an exception group, "No response returned"), all counted as 500s. Here the status
is the one in the `http.response.start` message that went out; a request that sent none because its client left
is a 499 (nginx's convention), and only an error that would have produced a 500 is counted as one.
"""

from __future__ import annotations

import asyncio
import time

from ray.serve.exceptions import RequestCancelledError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import metrics

CLIENT_CLOSED = 499


def is_cancellation(exc: BaseException) -> bool:
    """Whether `exc` only says that the request was abandoned: cancelled here, or a Serve handle call cancelled with
    it (Ray raises `RequestCancelledError` where its caller awaited), alone or grouped."""
    if isinstance(exc, BaseExceptionGroup):
        return all(is_cancellation(e) for e in exc.exceptions)
    return isinstance(exc, asyncio.CancelledError | RequestCancelledError)


class RequestMetrics:
    """`softthought_requests_total{route,status}`, `softthought_request_duration_seconds{route}` and
    `softthought_requests_in_flight`, each request held in flight until its last byte is sent."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status: int | None = None
        disconnected = False

        async def watch_receive() -> Message:
            nonlocal disconnected
            message = await receive()
            disconnected = disconnected or message["type"] == "http.disconnect"
            return message

        async def watch_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        metrics.IN_FLIGHT.inc()
        try:
            await self.app(scope, watch_receive, watch_send)
        except BaseException as exc:
            if status is None:
                status = CLIENT_CLOSED if disconnected or is_cancellation(exc) else 500
            raise
        finally:
            metrics.IN_FLIGHT.dec()
            route = getattr(scope.get("route"), "path", "other")  # the route template: bounded label values
            metrics.REQUESTS.labels(route, str(status or CLIENT_CLOSED)).inc()
            metrics.LATENCY.labels(route).observe(time.perf_counter() - start)
