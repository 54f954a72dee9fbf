"""The OpenAI-compatible API and the chat page: `create_app(...)` and `serve(...)`.

Routes:
    GET  /                      the chat page (static HTML/JS/CSS from `static/`)
    GET  /health                {"status": "ok"}
    GET  /metrics               Prometheus text: requests, tokens, latency histograms, queue depth
    GET  /v1/models             the served models (those the key may use)
    GET  /v1/models/{name}
    POST /v1/completions        text completion (streaming over SSE with "stream": true)
    POST /v1/chat/completions   chat completion through the tokenizer's chat template

Closed means closed: every path under /v1 passes the key check (`_KeyGate`) before routing, so a
route cannot be added without it. Bad input always gets a 4xx with an OpenAI-shaped body,
`{"error": {"message", "type", "param", "code"}}`; a 500 means a bug. Model names are looked up
in the dict of configured models and nothing else, so a name never reaches the file system. No
route returns weights, files, full logits (top_logprobs is capped) or anything about other keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from behemoth.errors import ConfigError
from behemoth.serve.audit import AuditLog
from behemoth.serve.engine import (Engine, EngineClosed, PromptTooLong, QueueFull, SamplingParams,
                                   leave_cores_to_engines)
from behemoth.serve.weights import prepare_weights
from behemoth.serve.keys import AuthError, KeyRecord, KeyStore
from behemoth.serve.limits import RateLimited, RateLimiter
from behemoth.serve.metrics import CONTENT_TYPE, Gauge, ServerMetrics
from behemoth.serve.prompts import TokenText
from behemoth.tokenizer import Tokenizer

log = logging.getLogger("behemoth.serve")

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
API_PREFIX = "/v1"
STATIC_FILES = {"/": ("chat.html", "text/html; charset=utf-8"),
                "/static/chat.js": ("chat.js", "text/javascript; charset=utf-8"),
                "/static/chat.css": ("chat.css", "text/css; charset=utf-8")}
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 405: "invalid_request_error", 408: "invalid_request_error",
               413: "invalid_request_error",
               415: "invalid_request_error", 429: "rate_limit_error", 503: "server_overloaded"}
NEG_INF_LOGPROB = -9999.0  # what OpenAI reports for a token of probability zero


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------

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


@dataclass
class ServedModel:
    """A model the server answers for: its engine (owned by the app), tokenizer and context."""

    name: str
    engine: Engine
    tokenizer: Tokenizer
    context: int
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not MODEL_NAME.match(self.name):
            raise ConfigError(f"model name {self.name!r}: use 1-64 letters, digits or ._- starting with a letter "
                              "or digit")
        self.text = TokenText(self.tokenizer)


class ApiError(Exception):
    """Becomes an OpenAI-shaped error response."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.param, self.headers = status, code, param, headers
        self.type = type or ERROR_TYPES.get(status, "server_error")


def error_response(err: ApiError) -> JSONResponse:
    body = {"error": {"message": str(err), "type": err.type, "param": err.param, "code": err.code}}
    return JSONResponse(body, status_code=err.status, headers=err.headers)


# ------------------------------------------------------------------------------------------------
# Request bodies
# ------------------------------------------------------------------------------------------------

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

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


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(None, max_length=64)


class ChatBody(_Body):
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


async def _read_json(request: Request, limit: int, timeout: float) -> Any:
    """The JSON body, read with a running size check (a missing or lying Content-Length too) and a
    deadline: a client trickling its body would otherwise hold a connection and a task forever."""
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
                    raise ApiError(413, f"Request body too large: the limit is {limit} bytes.", "request_too_large")
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
    return data


def _finite(value: float | None) -> float | None:
    if value is None:
        return None
    return float(value) if math.isfinite(value) else NEG_INF_LOGPROB


# ------------------------------------------------------------------------------------------------
# Bookkeeping: one audit line and the metrics of each call
# ------------------------------------------------------------------------------------------------

class _State:
    def __init__(self, models: dict[str, ServedModel], keys: KeyStore, settings: Settings,
                 audit: AuditLog | None, limiter: RateLimiter):
        self.models, self.keys, self.settings, self.audit, self.limiter = models, keys, settings, audit, limiter
        self.metrics = ServerMetrics()
        self.metrics.gauges += [
            Gauge("behemoth_queue_depth", "Requests waiting for a batch slot.", ("model",),
                  lambda: self._stat("queue_depth")),
            Gauge("behemoth_running_requests", "Requests in the running batch.", ("model",),
                  lambda: self._stat("running")),
        ]

    def _stat(self, name: str) -> dict[tuple[str, ...], float]:
        values = {}
        for model in self.models.values():
            try:
                values[(model.name,)] = float(model.engine.stats().get(name, 0))
            except Exception:  # a scrape must not fail because one engine is closing
                continue
        return values


class _Call:
    """Metrics and the audit line of one API call, written exactly once by `done`."""

    def __init__(self, state: _State, route: str, key: KeyRecord | None, request_id: str):
        self.state, self.route, self.key, self.request_id = state, route, key, request_id
        self.start = time.perf_counter()
        self.model: str | None = None
        self.stream = False
        self.prompt_tokens = self.completion_tokens = 0
        self.first_token: float | None = None
        self.finish_reasons: list[str] = []
        self.text: dict[str, Any] = {}  # prompt / messages / completion: audited only with --log-prompts
        self._done = False

    def token_seen(self) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter() - self.start

    def done(self, status: int, error: str | None = None) -> None:
        if self._done:
            return
        self._done = True
        elapsed = time.perf_counter() - self.start
        metrics, model = self.state.metrics, self.model or ""
        metrics.requests.inc(self.route, model, str(status))
        metrics.latency.observe(self.route, model, value=elapsed)
        if self.prompt_tokens or self.completion_tokens:
            metrics.prompt_tokens.inc(model, amount=self.prompt_tokens)
            metrics.completion_tokens.inc(model, amount=self.completion_tokens)
        if self.first_token is not None:
            metrics.first_token.observe(model, value=self.first_token)
        if self.state.audit is not None:
            record: dict[str, Any] = {
                "request_id": self.request_id, "key_id": self.key.id if self.key else None, "route": self.route,
                "model": self.model, "status": status, "stream": self.stream,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "latency_ms": round(elapsed * 1000, 1), "finish_reasons": self.finish_reasons or None,
                "error": error}
            self.state.audit.write(**record, **self.text)


def _route_label(path: str) -> str:
    if path in ("/v1/completions", "/v1/chat/completions", "/v1/models"):
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


class _KeyGate:
    """ASGI middleware: the key check for every path under /v1, and the body size limit.

    It runs before routing, so an unknown /v1 path is a 401 to a caller without a key, not a 404.
    """

    def __init__(self, app: Any, state: _State):
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = Headers(scope=scope)
        length = headers.get("content-length")
        limit = self.state.settings.max_body_bytes
        if length is not None and not length.isdigit():
            err = ApiError(400, "Malformed Content-Length header.", "invalid_request_error")
            return await error_response(err)(scope, receive, send)
        if length is not None and int(length) > limit:
            err = ApiError(413, f"Request body too large: the limit is {limit} bytes.", "request_too_large")
            return await error_response(err)(scope, receive, send)
        if path == API_PREFIX or path.startswith(API_PREFIX + "/"):
            try:
                scope["behemoth.key"] = self.state.keys.authenticate(headers.get("authorization"))
            except AuthError as err:
                call = _Call(self.state, _route_label(path), None, _request_id("req"))
                call.done(err.status, err.code)
                return await error_response(ApiError(err.status, str(err), err.code))(scope, receive, send)
        await self.app(scope, receive, send)


def _request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------

@dataclass
class _Choice:
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    request: Any = None
    text: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    tops: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    chars: int = 0  # characters of text so far (text_offset of completions logprobs)


@dataclass
class _Job:
    """A validated generation request: what to run and how to report it."""

    chat: bool
    model: ServedModel
    prompts: list[list[int]]
    choices: list[_Choice]
    top_logprobs: int | None    # None: no logprobs; else how many alternatives per token
    stream: bool
    include_usage: bool
    stop_ids: set[int]
    id: str
    created: int = field(default_factory=lambda: int(time.time()))


async def _events(choices: list[_Choice]) -> AsyncIterator[tuple[_Choice, Any]]:
    """Events of all choices' engine requests, as they come; unfinished ones are cancelled on exit."""
    if len(choices) == 1:
        try:
            async for event in choices[0].request:
                yield choices[0], event
        finally:
            if choices[0].finish_reason is None:
                choices[0].request.cancel()
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(choice: _Choice) -> None:
        try:
            async for event in choice.request:
                queue.put_nowait((choice, event))
        except Exception as err:  # re-raised in the consumer
            queue.put_nowait((choice, err))
        finally:
            queue.put_nowait((choice, end))

    tasks = [asyncio.create_task(pump(choice)) for choice in choices]
    try:
        running = len(tasks)
        while running:
            choice, item = await queue.get()
            if item is end:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield choice, item
    finally:
        for task in tasks:
            task.cancel()
        for choice in choices:
            if choice.finish_reason is None:
                choice.request.cancel()


def _apply(job: _Job, choice: _Choice, event: Any) -> bool:
    """Record one engine event; False for an end token (its event carries only held-back text:
    the token itself is not part of the reply, so it gets no logprobs entry)."""
    if event.finish_reason is not None:
        choice.finish_reason = event.finish_reason
    choice.text.append(event.text)
    if event.finish_reason == "stop" and event.token_id in job.stop_ids:
        return False
    choice.tokens.append(event.token_id)
    choice.logprobs.append(event.logprob)
    choice.tops.append(list(event.top_logprobs or [])[: job.top_logprobs or 0])
    return True


def _chat_logprobs(job: _Job, choice: _Choice, start: int) -> dict[str, Any]:
    text = job.model.text
    content = []
    for token, logprob, tops in zip(choice.tokens[start:], choice.logprobs[start:], choice.tops[start:]):
        content.append({"token": text.text(token), "logprob": _finite(logprob), "bytes": list(text.bytes(token)),
                        "top_logprobs": [{"token": text.text(t), "logprob": _finite(lp), "bytes": list(text.bytes(t))}
                                         for t, lp in tops]})
    return {"content": content}


def _completion_logprobs(job: _Job, choice: _Choice, start: int, offset: int) -> dict[str, Any]:
    text = job.model.text
    tokens, offsets = [], []
    for token in choice.tokens[start:]:
        tokens.append(text.text(token))
        offsets.append(offset)
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [_finite(lp) for lp in choice.logprobs[start:]],
            "top_logprobs": [{text.text(t): _finite(lp) for t, lp in tops} for tops in choice.tops[start:]],
            "text_offset": offsets}


def _usage(job: _Job) -> dict[str, int]:
    prompt = sum(len(p) for p in job.prompts)
    completion = sum(_completion_tokens(c) for c in job.choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion_tokens(choice: _Choice) -> int:
    counted = getattr(choice.request, "completion_tokens", None) if choice.request is not None else None
    return counted if isinstance(counted, int) else len(choice.tokens)


def _submit(job: _Job) -> None:
    """Submit every choice to the engine; on any failure cancel those already submitted."""
    try:
        for choice in job.choices:
            choice.request = job.model.engine.submit(choice.prompt_ids, choice.params)
    except PromptTooLong as err:
        _cancel(job)
        raise ApiError(400, str(err), "context_length_exceeded", "messages" if job.chat else "prompt") from None
    except (QueueFull, EngineClosed):
        _cancel(job)
        raise ApiError(503, "The server is busy; retry shortly.", "server_overloaded",
                       headers={"Retry-After": "1"}) from None
    except ConfigError as err:
        _cancel(job)
        raise ApiError(400, str(err), "invalid_value", getattr(err, "field", None)) from None
    except BaseException:
        _cancel(job)
        raise


def _cancel(job: _Job) -> None:
    for choice in job.choices:
        if choice.request is not None:
            choice.request.cancel()


async def _run_job(state: _State, call: _Call, job: _Job, ticket: Any) -> Response:
    """Run a submitted job: a JSON response, or an SSE stream. Settles the ticket, ends the call."""
    def finish(status: int, error: str | None = None) -> None:
        usage = _usage(job)
        call.prompt_tokens, call.completion_tokens = usage["prompt_tokens"], usage["completion_tokens"]
        call.finish_reasons = [c.finish_reason or "cancelled" for c in job.choices]
        if state.audit is not None and state.audit.log_prompts:
            call.text["completion"] = ["".join(c.text) for c in job.choices]
        ticket.settle(usage["total_tokens"])
        call.done(status, error)

    if not job.stream:
        try:
            async with contextlib.aclosing(_events(job.choices)) as events:
                async for choice, event in events:
                    call.token_seen()
                    _apply(job, choice, event)
        except EngineClosed:  # the server is stopping: a clean, retryable error rather than a 500
            finish(503, "EngineClosed")
            raise _shutting_down() from None
        except BaseException as err:
            finish(500 if isinstance(err, Exception) else 499, type(err).__name__)
            raise
        finish(200)
        return JSONResponse(_full_response(job), headers={"x-request-id": job.id})

    async def stream() -> AsyncIterator[str]:
        status, error = 499, "client closed the stream"
        try:
            for choice in job.choices:
                if job.chat:
                    yield _sse(_chat_chunk(job, choice, {"role": "assistant", "content": ""}, None, None))
            async with contextlib.aclosing(_events(job.choices)) as events:
                async for choice, event in events:
                    call.token_seen()
                    start, offset = len(choice.tokens), choice.chars
                    counted = _apply(job, choice, event)
                    delta_text = event.text
                    choice.chars += len(delta_text)
                    logprobs = None
                    if job.top_logprobs is not None and counted:
                        logprobs = (_chat_logprobs(job, choice, start) if job.chat
                                    else _completion_logprobs(job, choice, start, offset))
                    if job.chat:
                        if delta_text or logprobs:
                            yield _sse(_chat_chunk(job, choice, {"content": delta_text}, logprobs, None))
                        if event.finish_reason is not None:
                            yield _sse(_chat_chunk(job, choice, {}, None, event.finish_reason))
                    else:
                        yield _sse(_completion_chunk(job, choice, delta_text, logprobs, event.finish_reason))
            if job.include_usage:
                chunk = (_chat_chunk(job, None, {}, None, None) if job.chat
                         else _completion_chunk(job, None, "", None, None))
                yield _sse({**chunk, "choices": [], "usage": _usage(job)})
            yield "data: [DONE]\n\n"
            status, error = 200, None
        except EngineClosed:
            status, error = 503, "EngineClosed"
            failure = _shutting_down()
            yield _sse({"error": {"message": str(failure), "type": failure.type, "param": None, "code": failure.code}})
        except Exception:
            log.exception("generation failed in %s", job.id)
            status, error = 500, "engine error"
            yield _sse({"error": {"message": "The server failed while generating.", "type": "server_error",
                                  "param": None, "code": None}})
        finally:
            finish(status, error)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "x-request-id": job.id})


def _shutting_down() -> ApiError:
    return ApiError(503, "The server is shutting down; retry shortly.", "server_shutting_down",
                    headers={"Retry-After": "1"})


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _chat_chunk(job: _Job, choice: _Choice | None, delta: dict, logprobs: dict | None, finish: str | None) -> dict:
    chunk: dict[str, Any] = {"id": job.id, "object": "chat.completion.chunk", "created": job.created,
                             "model": job.model.name, "choices": []}
    if choice is not None:
        chunk["choices"] = [{"index": choice.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]
    return chunk


def _completion_chunk(job: _Job, choice: _Choice | None, text: str, logprobs: dict | None, finish: str | None) -> dict:
    chunk: dict[str, Any] = {"id": job.id, "object": "text_completion", "created": job.created,
                             "model": job.model.name, "choices": []}
    if choice is not None:
        chunk["choices"] = [{"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": finish}]
    return chunk


def _full_response(job: _Job) -> dict[str, Any]:
    choices = []
    for choice in job.choices:
        text = "".join(choice.text)
        logprobs = None
        if job.top_logprobs is not None:
            logprobs = _chat_logprobs(job, choice, 0) if job.chat else _completion_logprobs(job, choice, 0, 0)
        if job.chat:
            choices.append({"index": choice.index, "message": {"role": "assistant", "content": text},
                            "logprobs": logprobs, "finish_reason": choice.finish_reason})
        else:
            choices.append({"index": choice.index, "text": text, "logprobs": logprobs,
                            "finish_reason": choice.finish_reason})
    return {"id": job.id, "object": "chat.completion" if job.chat else "text_completion", "created": job.created,
            "model": job.model.name, "choices": choices, "usage": _usage(job)}


# ------------------------------------------------------------------------------------------------
# Turning a request body into a job
# ------------------------------------------------------------------------------------------------

def _lookup_model(state: _State, key: KeyRecord, name: str) -> ServedModel:
    """Configured models by name only; a model the key may not use looks like a missing one."""
    model = state.models.get(name)
    if model is None or not key.allows_model(name):
        shown = name if len(name) <= 64 else name[:64] + "..."
        raise ApiError(404, f"The model '{shown}' does not exist or you do not have access to it.",
                       "model_not_found", "model")
    return model


def _check_common(state: _State, body: _Body) -> None:
    settings = state.settings
    if body.presence_penalty or body.frequency_penalty:
        param = "presence_penalty" if body.presence_penalty else "frequency_penalty"
        raise ApiError(400, f"{param} is not supported (use repetition_penalty); send 0.", "unsupported_parameter",
                       param)
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > settings.max_stop or any(not s or len(s) > settings.max_stop_chars for s in stops):
        raise ApiError(400, f"stop: at most {settings.max_stop} non-empty strings of at most "
                            f"{settings.max_stop_chars} characters.", "invalid_value", "stop")


def _max_tokens(state: _State, model: ServedModel, requested: int | None, prompt_len: int, param: str) -> int:
    settings = state.settings
    if requested is not None and requested > settings.max_tokens_limit:
        raise ApiError(400, f"{param} must be at most {settings.max_tokens_limit}, got {requested}.", "invalid_value",
                       param)
    room = model.context - prompt_len
    if requested is None:
        requested = min(settings.default_max_tokens, room)
        if requested >= 1:
            return requested
        requested = 1
    if prompt_len + requested > model.context:
        raise ApiError(400, f"This model's maximum context length is {model.context} tokens. However, you requested "
                            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} in the "
                            f"completion). Please reduce the length of the prompt or {param}.",
                       "context_length_exceeded", param)
    return requested


def _build_job(state: _State, call: _Call, body: _Body, chat: bool) -> _Job:
    key: KeyRecord = call.key  # type: ignore[assignment]
    settings = state.settings
    model = _lookup_model(state, key, body.model)
    call.model = model.name
    _check_common(state, body)
    tok = model.tokenizer
    if chat:
        assert isinstance(body, ChatBody)
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                    for m in body.messages]
        call.text["messages"] = messages
        prompts = [model.text.chat_prompt_ids(messages)]
        stop_ids = {tok.eos_id, tok.eot_id} | set(getattr(model.engine, "eos_token_ids", ()))
        max_tokens_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if body.top_logprobs is not None and body.top_logprobs > settings.max_top_logprobs:
            raise ApiError(400, f"top_logprobs must be at most {settings.max_top_logprobs}.", "invalid_value",
                           "top_logprobs")
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs requires logprobs to be true.", "invalid_value", "top_logprobs")
        top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    else:
        assert isinstance(body, CompletionBody)
        if body.echo:
            raise ApiError(400, "echo is not supported.", "unsupported_parameter", "echo")
        if body.suffix:
            raise ApiError(400, "suffix is not supported.", "unsupported_parameter", "suffix")
        if body.best_of not in (None, 1):
            raise ApiError(400, "best_of is not supported; use n.", "unsupported_parameter", "best_of")
        if body.logprobs is not None and body.logprobs > settings.max_logprobs:
            raise ApiError(400, f"logprobs must be at most {settings.max_logprobs}.", "invalid_value", "logprobs")
        prompts = _completion_prompts(model, body.prompt)
        call.text["prompt"] = body.prompt
        stop_ids = {tok.eos_id} | set(getattr(model.engine, "eos_token_ids", ()))
        max_tokens_param, requested = "max_tokens", body.max_tokens
        top_logprobs = body.logprobs
    if len(prompts) * body.n > settings.max_choices:
        raise ApiError(400, f"n times the number of prompts must be at most {settings.max_choices}.",
                       "invalid_value", "n")
    choices = []
    for p, prompt in enumerate(prompts):
        max_tokens = _max_tokens(state, model, requested, len(prompt), max_tokens_param)
        for j in range(body.n):
            params = SamplingParams(
                max_new_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
                stop_token_ids=[] if body.ignore_eos else sorted(stop_ids),
                seed=None if body.seed is None else body.seed + j,
                logprobs=top_logprobs or 0, ignore_eos=body.ignore_eos)
            try:
                params.validate()
            except ConfigError as err:
                raise ApiError(400, str(err), "invalid_value", getattr(err, "field", None)) from None
            choices.append(_Choice(index=p * body.n + j, prompt_ids=prompt, params=params))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options is only allowed with stream: true.", "invalid_value", "stream_options")
    call.request_id = _request_id("chatcmpl" if chat else "cmpl")  # the response's id names the audit line
    return _Job(chat=chat, model=model, prompts=prompts, choices=choices, top_logprobs=top_logprobs,
                stream=body.stream, include_usage=include_usage, stop_ids=stop_ids, id=call.request_id)


def _completion_prompts(model: ServedModel, prompt: Any) -> list[list[int]]:
    vocab = model.tokenizer.vocab_size
    if isinstance(prompt, str):
        prompts = [model.tokenizer.encode(prompt)]
    elif prompt and all(isinstance(p, str) for p in prompt):
        prompts = [model.tokenizer.encode(p) for p in prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    elif prompt and all(isinstance(p, list) for p in prompt):
        prompts = [list(p) for p in prompt]
    else:
        raise ApiError(400, "prompt must be a string, a list of strings, or token ids.", "invalid_value", "prompt")
    for ids in prompts:
        if not ids:
            raise ApiError(400, "prompt must not be empty.", "invalid_value", "prompt")
        if any(not 0 <= t < vocab for t in ids):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab}).", "invalid_value", "prompt")
    return prompts


# ------------------------------------------------------------------------------------------------
# The application
# ------------------------------------------------------------------------------------------------

def create_app(models: Iterable[ServedModel], keys: KeyStore, settings: Settings | None = None,
               audit: AuditLog | None = None, limiter: RateLimiter | None = None) -> FastAPI:
    """The app; it starts the models' engines on startup and closes them (and the audit log) on shutdown."""
    served = {}
    for model in models:
        if model.name in served:
            raise ConfigError(f"two models are named {model.name!r}")
        served[model.name] = model
    if not served:
        raise ConfigError("no model to serve")
    state = _State(served, keys, settings or Settings(), audit, limiter or RateLimiter())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        for model in served.values():
            model.engine.start()
        try:
            yield
        finally:
            for model in served.values():
                model.engine.close()
            if audit is not None:
                audit.close()

    app = FastAPI(title="behemoth", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.behemoth = state
    app.add_middleware(_KeyGate, state=state)

    @app.exception_handler(ApiError)
    async def on_api_error(_: Request, err: ApiError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        message = {404: "Not found.", 405: "Method not allowed."}.get(err.status_code, str(err.detail))
        return error_response(ApiError(err.status_code, message, "not_found" if err.status_code == 404 else None))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        return error_response(ApiError(400, "Invalid request.", "invalid_request_error"))

    @app.exception_handler(Exception)
    async def on_bug(_: Request, err: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=err)
        return error_response(ApiError(500, "The server had an error while processing your request.", None,
                                       type="server_error"))

    def begin(request: Request, route: str) -> _Call:
        return _Call(state, route, request.scope.get("behemoth.key"), _request_id("req"))

    def limited(err: RateLimited) -> ApiError:
        headers = {"Retry-After": str(int(err.retry_after))} if err.retry_after else None
        return ApiError(429, str(err), err.code, type="insufficient_quota" if err.code == "insufficient_quota"
                        else "rate_limit_error", headers=headers)

    def admit(call: _Call) -> Any:
        """Count the request against the key's requests per minute (before anything else)."""
        try:
            return state.limiter.admit(call.key)  # type: ignore[arg-type]
        except RateLimited as err:
            raise limited(err) from None

    async def guarded(call: _Call, work: Any) -> Response:
        try:
            return await work
        except ApiError as err:
            call.done(err.status, err.code)
            raise
        except Exception as err:
            call.done(500, type(err).__name__)
            raise

    # -- static page, health, metrics -----------------------------------------------------------

    def static_route(name: str, media_type: str) -> Any:
        async def page() -> Response:
            content = resources.files("behemoth.serve").joinpath("static", name).read_bytes()
            return Response(content, media_type=media_type, headers=PAGE_HEADERS)
        return page

    for path, (name, media_type) in STATIC_FILES.items():
        app.add_api_route(path, static_route(name, media_type), methods=["GET"], include_in_schema=False)

    @app.get("/health", include_in_schema=False)
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    # -- /v1 ------------------------------------------------------------------------------------

    def model_card(model: ServedModel) -> dict[str, Any]:
        return {"id": model.name, "object": "model", "created": model.created, "owned_by": "behemoth"}

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        call = begin(request, "/v1/models")

        async def work() -> Response:
            admit(call).settle(0)
            data = [model_card(m) for m in served.values() if call.key.allows_model(m.name)]  # type: ignore[union-attr]
            call.done(200)
            return JSONResponse({"object": "list", "data": data})
        return await guarded(call, work())

    @app.get("/v1/models/{name:path}")
    async def get_model(request: Request, name: str) -> Response:
        call = begin(request, "/v1/models/{model}")

        async def work() -> Response:
            admit(call).settle(0)
            model = _lookup_model(state, call.key, name)  # type: ignore[arg-type]
            call.model = model.name
            call.done(200)
            return JSONResponse(model_card(model))
        return await guarded(call, work())

    async def generate(request: Request, route: str, chat: bool) -> Response:
        call = begin(request, route)

        async def work() -> Response:
            ticket = admit(call)
            try:
                data = await _read_json(request, state.settings.max_body_bytes, state.settings.body_timeout_s)
                try:
                    body = (ChatBody if chat else CompletionBody).model_validate(data)
                except ValidationError as err:
                    raise _validation_error(err) from None
                call.stream = body.stream
                job = _build_job(state, call, body, chat)
                try:
                    ticket.reserve(sum(len(c.prompt_ids) + c.params.max_new_tokens for c in job.choices))
                except RateLimited as err:
                    raise limited(err) from None
                _submit(job)
            except BaseException:
                ticket.settle(0)
                raise
            return await _run_job(state, call, job, ticket)
        return await guarded(call, work())

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, "/v1/completions", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, "/v1/chat/completions", chat=True)

    return app


# ------------------------------------------------------------------------------------------------
# Loading models and running the server
# ------------------------------------------------------------------------------------------------

def parse_model_specs(specs: list[str]) -> dict[str, Path]:
    """`DIR` or `NAME=DIR` -> {name: dir}; a bare DIR is named after its folder."""
    named: dict[str, Path] = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if sep and MODEL_NAME.match(name) and not Path(spec).exists():
            directory = Path(rest)
        else:
            directory = Path(spec)
            name = directory.resolve().name
            if not MODEL_NAME.match(name):
                raise ConfigError(f"--model {spec}: the folder name {name!r} is not a usable model name; "
                                  "give one as NAME=DIR")
        if name in named:
            raise ConfigError(f"--model: two models are named {name!r}; give names as NAME=DIR")
        named[name] = directory
    if not named:
        raise ConfigError("give at least one --model DIR")
    return named


def load_served_model(name: str, directory: str | Path, max_batch_size: int = 16, max_queue: int = 256,
                      max_context: int | None = None, threads: int | None = None,
                      weights: str = "float32", compile: bool = False) -> ServedModel:
    """Load a model directory (weights + tokenizer) and wrap it in an engine (not started yet),
    decoding with the weight format `weights` (see behemoth.serve.weights), and with a compiled
    decode step if `compile` (behemoth.serve.compiled; compiles before returning)."""
    from behemoth.checkpoint import load

    folder = Path(directory)
    if not (folder / "tokenizer.json").is_file():
        raise ConfigError(f"{folder}: no tokenizer.json; serve a model directory written with its tokenizer")
    tokenizer = Tokenizer.load(folder)
    model = prepare_weights(load(folder), weights)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(f"{folder}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                          f"{model.config.vocab_size}")
    context = model.config.max_position_embeddings
    if max_context is not None:
        if max_context < 2:
            raise ConfigError(f"--max-context must be at least 2, got {max_context}")
        context = min(context, max_context)
    decoder = None
    if compile:
        from behemoth.serve.compiled import CompiledDecoder

        decoder = CompiledDecoder(model, threads=threads)
    engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue, max_context=context,
                    threads=threads, decoder=decoder)
    return ServedModel(name=name, engine=engine, tokenizer=tokenizer, context=context)


def default_audit_path(keys_file: Path) -> Path:
    return keys_file.with_name(keys_file.stem + ".audit.jsonl")


def serve(model_specs: list[str], host: str = "127.0.0.1", port: int = 8000, api_keys: str | Path | None = None,
          audit_log: str | Path | None = None, settings: Settings | None = None, max_batch_size: int = 16,
          max_queue: int = 256, max_context: int | None = None, log_prompts: bool = False,
          weights: str = "float32", compile: bool = False, announce: Any = print) -> None:
    """`behemoth serve`: load the models, check the keys, run uvicorn until interrupted."""
    import uvicorn

    from behemoth.serve.audit import tokens_used

    settings = settings or Settings()
    named = parse_model_specs(model_specs)
    if api_keys is not None:
        keys = KeyStore(api_keys)
        if not any(r.active for r in keys.records()):
            raise ConfigError(f"{api_keys}: no active API key; create one with "
                              f"`behemoth keys create --file {api_keys} --name NAME`")
        audit_path = Path(audit_log) if audit_log else default_audit_path(Path(api_keys))
    else:
        key, keys = KeyStore.ephemeral()
        announce(f"no --api-keys file: this run accepts one temporary key (not stored anywhere):\n  {key}")
        audit_path = Path(audit_log) if audit_log else None
    audit = AuditLog(audit_path, log_prompts=log_prompts) if audit_path else None
    limiter = RateLimiter(used=tokens_used(audit_path) if audit_path else None)
    threads = leave_cores_to_engines()  # before loading: the main thread only loads, tokenizes and answers
    if compile:
        announce("compiling the decode step (about half a minute per model)...")
    models = [load_served_model(name, directory, max_batch_size, max_queue, max_context, threads, weights, compile)
              for name, directory in named.items()]
    app = create_app(models, keys, settings, audit, limiter)
    shown_host = f"[{host}]" if ":" in host else host
    announce(f"serving {', '.join(named)} on http://{shown_host}:{port}/ (chat page at /, API at /v1)")
    if not _is_loopback(host):
        announce(f"note: {host} is reachable from other machines; keys travel in plain HTTP unless a TLS "
                 "proxy is in front")
    if audit_path:
        announce(f"audit log: {audit_path}" + (" (with prompt text)" if log_prompts else ""))
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=10)


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
