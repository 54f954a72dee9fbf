"""The inference engine: a background thread that decodes many requests as one batch.

Each iteration drops cancelled requests, runs one prefill forward of at most `prefill_chunk` tokens
(queued prompts as one right-padded batch, or the next piece of a long prompt, so it stalls the others
for one piece at most), then one decode step for every running request. Each thread running torch
kernels has its own OpenMP team; once the teams outnumber the cores, waking their idle workers costs
more than a small matmul (a decode step ran at half speed on two cores), so the engine thread sets its
own count (`threads`) and servers first call `leave_cores_to_engines()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from behemoth.errors import BehemothError, ConfigError
from behemoth.model import Transformer
from behemoth.inference.kv_cache import ModelCache
if TYPE_CHECKING:
    from behemoth.inference.compiled import CompiledDecoder
    from behemoth.model.lora import RowAdapters
from behemoth.inference.sampling import (Choice, InvalidParameter, SamplingParams, TextStream, sample_tokens,
                                         token_choices)

__all__ = ["Engine", "Request", "SamplingParams", "TokenEvent", "PromptTooLong", "QueueFull", "EngineClosed",
           "InvalidParameter", "leave_cores_to_engines"]

log = logging.getLogger("behemoth.inference")


class PromptTooLong(BehemothError):
    """The prompt plus the tokens asked for do not fit in the model's context."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, max_context: int):
        super().__init__(
            f"prompt of {prompt_tokens} tokens + max_new_tokens {max_new_tokens} = "
            f"{prompt_tokens + max_new_tokens} tokens exceeds the context of {max_context} tokens "
            f"(shorten the prompt or ask for at most {max(max_context - prompt_tokens, 0)} new tokens)")
        self.prompt_tokens, self.max_new_tokens, self.max_context = prompt_tokens, max_new_tokens, max_context


class QueueFull(BehemothError):
    """The engine already holds `max_queue` waiting requests: try again later (HTTP 429/503)."""


class EngineClosed(BehemothError):
    """The engine was closed before (or while) the request ran."""


def leave_cores_to_engines() -> int:
    """Keep the calling thread to one torch thread, so that it never starts an OpenMP team beside the
    engines' (see the module notes); returns the count it had, for `Engine(threads=...)`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


@dataclass
class TokenEvent:
    """One generated token, as the consumer of a request sees it."""

    token_id: int
    text: str  # released by this token ("" while a character or a possible stop string is incomplete)
    logprob: float | None  # under the model's raw distribution (sampling.Choice); always given
    top_logprobs: list[tuple[int, float]] | None  # (token_id, logprob) of the `logprobs` likeliest; None if 0
    finish_reason: str | None  # None while running; "stop" or "length" on the last event


class Request:
    """A submitted generation: iterate it (blocking or async, from one consumer) for its TokenEvents,
    until the event with a finish_reason (none if cancelled); an engine failure is raised. Leaving the
    iteration early (a break, an HTTP client gone) cancels it, freeing its slot at the next step."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, engine: Engine | None = None):
        self.prompt_ids, self.params = prompt_ids, params
        self.prompt_tokens, self.completion_tokens = len(prompt_ids), 0
        self.finish_reason: str | None = None  # "stop", "length", "cancelled" or "error" at the end
        # With params.prompt_logprobs: each prompt token's Choice (None for the first, which nothing
        # predicts), complete once the first event arrives or, for max_new_tokens 0, at the end.
        self.prompt_logprobs: list[Choice | None] | None = None if params.prompt_logprobs is None else [None]
        self.first_token_at: float | None = None  # for time-to-first-token metrics
        self.finished_at: float | None = None
        self._engine = engine
        self._events: deque[TokenEvent] = deque()
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._done = False
        self._error: BaseException | None = None
        self.cancel_requested = False

    def __iter__(self) -> Iterator[TokenEvent]:
        try:
            while True:
                with self._cond:
                    while not self._events and not self._done:
                        self._cond.wait()
                    event = self._next_or_end()
                if event is None:
                    return
                yield event
        finally:
            self.cancel()

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        loop = asyncio.get_running_loop()
        try:
            while True:
                wake = None
                with self._cond:
                    if not self._events and not self._done:
                        wake = asyncio.Event()
                        self._waiters.append((loop, wake))
                    else:
                        event = self._next_or_end()
                if wake is not None:
                    await wake.wait()
                elif event is None:
                    return
                else:
                    yield event
        finally:
            self.cancel()

    def _next_or_end(self) -> TokenEvent | None:
        """Under the lock: the next event, None at the end, or the engine's error."""
        if self._events:
            return self._events.popleft()
        if self._error is not None:
            raise self._error
        return None

    def cancel(self) -> None:
        """Stop generating (the client went away); a no-op once the request has finished."""
        if self._done or self.cancel_requested:
            return
        self.cancel_requested = True
        if self._engine is not None:
            self._engine._wake()

    @property
    def done(self) -> bool:
        return self._done

    def _deliver(self, event: TokenEvent | None = None, finish: str | None = None,
                 error: BaseException | None = None) -> None:
        now = time.monotonic()
        with self._cond:
            if event is not None:
                self.first_token_at = self.first_token_at or now
                self._events.append(event)
            if finish is not None:
                self.finish_reason, self.finished_at, self._done = finish, now, True
                self._error = error
            waiters, self._waiters = self._waiters, []
            self._cond.notify_all()
        for loop, wake in waiters:
            with contextlib.suppress(RuntimeError):  # the consumer's loop is closed: nobody is listening
                loop.call_soon_threadsafe(wake.set)


@dataclass
class _Slot:
    """Engine-side state of one admitted request."""

    request: Request
    generator: torch.Generator
    stream: TextStream
    stop_ids: frozenset[int]
    seen: torch.Tensor | None  # bool [vocab] of prompt and output tokens, for repetition penalty
    cache: ModelCache | None = None  # its own cache while a long prompt is prefilled in pieces
    prefilled: int = 0  # prompt tokens already through the model
    last_token: int = -1  # the token to feed at the next decode step...
    position: int = 0  # ...at this absolute position


class Engine:
    """Continuous-batching generation over one model on a background thread."""

    def __init__(self, model: Transformer, tokenizer, max_batch_size: int = 16, max_queue: int = 256,
                 max_context: int | None = None, prefill_chunk: int = 512, threads: int | None = None,
                 decoder: CompiledDecoder | None = None, adapters: RowAdapters | None = None):
        model_context = model.config.max_position_embeddings
        for name, value in (("max_batch_size", max_batch_size), ("max_queue", max_queue),
                            ("prefill_chunk", prefill_chunk), ("threads", 1 if threads is None else threads)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if max_context is not None and not 1 <= max_context <= model_context:
            raise ConfigError(f"max_context must be between 1 and the model's context ({model_context}), "
                              f"got {max_context!r}")
        if decoder is not None and getattr(decoder, "model", None) is not model:
            raise ConfigError("the compiled decoder was built for another model than the engine's")
        if decoder is not None and adapters is not None:
            raise ConfigError("LoRA adapters run on the eager decode step only; serve them without --compile")
        self.model = model.eval()  # the engine owns the model from here: inference only
        self.tokenizer, self.max_batch_size, self.max_queue = tokenizer, max_batch_size, max_queue
        self.max_context, self.prefill_chunk = max_context or model_context, prefill_chunk
        self.threads = threads if threads is not None else torch.get_num_threads()  # of the engine thread
        self.decoder = decoder  # a compiled decode step (behemoth.inference.compiled), or None: eager
        # The model's LoRA banks (model.lora.attach_adapter_bank): each row's `params.adapter` is set
        # around every forward, so rows of different adapters share one batch.
        self.adapters = adapters
        self.vocab_size = model.config.vocab_size
        self.eos_token_ids = frozenset(_end_token_ids(tokenizer, model))
        self._cond = threading.Condition()  # guards the queue and the closing flag
        self._queue: deque[Request] = deque()
        self._closing = False
        self._thread: threading.Thread | None = None
        # Owned by the engine thread:
        self._running: list[_Slot] = []
        self._batch: ModelCache | None = None  # one row per running slot, in the same order
        # Admitted, prompt not yet through the model: the slots of the prefill forward under way
        # (so a failure finds them), or between iterations the one long prompt done in pieces.
        self._prefilling: list[_Slot] = []
        self._counts = dict(tokens_generated=0, prompt_tokens=0, requests_finished=0,
                            requests_cancelled=0, requests_failed=0)

    def start(self) -> None:
        """Start the decode thread (idempotent)."""
        with self._cond:
            if self._closing:
                raise EngineClosed("the engine is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="behemoth-engine", daemon=True)
                self._thread.start()

    def close(self) -> None:
        """Stop the thread; requests still queued or running end with EngineClosed."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        error = EngineClosed("the engine was closed")
        with self._cond:
            queued, self._queue = list(self._queue), deque()
        for request in queued:
            self._finish(request, "error", error)
        self._fail_in_flight(error)

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def submit(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Request:
        """Queue a request; raises InvalidParameter, PromptTooLong, QueueFull or EngineClosed."""
        params = params or SamplingParams()
        params.validate()
        prompt = self._checked_prompt(prompt_ids)
        if len(prompt) + params.max_new_tokens > self.max_context:  # never truncate silently
            raise PromptTooLong(len(prompt), params.max_new_tokens, self.max_context)
        known = 0 if self.adapters is None else len(self.adapters.names)
        if params.adapter > known:
            raise InvalidParameter("adapter", f"this engine has {known} adapter(s), got {params.adapter}")
        bad = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad:
            raise InvalidParameter("stop_token_ids", f"ids must be below the vocabulary size {self.vocab_size}, "
                                                     f"got {bad[0]}")
        request = Request(prompt, params, self)
        with self._cond:
            if self._closing:
                raise EngineClosed("the engine is closed")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); try again later")
            self._queue.append(request)
            self._cond.notify_all()
        return request

    def stats(self) -> dict:
        """Gauges and counters for /metrics."""
        with self._cond:
            queue_depth = len(self._queue)
        return dict(queue_depth=queue_depth, running=len(self._running) + len(self._prefilling),
                    max_batch_size=self.max_batch_size, **self._counts)

    def _checked_prompt(self, prompt_ids: list[int]) -> list[int]:
        if isinstance(prompt_ids, torch.Tensor):
            prompt_ids = prompt_ids.tolist()
        if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
            raise InvalidParameter("prompt", "must be a non-empty list of token ids")
        for token in prompt_ids:
            if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < self.vocab_size:
                raise InvalidParameter("prompt", f"token ids must be integers in [0, {self.vocab_size}), "
                                                 f"got {token!r}")
        return list(prompt_ids)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def run_until_idle(self, after_step: Callable[[], None] | None = None) -> None:
        """Run the loop on the calling thread until nothing is queued or running, calling `after_step`
        after each iteration: offline use, where an engine thread would only add an OpenMP team."""
        if self._thread is not None:
            raise EngineClosed("run_until_idle is for an engine whose thread was never started")
        with torch.inference_mode():
            while self._queue or self._running or self._prefilling:
                self._iteration()
                if after_step is not None:
                    after_step()

    def _run(self) -> None:
        torch.set_num_threads(self.threads)  # per thread in OpenMP: the creator's setting does not carry over
        with torch.inference_mode():
            while self._wait_for_work():
                self._iteration()

    def _iteration(self) -> None:
        try:
            self._drop_cancelled()
            self._prefill_some()
            if self._running:
                self._decode_step()
        except Exception as err:  # a bug or out-of-memory must not kill the engine thread
            log.exception("engine step failed")
            self._fail_in_flight(err)

    def _wait_for_work(self) -> bool:
        """Block until there is something to do; False when closing."""
        with self._cond:
            while not (self._closing or self._queue or self._running or self._prefilling):
                self._cond.wait()
            return not self._closing

    def _fail_in_flight(self, error: BaseException) -> None:
        """After a failed step the cache cannot be trusted: fail every admitted request (queued ones run next)."""
        slots = self._running + self._prefilling
        self._running, self._prefilling, self._batch = [], [], None
        for slot in slots:
            self._finish(slot.request, "error", error)

    def _drop_cancelled(self) -> None:
        for slot in [s for s in self._prefilling if s.request.cancel_requested]:
            self._finish(slot.request, "cancelled")
            self._prefilling.remove(slot)
        cancelled = [s.request.cancel_requested for s in self._running]  # read once: set from other threads
        if any(cancelled):
            for slot, flag in zip(self._running, cancelled):
                if flag:
                    self._finish(slot.request, "cancelled")
            self._keep([not flag for flag in cancelled])

    def _prefill_some(self) -> None:
        """One prefill forward of at most `prefill_chunk` tokens: the next piece of the long prompt
        under way, then as many whole queued prompts as fit, right-padded with position -1 (which the
        cache never stores). Only a first row longer than the budget is left part-way, and runs alone."""
        budget = self.prefill_chunk
        carried = self._prefilling[0] if self._prefilling else None
        width = min(len(carried.request.prompt_ids) - carried.prefilled, budget) if carried else 0
        while len(self._running) + len(self._prefilling) < self.max_batch_size:
            rows = len(self._prefilling) + 1
            request = self._pop_queued(lambda n: rows * max(width, min(n, budget)) <= budget)
            if request is None:
                break
            self._prefilling.append(self._new_slot(request))
            width = max(width, min(len(request.prompt_ids), budget))
        if self._prefilling:
            self._prefill_step(width)

    def _pop_queued(self, fits) -> Request | None:
        """The next queued request if `fits(its prompt length)`, finishing cancelled ones on the way;
        first come, first served: one that does not fit waits at the head."""
        cancelled, request = [], None
        with self._cond:
            while self._queue and request is None:
                candidate = self._queue[0]
                if candidate.cancel_requested:
                    cancelled.append(self._queue.popleft())
                elif fits(len(candidate.prompt_ids)):
                    request = self._queue.popleft()
                else:
                    break
        for waiting in cancelled:  # outside the engine lock: consumers take their own locks
            self._finish(waiting, "cancelled")
        return request

    def _new_slot(self, request: Request) -> _Slot:
        params = request.params
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.model.device)
            seen[torch.tensor(request.prompt_ids, device=seen.device)] = True
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        return _Slot(request=request, generator=torch.Generator().manual_seed(seed),
                     stream=TextStream(self.tokenizer.decode, params.stop), stop_ids=stop_ids, seen=seen)

    def _prefill_step(self, width: int) -> None:
        """Each prefilling row's next piece (at most `width` tokens) as one batch; rows whose prompt
        is done sample their first token and join the running batch."""
        slots, device = self._prefilling, self.model.device
        ids = torch.zeros(len(slots), width, dtype=torch.long)
        positions = torch.full((len(slots), width), -1, dtype=torch.long)
        pieces = []
        for row, slot in enumerate(slots):
            start, end = slot.prefilled, min(slot.prefilled + width, len(slot.request.prompt_ids))
            ids[row, :end - start] = torch.tensor(slot.request.prompt_ids[start:end])
            positions[row, :end - start] = torch.arange(start, end)
            pieces.append(end - start)
        cache = slots[0].cache  # the long prompt under way, if any: its rows come first
        fresh = ModelCache.for_model(self.model, len(slots) - (cache is not None), self.max_context)
        if cache is None:
            cache = fresh
        elif fresh.batch_size:
            cache.extend(fresh)
        with self._adapters_of(slots):
            hidden = self.model.hidden_states(ids.to(device), positions.to(device), cache.layers)
        for row, (slot, piece) in enumerate(zip(slots, pieces)):
            scored, start = slot.request.prompt_logprobs, slot.prefilled
            targets = slot.request.prompt_ids[start + 1:start + piece + 1]  # what this piece's positions predict
            if scored is not None and targets:
                logits = self.model.lm_head(hidden[row, :len(targets)]).float()
                scored += token_choices(logits, torch.tensor(targets, device=device),
                                        [slot.request.params.prompt_logprobs] * len(targets))
            slot.prefilled += piece
            self._counts["prompt_tokens"] += piece
        if slots[0].prefilled < len(slots[0].request.prompt_ids):  # more pieces to come (it ran alone)
            slots[0].cache = cache
            return
        last = torch.tensor(pieces, device=device) - 1  # each row's last real token
        logits = self.model.lm_head(hidden[torch.arange(len(slots), device=device), last]).float()
        for slot in slots:
            slot.cache = None
            slot.position = len(slot.request.prompt_ids)
        choices = self._sample(slots, logits)
        keep = [row for row, (slot, choice) in enumerate(zip(slots, choices)) if not self._advance(slot, choice)]
        if keep:
            if len(keep) < len(slots):
                cache.select(keep)  # stopped at their first token: never join
            if self._batch is None:
                self._batch = cache
            else:
                self._batch.extend(cache)
            self._running.extend(slots[row] for row in keep)
        self._prefilling = []  # only now: a failure above must still find and fail these requests

    def _decode_step(self) -> None:
        """One token for every running request, then let the finished ones leave."""
        device = self.model.device
        tokens = torch.tensor([[s.last_token] for s in self._running], device=device)
        positions = torch.tensor([[s.position] for s in self._running], device=device)
        if self.decoder is not None:
            logits = self.decoder(tokens, positions, self._batch, max(s.position for s in self._running))
        else:
            with self._adapters_of(self._running):
                hidden = self.model.hidden_states(tokens, positions, self._batch.layers)
            logits = self.model.lm_head(hidden[:, -1]).float()
        for slot in self._running:
            slot.position += 1  # the token sampled now is fed one position further on
        choices = self._sample(self._running, logits)
        finished = [self._advance(slot, choice) for slot, choice in zip(self._running, choices)]
        if any(finished):
            self._keep([not f for f in finished])

    def _adapters_of(self, slots: list[_Slot]) -> contextlib.AbstractContextManager:
        """Each row's adapter for one forward (nothing to set without adapters)."""
        if self.adapters is None:
            return contextlib.nullcontext()
        return self.adapters.use([slot.request.params.adapter for slot in slots])

    def _sample(self, slots: list[_Slot], logits: torch.Tensor) -> list[Choice]:
        seen = None
        if any(s.seen is not None for s in slots):
            empty = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            seen = torch.stack([s.seen if s.seen is not None else empty for s in slots])
        return sample_tokens(logits, [s.request.params for s in slots], [s.generator for s in slots], seen)

    def _advance(self, slot: _Slot, choice: Choice) -> bool:
        """Record a sampled token, send its event; True when the request is finished."""
        request, params, token = slot.request, slot.request.params, choice.token_id
        if params.max_new_tokens == 0:  # the prompt only, for its logprobs: no token, no event
            request._deliver(finish="length")
            self._counts["requests_finished"] += 1
            return True
        request.completion_tokens += 1
        self._counts["tokens_generated"] += 1
        finish = None
        if token in slot.stop_ids:
            text, finish = slot.stream.flush(), "stop"  # the stop token itself is not shown
        else:
            text, hit = slot.stream.push(token)
            if hit:
                finish = "stop"
            elif request.completion_tokens >= params.max_new_tokens:
                text, finish = text + slot.stream.flush(), "length"
        request._deliver(TokenEvent(token, text, choice.logprob, choice.top_logprobs, finish), finish)
        if finish is not None:
            self._counts["requests_finished"] += 1
            return True
        if slot.seen is not None:
            slot.seen[token] = True
        slot.last_token = token
        return False

    def _keep(self, keep: list[bool]) -> None:
        """Drop the running slots (and their cache rows) whose flag is False."""
        rows = [i for i, k in enumerate(keep) if k]
        self._running = [self._running[i] for i in rows]
        if rows:
            self._batch.select(rows)
        else:
            self._batch = None

    def _finish(self, request: Request, reason: str, error: BaseException | None = None) -> None:
        """End a request without a final token event (cancelled or failed)."""
        if request.done:
            return
        request._deliver(finish=reason, error=error)
        self._counts["requests_cancelled" if reason == "cancelled" else "requests_failed"] += 1


def _end_token_ids(tokenizer, model: Transformer) -> set[int]:
    """The tokenizer's end of text and end of turn; the config's eos ids only for a tokenizer without
    them (a model pretrained here keeps Llama 4's eos_token_id 2, which is our tokenizer's <|pad|>)."""
    ids = {getattr(tokenizer, name, None) for name in ("eos_id", "eot_id")}
    ids = {i for i in ids if isinstance(i, int)}
    if not ids:
        eos = model.config.eos_token_id
        ids = {eos} if isinstance(eos, int) else set(eos or [])
    return {i for i in ids if 0 <= i < model.config.vocab_size}
