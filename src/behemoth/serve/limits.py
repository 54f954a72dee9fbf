"""Per-key rate limits (requests and tokens per sliding minute) and token quotas (a hard cap). A
request reserves prompt + max_tokens and settles to what it used when it ends, so a burst of
concurrent requests cannot overrun a limit before the first finishes.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from behemoth.serve.keys import KeyRecord

WINDOW_SECONDS = 60.0


class RateLimited(Exception):
    """A request over a key's limit: HTTP 429. `code` is OpenAI's `rate_limit_exceeded` or
    `insufficient_quota`; `retry_after` is seconds until it could pass, if waiting helps."""

    def __init__(self, message: str, code: str, retry_after: float | None):
        super().__init__(message)
        self.code, self.retry_after = code, retry_after


@dataclass
class _Usage:
    window: deque = field(default_factory=deque)  # [admitted_at, tokens] per request, oldest first
    total: int = 0            # settled tokens over the key's life
    outstanding: int = 0      # tokens reserved by requests still running


class Ticket:
    """An admitted request: `reserve` the tokens it may use, then `settle` what it used (once)."""

    def __init__(self, limiter: RateLimiter, key: KeyRecord, usage: _Usage, entry: list):
        self._limiter, self._key, self._usage, self._entry = limiter, key, usage, entry
        self._reserved, self._settled = 0, False

    def reserve(self, tokens: int) -> None:
        """Reserve up to `tokens` (prompt + max_tokens), or raise RateLimited."""
        limiter, usage, limits = self._limiter, self._usage, self._key.limits
        tpm, quota = limits.tokens_per_minute, limits.token_quota
        now = limiter._clock()
        with limiter._lock:
            if self._settled or self._reserved:
                raise RuntimeError("a ticket reserves once, before it is settled")
            _prune(usage, now)
            if tpm is not None:
                if tokens > tpm:
                    raise RateLimited(f"Request too large: it may use {tokens} tokens (prompt + "
                                      f"max_tokens), more than this key's limit of {tpm} tokens per minute; "
                                      "lower max_tokens.",
                                      "rate_limit_exceeded", None)
                in_window = sum(entry[1] for entry in usage.window)
                if in_window + tokens > tpm:
                    raise RateLimited(f"Rate limit reached for tokens per minute: limit {tpm}, used "
                                      f"{in_window}, requested {tokens}.", "rate_limit_exceeded",
                                      _wait(usage, now, in_window + tokens - tpm))
            if quota is not None and usage.total + usage.outstanding + tokens > quota:
                left = max(quota - usage.total - usage.outstanding, 0)
                raise RateLimited(f"You exceeded your token quota: {left} of {quota} tokens left, this "
                                  f"request may use {tokens}.", "insufficient_quota", None)
            self._entry[1] = self._reserved = tokens
            usage.outstanding += tokens

    def settle(self, tokens: int) -> None:
        with self._limiter._lock:
            if self._settled:
                return
            self._settled = True
            self._entry[1] = tokens
            self._usage.outstanding -= self._reserved
            self._usage.total += tokens


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic, used: Mapping[str, int] | None = None):
        """used: tokens each key id has already spent (from the audit log), for quotas."""
        self._clock = clock
        self._lock = threading.Lock()
        self._usage: dict[str, _Usage] = {key_id: _Usage(total=tokens) for key_id, tokens in (used or {}).items()}

    def used(self, key_id: str) -> int:
        with self._lock:
            usage = self._usage.get(key_id)
            return usage.total if usage else 0

    def admit(self, key: KeyRecord) -> Ticket:
        """Count one request against the key's requests per minute, or raise RateLimited."""
        now = self._clock()
        rpm = key.limits.requests_per_minute
        with self._lock:
            usage = self._usage.setdefault(key.id, _Usage())
            _prune(usage, now)
            if rpm is not None and len(usage.window) >= rpm:
                raise RateLimited(f"Rate limit reached for requests per minute: limit {rpm}.",
                                  "rate_limit_exceeded", _wait(usage, now, 0))
            entry = [now, 0]
            usage.window.append(entry)
            return Ticket(self, key, usage, entry)


def _prune(usage: _Usage, now: float) -> None:
    while usage.window and usage.window[0][0] <= now - WINDOW_SECONDS:
        usage.window.popleft()


def _wait(usage: _Usage, now: float, tokens_to_free: int) -> float:
    """Seconds until enough of the oldest entries leave the window (one, for requests)."""
    freed = 0
    for admitted_at, tokens in usage.window:
        freed += tokens
        if freed >= tokens_to_free:
            return max(math.ceil(admitted_at + WINDOW_SECONDS - now), 1)
    return WINDOW_SECONDS
