"""Task metrics from per-item results, and the per-item numbers a comparison resamples.

Every task's primary metric is a ratio of sums over items, sum(numerator) / sum(denominator):
accuracy is sum(correct) / count, bits per byte is sum(nats / ln 2) / sum(bytes). Writing both
the same way lets `compare` bootstrap any task with one piece of code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from behemoth.eval.safety import ITEM_SCORES, summarize_safety
from behemoth.eval.tasks import GENERATE, LAST_WORD, MINIMAL_PAIRS, MULTIPLE_CHOICE, PERPLEXITY, SAFETY

ACCURACY_KINDS = (MULTIPLE_CHOICE, LAST_WORD, MINIMAL_PAIRS)
PASS_AT = (1, 5, 10, 20, 50, 100)  # the k of the pass@k reported, up to the samples drawn


def summarize(kind: str, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The metrics of a task from its items' results."""
    n = len(items)
    if kind in ACCURACY_KINDS:
        metrics: dict[str, Any] = {"n": n, "acc": _mean([i["acc"] for i in items])}
        if kind == MULTIPLE_CHOICE:
            metrics["acc_norm"] = _mean([i["acc_norm"] for i in items])
        metrics["chance"] = _mean([i["chance"] for i in items])
        if kind == MINIMAL_PAIRS:
            groups: dict[str, list[int]] = {}
            for item in items:
                groups.setdefault(item["group"], []).append(item["acc"])
            metrics["groups"] = {g: _mean(v) for g, v in sorted(groups.items())}
        return metrics
    if kind == PERPLEXITY:
        nats = sum(i["nats"] for i in items)
        tokens = sum(i["tokens"] for i in items)
        n_bytes = sum(i["bytes"] for i in items)
        return {"n": n, "bpb": nats / math.log(2) / n_bytes if n_bytes else float("nan"),
                "nats_per_token": nats / tokens if tokens else float("nan"),
                "perplexity": math.exp(nats / tokens) if tokens else float("nan"),
                "tokens": tokens, "bytes": n_bytes}
    if kind == SAFETY:
        return summarize_safety(items)
    if kind == GENERATE:
        return {"n": n, "pass@1": _mean([i["pass@1"] for i in items]), **_sampled_pass_at(items)}
    return {"n": n}


def _sampled_pass_at(items: Sequence[dict[str, Any]]) -> dict[str, float]:
    """pass@k over sampled replies (unbiased estimator, averaged over items), when they were drawn."""
    from behemoth.eval.scoring import pass_at_k

    drawn = min((len(i.get("samples", ())) for i in items), default=0)
    return {f"sampled_pass@{k}": _mean([pass_at_k(len(i["samples"]), i["sampled_correct"], k) for i in items])
            for k in PASS_AT if k <= drawn}


def stderr(kind: str, metric: str, items: Sequence[dict[str, Any]]) -> float | None:
    """Standard error of an accuracy or rate (binomial); None for other metrics."""
    if kind == SAFETY:  # over the items the classifier scored
        items = [i for i in items if "failed" not in i]
        metric = ITEM_SCORES[metric]
    if kind not in (*ACCURACY_KINDS, GENERATE, SAFETY) or not items:
        return None
    p = _mean([i[metric] for i in items])
    return math.sqrt(p * (1 - p) / len(items))


def ratio_terms(kind: str, metric: str, item: dict[str, Any]) -> tuple[float, float]:
    """(numerator, denominator) of one item in its task's primary metric."""
    if kind == PERPLEXITY:
        return item["nats"] / math.log(2), float(item["bytes"])
    if kind == SAFETY:  # an item the classifier failed on counts in neither part
        return (0.0, 0.0) if "failed" in item else (float(item[ITEM_SCORES[metric]]), 1.0)
    return float(item[metric]), 1.0


def centred(accuracy: float, chance: float) -> float:
    """Accuracy rescaled so chance is 0 and perfect is 1 (below chance is negative)."""
    return (accuracy - chance) / (1.0 - chance)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
