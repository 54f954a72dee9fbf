"""The OpenAI-compatible API and the chat page: `create_app(...)` and `serve(...)`.

Routes: the chat page (`/`, files from `static/`), `/health`, `/metrics`, and under /v1, behind the
key check (`calls.KeyGate`, before routing, so no route can skip it): `models`, `models/{name}`,
`completions` and `chat/completions`. Bad input gets a 4xx with an OpenAI-shaped body; a 500 means
a bug. No route returns weights, files, full logits or anything about other keys.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Iterable
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from behemoth.errors import ConfigError
from behemoth.inference.engine import leave_cores_to_engines
from behemoth.serve.audit import AuditLog, tokens_used
from behemoth.serve.calls import Call, KeyGate, ServerState
from behemoth.serve.jobs import generate
from behemoth.serve.keys import KeyStore
from behemoth.serve.limits import RateLimiter
from behemoth.serve.metrics import CONTENT_TYPE
from behemoth.serve.models import (ServedModel, load_served_model, parse_lora_specs, parse_model_specs,
                                   served_adapters)
from behemoth.serve.schemas import ApiError, Settings, error_response

log = logging.getLogger("behemoth.serve")

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


def create_app(models: Iterable[ServedModel], keys: KeyStore, settings: Settings | None = None,
               audit: AuditLog | None = None, limiter: RateLimiter | None = None, guard: Any = None,
               guard_replies: bool = False) -> FastAPI:
    """The app; it starts the models' engines on startup and closes them (and the audit log) on shutdown.
    guard: a behemoth.safety guard that screens every generation request (and, with guard_replies,
    every non-streamed reply); a flagged one is answered with a refusal, finish_reason content_filter."""
    served = {}
    for model in models:
        if model.name in served:
            raise ConfigError(f"two models are named {model.name!r}")
        served[model.name] = model
    if not served:
        raise ConfigError("no model to serve")
    state = ServerState(served, keys, settings or Settings(), audit, limiter or RateLimiter(), guard, guard_replies)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engines = list({id(model.engine): model.engine for model in served.values()}.values())  # adapters share
        for engine in engines:
            engine.start()
        try:
            yield
        finally:
            for engine in engines:
                engine.close()
            if audit is not None:
                audit.close()

    app = FastAPI(title="behemoth", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.behemoth = state
    app.add_middleware(KeyGate, state=state)

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
        return error_response(ApiError(500, "The server had an error while processing your request."))

    def begin(request: Request, route: str) -> Call:
        return Call(state, route, request.scope.get("behemoth.key"))

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

    def model_card(model: ServedModel) -> dict[str, Any]:
        card = {"id": model.name, "object": "model", "created": model.created, "owned_by": "behemoth"}
        return card if model.parent is None else {**card, "parent": model.parent, "root": model.parent}

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        with begin(request, "/v1/models") as call:
            call.admit().settle(0)
            data = [model_card(m) for m in served.values() if call.key.allows_model(m.name)]  # type: ignore[union-attr]
            call.done(200)
            return JSONResponse({"object": "list", "data": data})

    @app.get("/v1/models/{name:path}")
    async def get_model(request: Request, name: str) -> Response:
        with begin(request, "/v1/models/{model}") as call:
            call.admit().settle(0)
            model = state.model_for(call.key, name)  # type: ignore[arg-type]
            call.model = model.name
            call.done(200)
            return JSONResponse(model_card(model))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        with begin(request, "/v1/completions") as call:
            return await generate(call, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        with begin(request, "/v1/chat/completions") as call:
            return await generate(call, request, chat=True)

    return app


def serve(model_specs: list[str], host: str = "127.0.0.1", port: int = 8000, api_keys: str | Path | None = None,
          audit_log: str | Path | None = None, settings: Settings | None = None, max_batch_size: int = 16,
          max_queue: int = 256, max_context: int | None = None, log_prompts: bool = False,
          weights: str = "float32", compile: bool = False, announce: Any = print, guard: Any = None,
          guard_replies: bool = False, lora_specs: list[str] | None = None) -> None:
    """`behemoth serve`: load the models (LoRA adapters `NAME=DIR` over the one model), check the keys,
    run uvicorn until interrupted."""
    import uvicorn

    settings = settings or Settings()
    named = parse_model_specs(model_specs)
    adapters = parse_lora_specs(lora_specs or [], named)
    check_port_free(host, port)  # before minutes of loading, not after them
    if api_keys is not None:
        keys = KeyStore(api_keys)
        if not any(r.active for r in keys.records()):
            raise ConfigError(f"{api_keys}: no active API key; create one with "
                              f"`behemoth keys create --file {api_keys} --name NAME`")
        audit_path = Path(audit_log) if audit_log else Path(api_keys).with_suffix(".audit.jsonl")
    else:
        key, keys = KeyStore.ephemeral()
        announce(f"no --api-keys file: this run accepts one temporary key (not stored anywhere):\n  {key}")
        audit_path = Path(audit_log) if audit_log else None
    audit = AuditLog(audit_path, log_prompts=log_prompts) if audit_path else None
    limiter = RateLimiter(used=tokens_used(audit_path) if audit_path else None)
    threads = leave_cores_to_engines()  # before loading: the main thread only loads, tokenizes and answers
    if compile:
        announce("compiling the decode step (about half a minute per model)...")
    models = [load_served_model(name, directory, max_batch_size, max_queue, max_context, threads, weights, compile,
                                adapters)  # parse_lora_specs: adapters come with exactly one model
              for name, directory in named.items()]
    models += served_adapters(models[0])
    app = create_app(models, keys, settings, audit, limiter, guard, guard_replies)
    if guard is not None:
        announce(f"guard: {guard.name}, screening requests" + (" and non-streamed replies" if guard_replies else ""))
    shown_host = f"[{host}]" if ":" in host else host
    shown = ", ".join([*named, *(f"{name} (LoRA over {next(iter(named))})" for name in adapters)])
    announce(f"serving {shown} on http://{shown_host}:{port}/ (chat page at /, API at /v1)")
    if not _is_loopback(host):
        announce(f"note: {host} is reachable from other machines; keys travel in plain HTTP unless a TLS "
                 "proxy is in front")
    if audit_path:
        announce(f"audit log: {audit_path}" + (" (with prompt text)" if log_prompts else ""))
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=10)


def check_port_free(host: str, port: int) -> None:
    """ConfigError naming --port when nothing could listen on host:port (taken, or not ours to use)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind((host, port))
    except OSError as err:
        reason = err.strerror or str(err)
        raise ConfigError(f"--port {port}: cannot listen on {host}:{port} ({reason}); choose another --port "
                          "or stop what uses it") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
