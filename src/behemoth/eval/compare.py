"""Regression verdicts: is results file B (candidate) better than A (baseline), worse, or not measurably different?

Per task, items are paired by id and resampled together (paired bootstrap); a verdict is "better" or
"worse" when the `confidence` interval of B's metric minus A's lies wholly on one side of zero. As each
has a 5% false-alarm rate, the overall verdict rests on one aggregate: the core score (core.py) over the
accuracy tasks, each replicate resampling every task; else the mean pass@1 of generative tasks, else the
mean bits per byte of perplexity tasks. Output (schema "behemoth.eval.compare/1"):

    {"schema", "a" and "b": {"path", "model_sha256"}, "settings": {"resamples", "confidence", "seed"},
     "tasks": {NAME: {"kind", "metric", "higher_is_better", "n", "a", "b", "delta", "ci": [lo, hi], "verdict"}
              | {"verdict": "not compared", "reason"}}, "only_in_a", "only_in_b", "warnings",
     "overall": {"metric": "core" | "pass@1" | "bpb" | None, "tasks", "a", "b", "delta", "ci", "verdict",
                 "better", "worse"}}
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from behemoth.eval.errors import EvalError
from behemoth.eval.metrics import ACCURACY_KINDS, centred, ratio_terms
from behemoth.eval.tasks import GENERATE, PERPLEXITY

COMPARE_SCHEMA = "behemoth.eval.compare/1"
BETTER, WORSE, NO_DIFFERENCE, NOT_COMPARED = "better", "worse", "no measurable difference", "not compared"
_SETTINGS_THAT_MATTER = ("max_length", "prefix_id", "dtype")


def compare_results(a: dict[str, Any], b: dict[str, Any], *, resamples: int = 2000, confidence: float = 0.95,
                    seed: int = 0, a_path: str | None = None, b_path: str | None = None) -> dict[str, Any]:
    """Per-task deltas (B - A) with bootstrap confidence intervals and verdicts, and an overall verdict."""
    if resamples < 100:
        raise EvalError(f"use at least 100 bootstrap resamples, got {resamples}")
    if not 0.5 <= confidence < 1:
        raise EvalError(f"confidence must be in [0.5, 1), got {confidence}")
    tasks_a, tasks_b = a["tasks"], b["tasks"]
    compared: dict[str, dict[str, Any]] = {}
    replicates: dict[str, np.ndarray] = {}
    for name in [name for name in tasks_a if name in tasks_b]:
        entry, deltas = _compare_task(name, tasks_a[name], tasks_b[name], resamples, confidence, seed)
        if entry is not None:  # None: samples, nothing to score
            compared[name] = entry
        if deltas is not None:
            replicates[name] = deltas
    return {"schema": COMPARE_SCHEMA, "a": {"path": a_path, "model_sha256": a.get("model", {}).get("sha256")},
            "b": {"path": b_path, "model_sha256": b.get("model", {}).get("sha256")},
            "settings": {"resamples": resamples, "confidence": confidence, "seed": seed},
            "tasks": compared, "overall": _overall(compared, replicates, confidence),
            "only_in_a": [n for n in tasks_a if n not in tasks_b and tasks_a[n].get("metric")],
            "only_in_b": [n for n in tasks_b if n not in tasks_a and tasks_b[n].get("metric")],
            "warnings": _warnings(a, b)}


def _compare_task(name: str, ta: dict[str, Any], tb: dict[str, Any], resamples: int, confidence: float,
                  seed: int) -> tuple[dict[str, Any] | None, np.ndarray | None]:
    if not ta.get("metric") and not tb.get("metric"):
        return None, None
    for field, what in (("kind", "task kinds"), ("metric", "metrics"), ("version", "task versions")):
        if ta.get(field) != tb.get(field):
            return _not_compared(f"{what} differ ({ta.get(field)!r} vs {tb.get(field)!r})"), None
    if sorted(d["sha256"] for d in ta.get("data", [])) != sorted(d["sha256"] for d in tb.get("data", [])):
        return _not_compared("the data files differ (SHA-256)"), None
    kind, metric = ta["kind"], ta["metric"]
    by_id = {item["id"]: item for item in tb["items"]}
    pairs = [(item, by_id[item["id"]]) for item in ta["items"] if item["id"] in by_id]
    if not pairs:
        return _not_compared("no items in common"), None
    terms_a, terms_b = (np.array([ratio_terms(kind, metric, pair[side]) for pair in pairs], dtype=np.float64)
                        for side in (0, 1))
    value_a, value_b = (terms[:, 0].sum() / terms[:, 1].sum() for terms in (terms_a, terms_b))
    rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
    deltas = paired_bootstrap(terms_a, terms_b, resamples, rng)
    low, high = _interval(deltas, confidence)
    higher_is_better = bool(ta.get("higher_is_better", True))
    entry = {"kind": kind, "metric": metric, "higher_is_better": higher_is_better, "n": len(pairs),
             "a": float(value_a), "b": float(value_b), "delta": float(value_b - value_a), "ci": [low, high],
             "verdict": verdict(low, high, higher_is_better)}
    if kind in ACCURACY_KINDS:
        entry["chance"] = float(np.mean([ia.get("chance", 0.0) for ia, _ in pairs]))
    return entry, deltas


def _not_compared(reason: str) -> dict[str, Any]:
    return {"verdict": NOT_COMPARED, "reason": reason}


def paired_bootstrap(terms_a: np.ndarray, terms_b: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """B's ratio metric minus A's over `resamples` paired resamples of the items' [n, 2] (numerator,
    denominator) terms; a replicate weighs item i by how often it was drawn (a multinomial count)."""
    n = len(terms_a)
    out = np.empty(resamples, dtype=np.float64)
    step = max(1, 4_000_000 // max(n, 1))  # replicates per block, to bound memory
    probabilities = np.full(n, 1.0 / n)
    for start in range(0, resamples, step):
        count = min(step, resamples - start)
        weights = rng.multinomial(n, probabilities, size=count).astype(np.float64)
        metric_a = (weights @ terms_a[:, 0]) / (weights @ terms_a[:, 1])
        metric_b = (weights @ terms_b[:, 0]) / (weights @ terms_b[:, 1])
        out[start:start + count] = metric_b - metric_a
    return out


def _interval(deltas: np.ndarray, confidence: float) -> list[float]:
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(deltas, [tail, 1.0 - tail])
    return [float(low), float(high)]


def verdict(low: float, high: float, higher_is_better: bool = True) -> str:
    """better / worse / no measurable difference, from a confidence interval of B - A."""
    if low > 0:
        return BETTER if higher_is_better else WORSE
    if high < 0:
        return WORSE if higher_is_better else BETTER
    return NO_DIFFERENCE


def _overall(tasks: dict[str, dict[str, Any]], replicates: dict[str, np.ndarray], confidence: float) -> dict[str, Any]:
    scored = [(n, t["kind"]) for n, t in tasks.items() if n in replicates]
    accuracy = [n for n, kind in scored if kind in ACCURACY_KINDS]
    generative = [n for n, kind in scored if kind == GENERATE]
    perplexity = [n for n, kind in scored if kind == PERPLEXITY]
    better = [n for n, t in tasks.items() if t["verdict"] == BETTER]
    worse = [n for n, t in tasks.items() if t["verdict"] == WORSE]
    if accuracy:
        metric, names, higher_is_better = "core", accuracy, True
    elif generative or perplexity:
        names = generative or perplexity
        metric, higher_is_better = ("pass@1", True) if generative else ("bpb", False)
    else:
        return {"metric": None, "tasks": [], "verdict": NOT_COMPARED, "reason": "no task in common could be compared",
                "better": better, "worse": worse}
    chance = {n: tasks[n]["chance"] if accuracy else 0.0 for n in names}  # chance 0 leaves a metric as it is
    a_value = float(np.mean([centred(tasks[n]["a"], chance[n]) for n in names]))
    b_value = float(np.mean([centred(tasks[n]["b"], chance[n]) for n in names]))
    deltas = np.mean([replicates[n] * (1.0 / (1.0 - chance[n])) for n in names], axis=0)
    low, high = _interval(deltas, confidence)
    return {"metric": metric, "tasks": names, "higher_is_better": higher_is_better, "a": a_value, "b": b_value,
            "delta": b_value - a_value, "ci": [low, high], "verdict": verdict(low, high, higher_is_better),
            "better": better, "worse": worse}


def _warnings(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    settings_a, settings_b = a.get("settings", {}), b.get("settings", {})
    notes = [f"setting {key} differs: {settings_a.get(key)!r} vs {settings_b.get(key)!r}"
             for key in _SETTINGS_THAT_MATTER if settings_a.get(key) != settings_b.get(key)]
    if a.get("model", {}).get("sha256") and a.get("model", {}).get("sha256") == b.get("model", {}).get("sha256"):
        notes.append("both results are of the same weights (same model checksum)")
    return notes
