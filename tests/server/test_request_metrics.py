"""The request-counting middleware on a bare FastAPI app: each request is counted once, by the status it sent; a client
that went away is a 499, never a 500; a stream is in flight until its last byte."""

import asyncio

import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from ray.serve.exceptions import RequestCancelledError

from softthought.server import metrics
from softthought.server.request_metrics import RequestMetrics, is_cancellation

release = asyncio.Event()


def make_app() -> FastAPI:
    app = FastAPI()

    @app.get("/ok")
    async def ok():
        return {"ok": True}

    @app.get("/wait")
    async def wait():
        await asyncio.sleep(60)

    @app.get("/cancelled-handle")
    async def cancelled_handle():  # what awaiting a Serve handle raises once the caller's request is cancelled
        raise RequestCancelledError("r-1")

    @app.get("/boom")
    async def boom():
        raise ValueError("a real bug")

    @app.get("/stream")
    async def stream():
        async def body():
            yield b"first"
            await release.wait()
            yield b"last"
        return StreamingResponse(body())

    app.add_middleware(RequestMetrics)
    return app


def count(route: str, status: int) -> float:
    return metrics.REQUESTS.labels(route, str(status))._value.get()


async def call(app, path: str, sent: list):
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "headers": [], "root_path": "",
             "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1)}

    body_sent = False

    async def receive():  # the (empty) body once, then nothing until the client disconnects
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)


def test_a_request_cancelled_because_its_client_left_is_a_499():
    app = make_app()

    async def main():
        task = asyncio.create_task(call(app, "/wait", []))
        await asyncio.sleep(0.05)
        task.cancel()  # what Serve does to the request's task when the client disconnects
        with pytest.raises(asyncio.CancelledError):
            await task

    before = count("/wait", 499), count("/wait", 500)
    asyncio.run(main())
    assert (count("/wait", 499), count("/wait", 500)) == (before[0] + 1, before[1])


def test_a_cancelled_handle_call_is_a_499_and_a_real_error_a_500():
    app = make_app()
    before = count("/cancelled-handle", 499), count("/cancelled-handle", 500), count("/boom", 500)
    for path in ("/cancelled-handle", "/boom"):
        with pytest.raises((RequestCancelledError, ValueError)):
            asyncio.run(call(app, path, []))
    assert count("/cancelled-handle", 499) == before[0] + 1
    assert count("/cancelled-handle", 500) == before[1]
    assert count("/boom", 500) == before[2] + 1


def test_a_stream_is_in_flight_until_its_last_byte_and_counted_by_the_status_sent():
    app = make_app()

    async def main():
        release.clear()
        in_flight = metrics.IN_FLIGHT._value.get()
        sent: list = []
        task = asyncio.create_task(call(app, "/stream", sent))
        while not any(m.get("body") == b"first" for m in sent):
            await asyncio.sleep(0.01)
        assert sent[0]["status"] == 200
        assert metrics.IN_FLIGHT._value.get() == in_flight + 1  # headers and a first chunk out, still streaming
        release.set()
        await task
        assert metrics.IN_FLIGHT._value.get() == in_flight

    before = count("/stream", 200)
    asyncio.run(main())
    assert count("/stream", 200) == before + 1


def test_is_cancellation_looks_inside_exception_groups():
    assert is_cancellation(BaseExceptionGroup("g", [asyncio.CancelledError(), RequestCancelledError("x")]))
    assert not is_cancellation(BaseExceptionGroup("g", [asyncio.CancelledError(), ValueError()]))
    assert not is_cancellation(RuntimeError("No response returned."))
