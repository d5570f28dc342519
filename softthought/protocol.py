"""OpenAI wire format (requests, responses, stream chunks, errors) as pydantic models.

Unknown request parameters are rejected with a 400 naming them. A few that clients commonly send are
accepted at their no-op values only (logprobs off, text response format), as vLLM does for
parameters it cannot honour; any other value is rejected rather than silently ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StringConstraints, field_validator, model_validator

Role = Literal["system", "developer", "user", "assistant"]
#: One rule for a user id wherever it appears (the `user` field, the preference routes' path).
USER_ID_MAX = 256
UserId = Annotated[str, StringConstraints(max_length=USER_ID_MAX, pattern=r"^[^\x00-\x1f\x7f]*$")]
#: How deep a request body's JSON may nest: OpenAI's requests need 5 levels, so 32 refuses only abuse.
MAX_JSON_DEPTH = 32


class APIError(Exception):
    """An error to return to the client in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def check_user_id(user: str, param: str = "user") -> None:
    """The same rule as the `user` field's, for a user id that comes in a path."""
    if not 1 <= len(user) <= USER_ID_MAX or any(ord(c) < 0x20 or ord(c) == 0x7F for c in user):
        raise APIError(400, f"A user id must be 1 to {USER_ID_MAX} characters long, without control characters.",
                       param=param, code="invalid_value")


def check_json_tree(data: Any) -> None:
    """Refuse what JSON allows but a request never needs: nesting deeper than MAX_JSON_DEPTH, and strings that are
    not Unicode (a lone surrogate such as "\\ud800", which no tokenizer or database can encode). Iterative, so a
    hostile depth cannot exhaust the stack."""
    stack = [(data, (), 1)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"The request body nests deeper than {MAX_JSON_DEPTH} levels.", code="invalid_json")
        if isinstance(value, str) and not _is_unicode(value):
            raise _not_unicode(path)
        if isinstance(value, dict):
            for key, item in value.items():
                if not _is_unicode(key):  # named by where it sits: the key itself cannot be written back
                    raise _not_unicode(path)
                stack.append((item, (*path, key), depth + 1))
        elif isinstance(value, list):
            stack.extend((item, (*path, i), depth + 1) for i, item in enumerate(value))


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _not_unicode(path: tuple) -> APIError:
    param = ".".join(map(str, path)) or None
    where = f"'{param}'" if param else "the request body"
    return APIError(400, f"Invalid value in {where}: a string is not valid Unicode (a lone surrogate).", param=param,
                    code="invalid_value")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Role
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class _SamplingRequest(_Strict):
    model: str
    # integers and booleans as strictly as OpenAI's API takes them: "8" is no integer, "yes" no boolean
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, strict=True)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, strict=True)
    seed: StrictInt | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # OpenAI's: a signed 64-bit integer
    stop: str | list[str] | None = None
    n: StrictInt = Field(default=1, ge=1)
    user: UserId | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    # softthought extension: a preference summary for this request only (overrides the stored one)
    preference_summary: str | None = None
    # vLLM's extension: keep generating past end-of-sequence up to max_tokens (benchmarks use it for equal work)
    ignore_eos: StrictBool = False
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, strict=True)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, strict=True)
    # accepted at its no-op value only
    logprobs: StrictBool | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return stops

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v:
            raise ValueError("logprobs are not supported")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    # OpenAI's: keep the completion; here, with a `user`, so that the user may rate it (POST /v1/feedback)
    store: StrictBool = False
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    response_format: dict | None = None

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v):
        if v is not None and v.get("type") != "text":
            raise ValueError("only response_format {'type': 'text'} is supported")
        return v

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def chat_messages(self) -> list[dict]:
        # "developer" is OpenAI's newer name for the system role.
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str]
    echo: StrictBool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("exactly one prompt per request is supported")
            v = v[0]
        if not v:
            raise ValueError("prompt must not be empty")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        if v:
            raise ValueError("echo is not supported")
        return v

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class PreferenceBody(_Strict):
    summary: str


class OnboardingAnswer(_Strict):
    question: str = Field(min_length=1, max_length=64)
    choice: str = Field(min_length=1, max_length=64, description="an option's id, or 'neither'")


class FeedbackBody(_Strict):
    id: str = Field(min_length=1, max_length=128, description="the rated completion's id, from this server")
    user: UserId | None = Field(None, min_length=1, description="the completion's user; refused if it is not")
    rating: StrictInt = Field(description="1 (liked) or -1 (disliked)")
    choice: StrictInt = Field(default=0, ge=0, description="which of the completion's choices is rated")

    @field_validator("rating")
    @classmethod
    def _up_or_down(cls, v):
        if v not in (1, -1):
            raise ValueError("a rating is 1 (liked) or -1 (disliked)")
        return v


class RolloutBody(_Strict):
    checkpoint: str = Field(min_length=1, description="auxiliary checkpoint directory, readable by every Aux replica")


# ---------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens).model_dump()


def chat_completion(id: str, model: str, choices: list[tuple[str, str]], prompt_tokens: int,
                    completion_tokens: int, extension: dict) -> dict:
    return {
        "id": id,
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": reason}
            for i, (text, reason) in enumerate(choices)
        ],
        "usage": usage(prompt_tokens, completion_tokens),
        "softthought": extension,
    }


def _chunk(id: str, obj: str, model: str, created: int, choice: dict, with_usage_field: bool,
           extension: dict | None) -> dict:
    """One SSE chunk; `usage: null` appears on every chunk when the client asked for a usage chunk."""
    chunk: dict[str, Any] = {"id": id, "object": obj, "created": created, "model": model, "choices": [choice]}
    if with_usage_field:
        chunk["usage"] = None
    if extension is not None:
        chunk["softthought"] = extension
    return chunk


def chat_chunk(id: str, model: str, created: int, index: int, delta: dict, finish_reason: str | None,
               with_usage_field: bool, extension: dict | None = None) -> dict:
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return _chunk(id, "chat.completion.chunk", model, created, choice, with_usage_field, extension)


def text_completion(id: str, model: str, choices: list[tuple[str, str]], prompt_tokens: int,
                    completion_tokens: int, extension: dict) -> dict:
    return {
        "id": id,
        "object": "text_completion",
        "created": now(),
        "model": model,
        "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                    for i, (text, reason) in enumerate(choices)],
        "usage": usage(prompt_tokens, completion_tokens),
        "softthought": extension,
    }


def text_chunk(id: str, model: str, created: int, index: int, text: str, finish_reason: str | None,
               with_usage_field: bool, extension: dict | None = None) -> dict:
    choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return _chunk(id, "text_completion", model, created, choice, with_usage_field, extension)
