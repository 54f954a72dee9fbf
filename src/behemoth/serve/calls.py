"""The state all calls share (`ServerState`), the key check of every path under /v1 (`KeyGate`), and
`Call`: the admission, metrics and audit line of one API call, whether or not it reached a route.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from starlette.datastructures import Headers

from behemoth.serve.audit import AuditLog
from behemoth.serve.keys import AuthError, KeyRecord, KeyStore
from behemoth.serve.limits import RateLimited, RateLimiter, Ticket
from behemoth.serve.metrics import Gauge, ServerMetrics
from behemoth.serve.models import ServedModel
from behemoth.serve.schemas import ApiError, Settings, error_response, too_large

API_PREFIX = "/v1"


class ServerState:
    """What every call of one app shares; the app keeps it as `app.state.behemoth`."""

    def __init__(self, models: dict[str, ServedModel], keys: KeyStore, settings: Settings,
                 audit: AuditLog | None, limiter: RateLimiter, guard: Any = None, guard_replies: bool = False):
        self.models, self.keys, self.settings, self.audit, self.limiter = models, keys, settings, audit, limiter
        self.guard, self.guard_replies = guard, guard_replies  # behemoth.safety guards: see jobs.screen
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

    def model_for(self, key: KeyRecord, name: str) -> ServedModel:
        """Configured models by name only; a model the key may not use looks like a missing one."""
        model = self.models.get(name)
        if model is None or not key.allows_model(name):
            shown = name if len(name) <= 64 else name[:64] + "..."
            raise ApiError(404, f"The model '{shown}' does not exist or you do not have access to it.",
                           "model_not_found", "model")
        return model


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def limited(err: RateLimited) -> ApiError:
    headers = {"Retry-After": str(int(err.retry_after))} if err.retry_after else None
    return ApiError(429, str(err), err.code, type="insufficient_quota" if err.code == "insufficient_quota"
                    else "rate_limit_error", headers=headers)


class Call:
    """Metrics and the audit line of one API call, written exactly once by `done`."""

    def __init__(self, state: ServerState, route: str, key: KeyRecord | None):
        self.state, self.route, self.key = state, route, key
        self.request_id = request_id("req")  # a generation call renames it after its response's id
        self.start = time.perf_counter()
        self.model: str | None = None
        self.stream = False
        self.prompt_tokens = self.completion_tokens = 0
        self.first_token: float | None = None
        self.finish_reasons: list[str] = []
        self.text: dict[str, Any] = {}  # prompt / messages / completion: audited only with --log-prompts
        self.guard: str | None = None  # why the guard flagged the request or its reply
        self._done = False

    def admit(self) -> Ticket:
        """Count the request against the key's requests per minute (before anything else)."""
        try:
            return self.state.limiter.admit(self.key)  # type: ignore[arg-type]
        except RateLimited as err:
            raise limited(err) from None

    def __enter__(self) -> Call:
        return self

    def __exit__(self, kind: Any, err: BaseException | None, traceback: Any) -> None:
        """A route's work raised: end the call with the error's status before it goes on."""
        if isinstance(err, ApiError):
            self.done(err.status, err.code)
        elif isinstance(err, Exception):
            self.done(500, type(err).__name__)

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
                "error": error, **({"guard": self.guard} if self.guard else {})}
            self.state.audit.write(**record, **self.text)


def _route_label(path: str) -> str:
    if path in ("/v1/completions", "/v1/chat/completions", "/v1/models"):
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


class KeyGate:
    """ASGI middleware: the body size limit, and the key check of every path under /v1, before
    routing (so an unknown /v1 path is a 401 to a caller without a key, not a 404)."""

    def __init__(self, app: Any, state: ServerState):
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
            return await error_response(too_large(limit))(scope, receive, send)
        if path == API_PREFIX or path.startswith(API_PREFIX + "/"):
            try:
                scope["behemoth.key"] = self.state.keys.authenticate(headers.get("authorization"))
            except AuthError as err:
                Call(self.state, _route_label(path), None).done(err.status, err.code)
                return await error_response(ApiError(err.status, str(err), err.code))(scope, receive, send)
        await self.app(scope, receive, send)
