"""What a request may send and what a refusal looks like: `Settings` (the bounds), the strict request
bodies, `ApiError` with its OpenAI-shaped body, and reading a body under a size limit and a deadline.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from behemoth.errors import ConfigError

ERROR_TYPES = {**dict.fromkeys((400, 404, 405, 408, 413, 415), "invalid_request_error"),
               401: "authentication_error", 403: "permission_error", 429: "rate_limit_error", 503: "server_overloaded"}


@dataclass
class Settings:
    """Bounds on what a request may ask for; each is checked with a 4xx naming the parameter."""

    max_body_bytes: int = 1 << 20
    max_tokens_limit: int = 4096      # upper bound on max_tokens
    default_max_tokens: int = 256     # when a request does not say (capped at the context left)
    max_choices: int = 8              # n times the number of prompts
    max_logprobs: int = 5             # /v1/completions `logprobs`, as OpenAI
    max_top_logprobs: int = 20        # /v1/chat/completions `top_logprobs`, as OpenAI
    max_stop: int = 4                 # stop strings, as OpenAI
    max_stop_chars: int = 256
    body_timeout_s: int = 30          # a body still arriving after this gets 408 (a trickling client)

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"server setting {name} must be a positive integer, got {value!r}")
        if self.default_max_tokens > self.max_tokens_limit:
            self.default_max_tokens = self.max_tokens_limit


class ApiError(Exception):
    """Becomes an OpenAI-shaped error response."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.param, self.headers = status, code, param, headers
        self.type = type or ERROR_TYPES.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"Request body too large: the limit is {limit} bytes.", "request_too_large")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class Body(_Strict):
    """What /v1/completions and /v1/chat/completions bodies share."""

    model: str = Field(max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = Field(None, max_length=256)
    # Extensions under the names vLLM uses (the openai client sends them with `extra_body`).
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    ignore_eos: bool = False

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionBody(Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0 only with echo: the prompt scored, nothing generated
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(None, max_length=64)


class ChatBody(Body):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=1)


def _validation_error(err: ValidationError) -> ApiError:
    first = err.errors(include_url=False)[0]
    param = ".".join(str(part) for part in first.get("loc", ()) if not str(part).startswith("function-"))
    message = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {param}", "invalid_request_error", param)
    return ApiError(400, f"Invalid value for '{param}': {message}" if param else message, "invalid_value",
                    param or None)


async def read_body(request: Request, settings: Settings, chat: bool) -> Body:
    """The JSON body as a ChatBody or CompletionBody, read with a running size check (Content-Length
    may lie) and a deadline (a client trickling its body must not hold a task forever)."""
    limit, timeout = settings.max_body_bytes, settings.body_timeout_s
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type not in ("application/json", ""):
        raise ApiError(415, f"Content-Type must be application/json, not {content_type[:64]!r}.",
                       "unsupported_media_type")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large(limit)
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, f"The request body did not arrive within {timeout:g} seconds.", "request_timeout",
                       headers={"Connection": "close"}) from None
    try:
        data = json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(400, f"We could not parse the JSON body of your request ({err}).", "invalid_json") from None
    except RecursionError:
        raise ApiError(400, "We could not parse the JSON body of your request (nested too deeply).",
                       "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.", "invalid_json")
    try:
        return (ChatBody if chat else CompletionBody).model_validate(data)
    except ValidationError as err:
        raise _validation_error(err) from None
