"""The aggregate "core" score (the idea of DCLM's CORE metric): accuracy above chance, averaged over tasks.

Raw accuracies do not compare across tasks (chance is 25% on HellaSwag, 50% on BLiMP), and a tiny model's
progress hides below those floors: so each accuracy task is rescaled to (acc - chance) / (1 - chance),
chance being the mean of 1/choices over its items. Perplexity tasks and samples do not enter it.
"""

from __future__ import annotations

from typing import Any

from behemoth.eval.metrics import ACCURACY_KINDS, centred


def core_score(tasks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`{"score": float | None, "tasks": {name: {"metric", "accuracy", "chance", "centred"}}}` from a
    results file's "tasks" mapping."""
    parts = {}
    for name, task in tasks.items():
        if task.get("kind") not in ACCURACY_KINDS or not task.get("metrics", {}).get("n"):
            continue
        metric = task["metric"]
        accuracy, chance = task["metrics"][metric], task["metrics"]["chance"]
        parts[name] = {"metric": metric, "accuracy": accuracy, "chance": chance, "centred": centred(accuracy, chance)}
    score = sum(p["centred"] for p in parts.values()) / len(parts) if parts else None
    return {"score": score, "tasks": parts}
