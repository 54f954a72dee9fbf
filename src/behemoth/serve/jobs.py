"""Generation calls, the one place in serve/ that talks to the engine: a body becomes a checked job,
its choices go to the engine, and the events come back as JSON or an SSE stream in OpenAI's shapes.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from behemoth.errors import ConfigError
from behemoth.inference.engine import EngineClosed, PromptTooLong, QueueFull, SamplingParams
from behemoth.safety import GUARD_REFUSAL
from behemoth.serve.calls import Call, limited, request_id
from behemoth.serve.limits import RateLimited, Ticket
from behemoth.serve.models import ServedModel
from behemoth.serve.schemas import ApiError, Body, ChatBody, CompletionBody, Settings, read_body

log = logging.getLogger("behemoth.serve")

NEG_INF_LOGPROB = -9999.0  # what OpenAI reports for a token of probability zero


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
    echoed: int = 0  # prompt tokens at the head of `tokens` (echo)
    chars: int = 0  # characters of text before the next token to report (its text_offset)
    utf8: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))


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
    echo: bool = False  # /v1/completions: each text starts with its prompt, scored
    created: int = field(default_factory=lambda: int(time.time()))


async def generate(call: Call, request: Request, chat: bool) -> Response:
    """The work of /v1/completions or (`chat`) /v1/chat/completions; the ticket is settled whatever happens."""
    ticket = call.admit()
    try:
        body = await read_body(request, call.state.settings, chat)
        call.stream = body.stream
        job = _build_job(call, body, chat)
        try:
            ticket.reserve(sum(len(c.prompt_ids) + c.params.max_new_tokens for c in job.choices))
        except RateLimited as err:
            raise limited(err) from None
        if await screen(call, job.model.name, "request", _user_text(job, body)):
            job.top_logprobs = None  # the refusal has no model logprobs to show
            for choice in job.choices:
                choice.request = _Refused()
        else:
            _submit(job)
    except BaseException:
        ticket.settle(0)
        raise
    return await _run_job(call, job, ticket)


async def screen(call: Call, model: str, stage: str, text: str) -> bool:
    """True when the server's guard (if any) flags `text`; counted and noted for the audit line.
    The guard may run a model or ask an endpoint, so it runs off the event loop."""
    guard = call.state.guard
    reason = None if guard is None else await asyncio.to_thread(guard.screen, text)
    if reason is not None:
        call.guard = f"{stage}:{reason}"
        call.state.metrics.guard_flagged.inc(model, stage)
    return reason is not None


def _user_text(job: _Job, body: Body) -> str:
    """What a guard screens: the conversation's user and system turns, or the prompts' text."""
    if isinstance(body, ChatBody):
        return "\n".join(m["content"] for m in job_messages(body) if m["role"] != "assistant")
    return "\n".join(job.model.tokenizer.decode(ids) for ids in job.prompts)


class _Refused:
    """Stands in for an engine request the guard stopped: one event, the refusal, no model tokens."""

    completion_tokens = 0

    async def __aiter__(self) -> AsyncIterator[Any]:
        yield SimpleNamespace(text=GUARD_REFUSAL, finish_reason="content_filter", token_id=None, logprob=None,
                              top_logprobs=None)

    def cancel(self) -> None:
        pass


def _invalid(err: ConfigError) -> ApiError:
    return ApiError(400, str(err), "invalid_value", getattr(err, "field", None))


def _check_common(settings: Settings, body: Body) -> None:
    if body.presence_penalty or body.frequency_penalty:
        param = "presence_penalty" if body.presence_penalty else "frequency_penalty"
        raise ApiError(400, f"{param} is not supported (use repetition_penalty); send 0.", "unsupported_parameter",
                       param)
    stops = body.stops
    if len(stops) > settings.max_stop or any(not s or len(s) > settings.max_stop_chars for s in stops):
        raise ApiError(400, f"stop: at most {settings.max_stop} non-empty strings of at most "
                            f"{settings.max_stop_chars} characters.", "invalid_value", "stop")


def _max_tokens(settings: Settings, model: ServedModel, requested: int | None, prompt_len: int, param: str) -> int:
    if requested is not None and requested > settings.max_tokens_limit:
        raise ApiError(400, f"{param} must be at most {settings.max_tokens_limit}, got {requested}.", "invalid_value",
                       param)
    if requested is None:  # the default, capped at the room left; with none left, the error below
        requested = max(min(settings.default_max_tokens, model.context - prompt_len), 1)
    if prompt_len + requested > model.context:
        raise ApiError(400, f"This model's maximum context length is {model.context} tokens. However, you requested "
                            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} in the "
                            f"completion). Please reduce the length of the prompt or {param}.",
                       "context_length_exceeded", param)
    return requested


def _build_job(call: Call, body: Body, chat: bool) -> _Job:
    settings = call.state.settings
    model = call.state.model_for(call.key, body.model)  # type: ignore[arg-type]
    call.model = model.name
    _check_common(settings, body)
    tok = model.tokenizer
    stop_ids = {tok.eos_id, *getattr(model.engine, "eos_token_ids", ())}
    if chat:
        assert isinstance(body, ChatBody)
        messages = job_messages(body)
        call.text["messages"] = messages
        prompts = [model.text.chat_prompt_ids(messages)]
        stop_ids.add(tok.eot_id)
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
        if body.echo and body.stream:
            raise ApiError(400, "echo is not supported with stream: true.", "unsupported_parameter", "echo")
        if body.max_tokens == 0 and not body.echo:
            raise ApiError(400, "max_tokens may be 0 only with echo (to score the prompt).", "invalid_value",
                           "max_tokens")
        if body.suffix:
            raise ApiError(400, "suffix is not supported.", "unsupported_parameter", "suffix")
        if body.best_of not in (None, 1):
            raise ApiError(400, "best_of is not supported; use n.", "unsupported_parameter", "best_of")
        if body.logprobs is not None and body.logprobs > settings.max_logprobs:
            raise ApiError(400, f"logprobs must be at most {settings.max_logprobs}.", "invalid_value", "logprobs")
        prompts = _completion_prompts(model, body.prompt)
        call.text["prompt"] = body.prompt
        max_tokens_param, requested = "max_tokens", body.max_tokens
        top_logprobs = body.logprobs
    if len(prompts) * body.n > settings.max_choices:
        raise ApiError(400, f"n times the number of prompts must be at most {settings.max_choices}.",
                       "invalid_value", "n")
    choices, echo = [], getattr(body, "echo", False)
    for p, prompt in enumerate(prompts):
        max_tokens = _max_tokens(settings, model, requested, len(prompt), max_tokens_param)
        for j in range(body.n):
            params = SamplingParams(
                max_new_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                min_p=body.min_p, repetition_penalty=body.repetition_penalty, stop=body.stops,
                stop_token_ids=[] if body.ignore_eos else sorted(stop_ids),
                seed=None if body.seed is None else body.seed + j,
                logprobs=top_logprobs or 0, ignore_eos=body.ignore_eos,
                prompt_logprobs=(top_logprobs or 0) if echo else None, adapter=model.adapter)
            try:
                params.validate()
            except ConfigError as err:
                raise _invalid(err) from None
            choices.append(_Choice(index=p * body.n + j, prompt_ids=prompt, params=params))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options is only allowed with stream: true.", "invalid_value", "stream_options")
    call.request_id = request_id("chatcmpl" if chat else "cmpl")  # the response's id names the audit line
    return _Job(chat=chat, model=model, prompts=prompts, choices=choices, top_logprobs=top_logprobs,
                stream=body.stream, include_usage=include_usage, stop_ids=stop_ids, id=call.request_id,
                echo=echo)


def job_messages(body: ChatBody) -> list[dict[str, str]]:
    return [{"role": "system" if m.role == "developer" else m.role,
             "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
            for m in body.messages]


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


def _submit(job: _Job) -> None:
    """Submit every choice to the engine; on any failure cancel those already submitted."""
    try:
        for choice in job.choices:
            choice.request = job.model.engine.submit(choice.prompt_ids, choice.params)
    except BaseException as err:
        for choice in job.choices:
            if choice.request is not None:
                choice.request.cancel()
        if isinstance(err, PromptTooLong):
            raise ApiError(400, str(err), "context_length_exceeded", "messages" if job.chat else "prompt") from None
        if isinstance(err, (QueueFull, EngineClosed)):
            raise ApiError(503, "The server is busy; retry shortly.", "server_overloaded",
                           headers={"Retry-After": "1"}) from None
        if isinstance(err, ConfigError):
            raise _invalid(err) from None
        raise


async def _events(choices: list[_Choice]) -> AsyncIterator[tuple[_Choice, Any]]:
    """Events of all choices' engine requests, as they come; unfinished ones are cancelled on exit."""
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
    the token itself is not part of the reply, so it gets no logprobs entry), except with echo: there
    the logprobs score the sequence, one entry per prompt and generated token (lm-eval asks for one
    token and drops the last entry, whatever it is), so an end token is listed, with no text."""
    if event.finish_reason is not None:
        choice.finish_reason = event.finish_reason
    choice.text.append(event.text)
    if event.finish_reason == "stop" and event.token_id in job.stop_ids and not job.echo:
        return False
    choice.tokens.append(event.token_id)
    choice.logprobs.append(event.logprob)
    choice.tops.append(list(event.top_logprobs or [])[: job.top_logprobs or 0])
    return True


async def _run_job(call: Call, job: _Job, ticket: Ticket) -> Response:
    """Run a submitted job: a JSON response, or an SSE stream. Settles the ticket, ends the call."""
    def finish(status: int, error: str | None = None) -> None:
        usage = _usage(job)
        call.prompt_tokens, call.completion_tokens = usage["prompt_tokens"], usage["completion_tokens"]
        call.finish_reasons = [c.finish_reason or "cancelled" for c in job.choices]
        if call.state.audit is not None and call.state.audit.log_prompts:
            call.text["completion"] = ["".join(c.text) for c in job.choices]
        ticket.settle(usage["total_tokens"])
        call.done(status, error)

    if not job.stream:
        try:
            async with contextlib.aclosing(_events(job.choices)) as events:
                async for choice, event in events:
                    call.token_seen()
                    _apply(job, choice, event)
            for choice in job.choices:  # a prompt-only request (max_tokens 0, echo) ends without an event
                choice.finish_reason = choice.finish_reason or choice.request.finish_reason
        except EngineClosed:  # the server is stopping: a clean, retryable error rather than a 500
            finish(503, "EngineClosed")
            raise _shutting_down() from None
        except BaseException as err:
            finish(500 if isinstance(err, Exception) else 499, type(err).__name__)
            raise
        if call.state.guard_replies:  # streamed replies are screened at the request only
            for choice in job.choices:
                if choice.finish_reason != "content_filter" and await screen(call, job.model.name, "reply",
                                                                             "".join(choice.text)):
                    choice.text, choice.finish_reason = [GUARD_REFUSAL], "content_filter"
        finish(200)
        return JSONResponse(_full_response(job), headers={"x-request-id": job.id})

    async def stream() -> AsyncIterator[str]:
        status, error = 499, "client closed the stream"
        try:
            for choice in job.choices:
                if job.chat:
                    yield _sse(_chunk(job, choice, {"role": "assistant", "content": ""}, None, None))
            async with contextlib.aclosing(_events(job.choices)) as events:
                async for choice, event in events:
                    call.token_seen()
                    start = len(choice.tokens)
                    logprobs = _logprobs(job, choice, start) if _apply(job, choice, event) else None
                    if job.chat:
                        if event.text or logprobs:
                            yield _sse(_chunk(job, choice, {"content": event.text}, logprobs, None))
                        if event.finish_reason is not None:
                            yield _sse(_chunk(job, choice, {}, None, event.finish_reason))
                    else:
                        yield _sse(_chunk(job, choice, event.text, logprobs, event.finish_reason))
            if job.include_usage:
                yield _sse({**_chunk(job, None, None, None, None), "usage": _usage(job)})
            yield "data: [DONE]\n\n"
            status, error = 200, None
        except EngineClosed:
            status, error = 503, "EngineClosed"
            yield _sse(_shutting_down().body())
        except Exception:
            log.exception("generation failed in %s", job.id)
            status, error = 500, "engine error"
            yield _sse(ApiError(500, "The server failed while generating.").body())
        finally:
            finish(status, error)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "x-request-id": job.id})


def _shutting_down() -> ApiError:
    return ApiError(503, "The server is shutting down; retry shortly.", "server_shutting_down",
                    headers={"Retry-After": "1"})


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _finite(value: float | None) -> float | None:
    return None if value is None else float(value) if math.isfinite(value) else NEG_INF_LOGPROB


def _logprobs(job: _Job, choice: _Choice, start: int) -> dict[str, Any] | None:
    """Logprobs of the choice's tokens from `start` (each call goes on from the last), in the chat or the
    completions shape; None if not asked for. A token's text_offset counts the characters of the returned
    text that the tokens before it complete (bytes decoded as the whole text is: a character split over
    tokens belongs to the one completing it); the echoed prompt's text is decoded on its own, as returned."""
    if job.top_logprobs is None:
        return None
    text = job.model.text
    if job.chat:
        return {"content": [
            {"token": text.text(token), "logprob": _finite(logprob), "bytes": list(text.bytes(token)),
             "top_logprobs": [{"token": text.text(t), "logprob": _finite(lp), "bytes": list(text.bytes(t))}
                              for t, lp in tops]}
            for token, logprob, tops in zip(choice.tokens[start:], choice.logprobs[start:], choice.tops[start:])]}
    offsets = []
    for i, token in enumerate(choice.tokens[start:], start):
        if i == choice.echoed:  # the echoed prompt's text ends here
            choice.chars += len(choice.utf8.decode(b"", final=True))
        offsets.append(choice.chars)
        choice.chars += len(choice.utf8.decode(text.bytes(token)))
    return {"tokens": [text.text(t) for t in choice.tokens[start:]],
            "token_logprobs": [_finite(lp) for lp in choice.logprobs[start:]],
            "top_logprobs": [None if tops is None else _by_text(text, tops) for tops in choice.tops[start:]],
            "text_offset": offsets}


def _by_text(text: Any, tops: list[tuple[int, float]]) -> dict[str, float | None]:
    """The completions shape of a token's alternatives, keyed by text: where tokens share a text (byte
    tokens of split characters are all U+FFFD), the likeliest one's logprob stands for it."""
    out: dict[str, float | None] = {}
    for token, logprob in tops:  # likeliest first
        out.setdefault(text.text(token), _finite(logprob))
    return out


def _echo(job: _Job, choice: _Choice) -> None:
    """Put the prompt before the completion: its text and its tokens, scored by the engine (the first
    token, which nothing predicts, has logprob and top_logprobs null, as OpenAI's)."""
    scores = getattr(choice.request, "prompt_logprobs", None) or [None] * len(choice.prompt_ids)
    choice.text.insert(0, b"".join(map(job.model.text.bytes, choice.prompt_ids)).decode("utf-8", "replace"))
    choice.tokens[:0], choice.echoed = choice.prompt_ids, len(choice.prompt_ids)
    choice.logprobs[:0] = [s and s.logprob for s in scores]
    choice.tops[:0] = [s and (s.top_logprobs or []) for s in scores]


def _usage(job: _Job) -> dict[str, int]:
    prompt = sum(len(p) for p in job.prompts)
    completion = 0
    for choice in job.choices:
        counted = getattr(choice.request, "completion_tokens", None)
        completion += counted if isinstance(counted, int) else len(choice.tokens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _chunk(job: _Job, choice: _Choice | None, content: Any, logprobs: dict | None, finish: str | None) -> dict:
    """One SSE chunk; `content` is the chat delta (a dict) or the completion text."""
    choices = [] if choice is None else [{"index": choice.index, "delta" if job.chat else "text": content,
                                          "logprobs": logprobs, "finish_reason": finish}]
    return {"id": job.id, "object": "chat.completion.chunk" if job.chat else "text_completion",
            "created": job.created, "model": job.model.name, "choices": choices}


def _full_response(job: _Job) -> dict[str, Any]:
    choices = []
    for choice in job.choices:
        if job.echo:
            _echo(job, choice)
        text = "".join(choice.text)
        content = {"message": {"role": "assistant", "content": text}} if job.chat else {"text": text}
        choices.append({"index": choice.index, **content, "logprobs": _logprobs(job, choice, 0),
                        "finish_reason": choice.finish_reason})
    return {"id": job.id, "object": "chat.completion" if job.chat else "text_completion", "created": job.created,
            "model": job.model.name, "choices": choices, "usage": _usage(job)}
