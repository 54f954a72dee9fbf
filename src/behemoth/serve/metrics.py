"""Prometheus metrics in the text exposition format (version 0.0.4), without a client library.

Counters and histograms are keyed by label values; gauges are read when scraped (queue depth and
running requests come from each engine's `stats()`). Labels never carry key ids or user text.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)] + ([extra] if extra else [])
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Counter:
    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.labels = name, help, labels
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def inc(self, *values: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[values] = self._values.get(values, 0.0) + amount

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        with self._lock:
            for values, total in sorted(self._values.items()):
                yield f"{self.name}{_labels(self.labels, values)} {_number(total)}"


class Histogram:
    def __init__(self, name: str, help: str, labels: tuple[str, ...] = (),
                 buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.name, self.help, self.labels, self.buckets = name, help, labels, tuple(sorted(buckets))
        self._series: dict[tuple[str, ...], list] = {}  # values -> [bucket counts..., count, sum]
        self._lock = threading.Lock()

    def observe(self, *values: str, value: float) -> None:
        with self._lock:
            series = self._series.setdefault(values, [0] * len(self.buckets) + [0, 0.0])
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    series[i] += 1
            series[-2] += 1
            series[-1] += value

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        with self._lock:
            for values, series in sorted(self._series.items()):
                for bound, count in zip((*self.buckets, math.inf), series):  # the +Inf bucket holds the count
                    le = f'le="{_number(bound)}"'
                    yield f"{self.name}_bucket{_labels(self.labels, values, le)} {count}"
                yield f"{self.name}_count{_labels(self.labels, values)} {series[-2]}"
                yield f"{self.name}_sum{_labels(self.labels, values)} {_number(series[-1])}"


class Gauge:
    """A value read at scrape time: `read()` returns {label values: value}."""

    def __init__(self, name: str, help: str, labels: tuple[str, ...], read: Callable[[], dict[tuple[str, ...], float]]):
        self.name, self.help, self.labels, self._read = name, help, labels, read

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} gauge"
        for values, value in sorted(self._read().items()):
            yield f"{self.name}{_labels(self.labels, values)} {_number(value)}"


class ServerMetrics:
    """The server's metrics; `gauges` is filled in by the app once the engines exist."""

    def __init__(self) -> None:
        self.requests = Counter("behemoth_requests_total", "API requests by route, model and HTTP status.",
                                ("route", "model", "status"))
        self.prompt_tokens = Counter("behemoth_prompt_tokens_total", "Prompt tokens processed.", ("model",))
        self.completion_tokens = Counter("behemoth_completion_tokens_total", "Tokens generated.", ("model",))
        self.latency = Histogram("behemoth_request_latency_seconds",
                                 "Time from request to the last byte of the response.", ("route", "model"))
        self.first_token = Histogram("behemoth_time_to_first_token_seconds",
                                     "Time from request to the first generated token.", ("model",))
        self.guard_flagged = Counter("behemoth_guard_flagged_total",
                                     "Requests (stage request) or replies (stage reply) the guard refused.",
                                     ("model", "stage"))
        self.gauges: list[Gauge] = []

    def render(self) -> str:
        lines: list[str] = []
        for metric in (self.requests, self.prompt_tokens, self.completion_tokens, self.latency,
                       self.first_token, self.guard_flagged, *self.gauges):
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"
