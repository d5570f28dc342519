"""FastAPI ingress: OpenAI-compatible routes, preference API, health and metrics."""


import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from .. import protocol as oai
from ..aux_model import CheckpointError
from ..memory import PreferenceMemory
from ..preference_memory import DEFAULT_BANK, Bank
from ..splice import THOUGHT_MARKER
from ..store import DEFAULT_TENANT, open_store
from . import metrics
from .config import ServerConfig
from .request_metrics import RequestMetrics, is_cancellation
from .rollout import apply_checkpoint, validate_checkpoint

log = logging.getLogger("softthought.ingress")
app = FastAPI(title="softthought", description="OpenAI-compatible server with per-user soft thoughts")


# ------------------------------------------------------------------------------ errors and metrics
@app.exception_handler(oai.APIError)
async def _api_error(_: Request, exc: oai.APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:  # the router names only the first route on the path; Allow lists every one's
        headers["Allow"] = ", ".join(m for m in _METHODS if any(
            route.matches({**request.scope, "method": m})[0] == Match.FULL for route in request.app.routes))
    return JSONResponse(oai.APIError(exc.status_code, str(exc.detail), code=code).body(), status_code=exc.status_code,
                        headers=headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0]
    param = ".".join(str(p) for p in err["loc"][1:]) or None
    return JSONResponse(oai.APIError(400, f"Invalid value for '{param}': {err['msg']}", param=param).body(), 400)


def replica_failure(exc: BaseException) -> bool:
    """Whether `exc` says that a model replica died, restarts or is overloaded: the request may be retried."""
    if isinstance(exc, BaseExceptionGroup):
        return any(replica_failure(e) for e in exc.exceptions)
    return isinstance(exc, RayActorError | ReplicaUnavailableError | DeploymentUnavailableError | BackPressureError)


def _request_id(incoming: str | None) -> tuple[str, dict]:
    """The id an error's body and log name, and the headers that carry it. Behind Ray Serve's proxy a request already
    has one (its `x-request-id`, which the proxy also sets on the response): that one, so the client sees one id;
    elsewhere a new one, sent as the header."""
    return (incoming, {}) if incoming else ((new := oai.new_id("req")), {"x-request-id": new})


def unavailable(exc: BaseException, incoming: str | None = None) -> oai.APIError:
    """503 + Retry-After for a replica failure, logged here in full under a request id that the body names; the
    client learns nothing of Ray's internals (actor ids, pids, addresses)."""
    request_id, headers = _request_id(incoming)
    log.error("request %s: a model replica failed: %r", request_id, exc)
    return oai.APIError(503, f"A model replica is restarting; retry shortly (request id {request_id}).",
                        code="replica_unavailable", type="service_unavailable", headers={"Retry-After": "1", **headers})


@app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    if replica_failure(exc):
        return await _api_error(request, unavailable(exc, request.headers.get("x-request-id")))
    request_id, headers = _request_id(request.headers.get("x-request-id"))
    if not is_cancellation(exc):  # a handle call cancelled because its client left is no error of ours
        log.exception("request %s: unhandled error", request_id)
    return JSONResponse(oai.APIError(500, f"Internal server error (request id {request_id}).",
                                     code="internal_error").body(), status_code=500, headers=headers)


app.add_middleware(RequestMetrics)


async def _parse(request: Request, model: type, max_bytes: int):
    """The body as `model`, refused before any model work when it is too large, not JSON, nested too deeply or not
    Unicode."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:  # refused before it is read
        raise _too_large(max_bytes)
    body = bytearray()
    async for chunk in request.stream():  # a chunked body without a length is cut off at the limit too
        body += chunk
        if len(body) > max_bytes:
            raise _too_large(max_bytes)
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise oai.APIError(400, f"We could not parse the JSON body of your request: {exc}", code="invalid_json") from None
    except RecursionError:
        raise oai.APIError(400, f"The request body nests deeper than {oai.MAX_JSON_DEPTH} levels.",
                           code="invalid_json") from None
    if not isinstance(data, dict):
        raise oai.APIError(400, "The request body must be a JSON object.", code="invalid_json")
    oai.check_json_tree(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        if err["type"] == "extra_forbidden":
            raise oai.APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                               code="unsupported_parameter") from None
        if err["type"] == "missing":
            raise oai.APIError(400, f"Missing required parameter: '{param}'.", param=param,
                               code="missing_required_parameter") from None
        raise oai.APIError(400, f"Invalid value for '{param}': {err['msg']}", param=param, code="invalid_value") from None


def _engine_error(error: str | oai.APIError) -> oai.APIError:
    """A generation's failure as the client sees it: the replica's loss as `_merge` judged it, or the engine's own
    failure of a step (its message says what the engine did, never where)."""
    return error if isinstance(error, oai.APIError) else oai.APIError(500, error, code="backbone_error")


def _too_large(max_bytes: int) -> oai.APIError:
    return oai.APIError(413, f"The request body is larger than {max_bytes} bytes.", code="request_too_large")


async def _merge(streams: list) -> AsyncIterator[tuple[int, dict]]:
    """Interleave several backbone streams as (choice index, item); cancel them all when abandoned."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, stream):
        try:
            async for item in stream:
                await queue.put((i, item))
        except Exception as exc:  # a replica died mid-stream: the client gets a 503 event, the log gets the rest
            if replica_failure(exc):
                error = unavailable(exc)
            else:
                log.exception("generation failed")
                error = oai.APIError(500, "The generation failed.", code="backbone_error")
            await queue.put((i, {"delta": "", "batch_sizes": [], "finish_reason": "error", "error": error}))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    open_streams = len(streams)
    try:
        while open_streams:
            i, item = await queue.get()
            if item is None:
                open_streams -= 1
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.cancel()


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


class _Timing:
    """Time to first token and time per output token of one request."""

    def __init__(self, arrival: float) -> None:
        self.arrival = arrival
        self.first: float | None = None

    def first_token(self, at: float) -> None:
        if self.first is None:
            self.first = at
            metrics.TTFT.observe(at - self.arrival)

    def token(self, item: dict) -> None:
        for size in item["batch_sizes"]:
            metrics.BATCH_SIZE.observe(size)

    def done(self, completion_tokens: int) -> None:
        metrics.COMPLETION_TOKENS.inc(completion_tokens)
        if self.first is not None and completion_tokens > 1:
            metrics.TPOT.observe((time.perf_counter() - self.first) / (completion_tokens - 1))


@serve.deployment(name="Ingress", max_ongoing_requests=256)
@serve.ingress(app)
class Ingress:
    def __init__(self, aux, backbone, config: dict) -> None:
        self.config = ServerConfig.model_validate(config)
        self.aux, self.backbone = aux, backbone
        self.stream_backbone = backbone.options(stream=True)
        self.store = open_store(self.config.resolved_store())
        self.memory = PreferenceMemory(self.store, Bank.load(self.config.onboarding_questions or DEFAULT_BANK),
                                       self.config.memory_settings())
        self.api_keys = self.config.resolved_api_keys()  # key -> tenant
        self.admin_keys = self.config.resolved_admin_keys()
        self.checkpoint_roots = self.config.resolved_checkpoint_roots()
        self._max_token_chars: int | None = None  # the backbone's, asked once

    # -------------------------------------------------------------------------- plumbing
    @property
    def _open(self) -> bool:
        """No key of either kind configured: the local default, on loopback, where everything is open."""
        return not self.api_keys and not self.admin_keys

    @staticmethod
    def _bearer(request: Request) -> str | None:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        return key.strip() if scheme.lower() == "bearer" else None

    def _authorize(self, request: Request) -> str:
        """An inference route: any configured key (an admin key too). Returns the key's tenant, whose users alone
        the request may read, write or personalize with (admin keys and an open server: the default tenant)."""
        key = self._bearer(request)
        if key in self.api_keys:
            return self.api_keys[key]
        if self._open or key in self.admin_keys:
            return DEFAULT_TENANT
        raise oai.APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    def _is_admin(self, request: Request) -> bool:
        return self._open or self._bearer(request) in self.admin_keys

    def _authorize_admin(self, request: Request) -> None:
        """An /admin route: admin keys only; an inference key is known but not allowed."""
        if self._is_admin(request):
            return
        if self._bearer(request) in self.api_keys:
            raise oai.APIError(403, "This API key may not use the admin API; use an admin key.",
                               code="insufficient_permissions", type="permission_error")
        raise oai.APIError(401, "Incorrect or missing admin key: send 'Authorization: Bearer <admin key>'.",
                           code="invalid_api_key")

    def _checkpoint_path(self, path: str) -> str:
        """`path` if it lies under a checkpoint root, else one refusal that tells nothing about the filesystem."""
        real = os.path.realpath(path) if "\x00" not in path and os.path.isabs(path) else None
        if real is None or not any(real == root or real.startswith(root.rstrip(os.sep) + os.sep)
                                   for root in self.checkpoint_roots):
            raise oai.APIError(400, "Checkpoint refused: only absolute paths under the server's checkpoint roots "
                                    "(checkpoint_roots) can be loaded; the current one keeps serving.",
                               param="checkpoint", code="invalid_checkpoint")
        return path

    def _check_summary(self, summary: str, param: str) -> None:
        if len(summary) > self.config.max_summary_chars:
            raise oai.APIError(400, f"The preference summary is {len(summary)} characters long; the limit is "
                                    f"{self.config.max_summary_chars}.", param=param, code="summary_too_long")
        if THOUGHT_MARKER in summary:
            raise oai.APIError(400, "The preference summary contains a reserved marker.", param=param)

    def _check_request(self, req) -> int:
        if req.model != self.config.served_model_name:
            raise oai.APIError(404, f"The model '{req.model}' does not exist; this server serves "
                                    f"'{self.config.served_model_name}'.", param="model", code="model_not_found")
        max_tokens = req.requested_max_tokens or self.config.default_max_tokens
        if max_tokens > self.config.max_tokens_limit:
            param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
            raise oai.APIError(400, f"max_tokens is {max_tokens}; the limit is {self.config.max_tokens_limit}.",
                               param=param, code="invalid_value")
        if req.n > self.config.max_n:
            raise oai.APIError(400, f"n is {req.n}; at most {self.config.max_n} choices are allowed.", param="n",
                               code="invalid_value")
        return max_tokens

    async def _check_prompt_length(self, payload: dict) -> None:
        """Refuse a prompt that is surely over the token limit by its characters alone, before any tokenizing."""
        if self._max_token_chars is None:
            self._max_token_chars = (await self.backbone.info.remote())["max_token_chars"]
        chat = payload["kind"] == "chat"
        chars = sum(len(m["content"]) for m in payload["messages"]) if chat else len(payload["prompt"])
        if chars > self.config.max_prompt_tokens * self._max_token_chars:
            raise oai.APIError(400, f"The prompt is {chars} characters long, more than {self.config.max_prompt_tokens} "
                                    "tokens can hold.", param="messages" if chat else "prompt",
                               code="context_length_exceeded")

    async def _personalization(self, req, tenant: str) -> tuple[dict, dict]:
        """Soft thoughts for the request, if any: inline preference_summary > stored summary of `user` > none.
        Returns what the backbone needs ("thoughts"; "placement", where they go; "guidance" and "guidance_gate", how
        hard the reply reads them; {} for none) and the response's extension fields."""
        ext = {"summary_source": "none", "aux_version": None, "preference_version": None}
        if req.preference_summary is not None:
            summary, ext["summary_source"] = req.preference_summary, "inline"
            self._check_summary(summary, "preference_summary")
        elif req.user and (pref := await asyncio.to_thread(self.store.get, tenant, req.user)) is not None:
            summary, ext["summary_source"], ext["preference_version"] = pref.summary, "stored", pref.version
        else:
            return {}, ext
        if not summary.strip():
            return {}, {**ext, "summary_source": "none"}
        out = await self.aux.thoughts.remote(summary)
        if "error" in out:
            raise oai.APIError(503, out["error"], code="aux_unavailable", type="service_unavailable")
        metrics.AUX_LATENCY.observe(out["latency_s"])
        (metrics.CACHE_HITS if out["cache_hit"] else metrics.CACHE_MISSES).inc()
        ext.update(aux_version=out["version"], aux_cache_hit=out["cache_hit"],
                   aux_latency_ms=round(1000 * out["latency_s"], 3))
        return {"thoughts": out["thoughts"], "placement": out["placement"], "guidance": out["guidance"],
                "guidance_gate": out["guidance_gate"]}, ext

    async def _start(self, req, payload: dict, max_tokens: int, request_id: str) -> tuple[list, int]:
        """Send n generations to the backbone; return their streams once all are accepted."""
        streams = []
        for i in range(req.n):
            params = {"max_tokens": max_tokens, "temperature": req.temperature, "top_p": req.top_p,
                      "seed": None if req.seed is None else req.seed + i, "stop": req.stop, "ignore_eos": req.ignore_eos,
                      "presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty}
            streams.append(self.stream_backbone.generate.remote({**payload, "params": params,
                                                                 "request_id": f"{request_id}-{i}"}))
        firsts = await asyncio.gather(*(s.__anext__() for s in streams))
        error = next((f["error"] for f in firsts if "error" in f), None)
        if error:
            for s in streams:
                s.cancel()
            param = "prompt" if payload["kind"] == "text" else "messages"
            raise oai.APIError(400, error[0].upper() + error[1:] + ".", param=param, code="invalid_prompt")
        return streams, firsts[0]["prompt_tokens"]

    async def _run(self, req, payload: dict, chat: bool, tenant: str) -> Response:
        arrival = time.perf_counter()
        max_tokens = self._check_request(req)
        await self._check_prompt_length(payload)
        personal, ext = await self._personalization(req, tenant)
        request_id = oai.new_id("chatcmpl" if chat else "cmpl")
        dispatched = time.perf_counter()
        payload = {**payload, **personal, "stream": req.stream}
        streams, prompt_tokens = await self._start(req, payload, max_tokens, request_id)
        metrics.PROMPT_TOKENS.inc(prompt_tokens * req.n)
        timing = _Timing(arrival)
        merged = _merge(streams)
        if req.stream:
            gen = self._stream(req, merged, request_id, chat, ext, prompt_tokens, timing, tenant)
            return StreamingResponse(gen, media_type="text/event-stream")
        texts, reasons, completion, ttfts = [""] * req.n, [None] * req.n, 0, []
        try:
            async with asyncio.timeout(self.config.request_timeout_s):
                async for i, item in merged:
                    timing.token(item)
                    texts[i] += item["delta"]
                    if "finish_reason" in item:
                        reasons[i] = item["finish_reason"]
                        completion += item.get("completion_tokens", 0)
                        if item.get("error"):
                            raise _engine_error(item["error"])
                        ttfts.append(item["ttft_s"])
        except TimeoutError:
            raise oai.APIError(504, f"The request did not finish within {self.config.request_timeout_s} s.",
                               code="timeout", type="timeout") from None
        finally:
            await merged.aclose()
        timing.first_token(dispatched + min(ttfts))  # measured where the first token appeared
        timing.done(completion)
        await self._keep(req, request_id, tenant, texts)
        build = oai.chat_completion if chat else oai.text_completion
        return JSONResponse(build(request_id, req.model, list(zip(texts, reasons)), prompt_tokens, completion, ext))

    async def _keep(self, req, request_id: str, tenant: str, texts: list[str]) -> None:
        """A chat completion the client asked to store, for its user to rate."""
        if getattr(req, "store", False) and req.user:
            await asyncio.to_thread(self.memory.keep, request_id, tenant, req.user, texts)

    async def _stream(self, req, merged, request_id: str, chat: bool, ext: dict, prompt_tokens: int,
                      timing: _Timing, tenant: str) -> AsyncIterator[str]:
        created = oai.now()
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(i, text=None, finish=None, role=False, extension=None):
            if chat:
                delta = ({"role": "assistant", "content": ""} if role else {}) | ({"content": text} if text else {})
                return oai.chat_chunk(request_id, req.model, created, i, delta, finish, include_usage, extension)
            return oai.text_chunk(request_id, req.model, created, i, text or "", finish, include_usage, extension)

        completion, texts = 0, [""] * req.n
        deadline = time.monotonic() + self.config.request_timeout_s
        try:
            if chat:
                for i in range(req.n):
                    yield _sse(chunk(i, role=True, extension=ext if i == 0 else None))
            async for i, item in merged:
                timing.token(item)
                if item["delta"]:
                    timing.first_token(time.perf_counter())
                if item.get("error"):
                    yield _sse(_engine_error(item["error"]).body())
                    return
                finish = item.get("finish_reason")
                texts[i] += item["delta"]
                if item["delta"] or finish:
                    yield _sse(chunk(i, item["delta"], finish, extension=None if chat else ext))
                if finish:
                    completion += item.get("completion_tokens", 0)
                if time.monotonic() > deadline:
                    yield _sse(oai.APIError(504, "The request timed out.", code="timeout", type="timeout").body())
                    return
            timing.done(completion)
            await self._keep(req, request_id, tenant, texts)
            if include_usage:
                yield _sse({"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                            "created": created, "model": req.model, "choices": [],
                            "usage": oai.usage(prompt_tokens, completion)})
            yield _sse("[DONE]")
        finally:
            await merged.aclose()

    # -------------------------------------------------------------------------- routes
    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        tenant = self._authorize(request)
        req = await _parse(request, oai.ChatCompletionRequest, self.config.max_body_bytes)
        return await self._run(req, {"kind": "chat", "messages": req.chat_messages()}, chat=True, tenant=tenant)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        tenant = self._authorize(request)
        req = await _parse(request, oai.CompletionRequest, self.config.max_body_bytes)
        return await self._run(req, {"kind": "text", "prompt": req.prompt}, chat=False, tenant=tenant)

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        return {"object": "list", "data": [{"id": self.config.served_model_name, "object": "model",
                                            "created": 0, "owned_by": "softthought"}]}

    @app.put("/v1/users/{user}/preferences")
    async def put_preferences(self, user: str, request: Request) -> dict:
        tenant = self._authorize(request)
        oai.check_user_id(user)
        body = await _parse(request, oai.PreferenceBody, self.config.max_body_bytes)
        self._check_summary(body.summary, "summary")
        return (await asyncio.to_thread(self.store.put, tenant, user, body.summary)).to_dict()

    @app.get("/v1/users/{user}/preferences")
    async def get_preferences(self, user: str, request: Request) -> dict:
        tenant = self._authorize(request)
        oai.check_user_id(user)
        pref = await asyncio.to_thread(self.store.get, tenant, user)
        if pref is None:
            raise oai.APIError(404, f"No preferences are stored for user '{user}'.", param="user", code="user_not_found")
        return pref.to_dict()

    async def _delete(self, request: Request, user: str, remove, nothing: str) -> dict:
        tenant = self._authorize(request)
        oai.check_user_id(user)
        if not await asyncio.to_thread(remove, tenant, user):
            raise oai.APIError(404, f"{nothing} for user '{user}'.", param="user", code="user_not_found")
        return {"user": user, "deleted": True}

    @app.delete("/v1/users/{user}/preferences")
    async def delete_preferences(self, user: str, request: Request) -> dict:
        return await self._delete(request, user, self.store.delete, "No preferences are stored")

    @app.delete("/v1/users/{user}")
    async def forget_user(self, user: str, request: Request) -> dict:
        """Everything stored for the user (a right to be forgotten): the summary, onboarding sessions, the answers and
        ratings it was learned from, and the completions kept for rating."""
        return await self._delete(request, user, self.store.forget, "Nothing is stored")

    @app.post("/v1/users/{user}/onboarding")
    async def start_onboarding(self, user: str, request: Request) -> dict:
        """A session that learns the user's preferences from their choices; its first question."""
        tenant = self._authorize(request)
        oai.check_user_id(user)
        return await asyncio.to_thread(self.memory.start, tenant, user)

    @app.post("/v1/users/{user}/onboarding/{session}/answers")
    async def answer_onboarding(self, user: str, session: str, request: Request) -> dict:
        """The user's choice for the session's question: the next question, or the learned summary once done."""
        tenant = self._authorize(request)
        oai.check_user_id(user)
        body = await _parse(request, oai.OnboardingAnswer, self.config.max_body_bytes)
        out = await asyncio.to_thread(self.memory.answer, tenant, user, session, body.question, body.choice)
        if out["done"]:
            metrics.SUMMARIES_LEARNED.labels("onboarding").inc()
        return out

    @app.post("/v1/feedback")
    async def feedback(self, request: Request) -> dict:
        """A rating of a stored completion: evidence for the user's preferences, which may revise a learned summary."""
        tenant = self._authorize(request)
        body = await _parse(request, oai.FeedbackBody, self.config.max_body_bytes)
        out = await asyncio.to_thread(self.memory.rate, tenant, body.user, body.id, body.rating, body.choice)
        metrics.RATINGS.labels("up" if body.rating > 0 else "down").inc()
        if out["summary_revised"]:
            metrics.SUMMARIES_LEARNED.labels("feedback").inc()
        return out

    @app.get("/admin/aux")
    async def aux_info(self, request: Request) -> dict:
        self._authorize_admin(request)
        return await self.aux.info.remote()

    @app.post("/admin/aux")
    async def rollout(self, request: Request) -> dict:
        """Switch every Aux replica to a new checkpoint without downtime; a bad checkpoint changes nothing."""
        self._authorize_admin(request)
        body = await _parse(request, oai.RolloutBody, self.config.max_body_bytes)
        self._checkpoint_path(body.checkpoint)
        start = time.perf_counter()
        backbone, before = await asyncio.gather(self.backbone.info.remote(), self.aux.info.remote())
        try:
            version = await asyncio.to_thread(validate_checkpoint, body.checkpoint, backbone)
        except CheckpointError as exc:
            raise oai.APIError(400, f"Checkpoint refused, the current one keeps serving: {exc}", param="checkpoint",
                               code="invalid_checkpoint") from None
        if version != before["version"]:
            await asyncio.to_thread(apply_checkpoint, serve.get_replica_context().app_name, body.checkpoint)
            deadline = time.monotonic() + self.config.request_timeout_s
            while (info := await self.aux.info.remote())["version"] != version:
                if info.get("last_error") and body.checkpoint in info["last_error"]:
                    raise oai.APIError(400, info["last_error"], param="checkpoint", code="invalid_checkpoint")
                if time.monotonic() > deadline:
                    raise oai.APIError(504, "The Aux replicas did not switch in time.", code="timeout", type="timeout")
                await asyncio.sleep(0.2)
        return {"checkpoint": body.checkpoint, "version": version, "previous_version": before["version"],
                "changed": version != before["version"], "rollout_s": round(time.perf_counter() - start, 3)}

    @app.get("/health")
    async def health(self, request: Request) -> JSONResponse:
        """200 once both models answer, 503 until then or while a replica is down; nothing else. The models' details
        (names, versions, the checkpoint's path) only for an admin key, or on an open server."""
        try:
            async with asyncio.timeout(2):
                backbone, aux = await asyncio.gather(self.backbone.info.remote(), self.aux.info.remote())
        except Exception as exc:  # models still loading, a replica down, or the probe's own time-out
            log.info("not ready: %s", exc)
            return JSONResponse({"status": "loading"}, status_code=503)
        if not self._is_admin(request):
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "ok", "model": self.config.served_model_name, "backbone": backbone, "aux": aux})

    @app.get("/metrics")
    async def prometheus(self) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
