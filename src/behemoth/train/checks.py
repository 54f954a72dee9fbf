"""Generation checks during training: loss says how well a model predicts, post-training is for
what it then says. Each evaluation decodes the first `run.eval_items` prompts of the generative
tasks in `run.eval_tasks` greedily and logs `val_pass@1/TASK` per task and `val_pass@1`, their mean.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from behemoth.errors import ConfigError
from behemoth.model import Transformer
from behemoth.train.config import RunConfig

Check = Callable[[Transformer], dict[str, float]]


def generation_check(run: RunConfig, tokenizer: Any, distributed: bool = False) -> Check | None:
    """The check `run.eval_tasks` asks for (its tasks loaded and checked now), or None."""
    if not run.run.eval_tasks.strip():
        return None
    from behemoth.eval.errors import EvalError
    from behemoth.eval.scoring import Scorer, score_items
    from behemoth.eval.tasks import GENERATE, load_tasks, parse_task_list

    if distributed:
        raise ConfigError("run.eval_tasks: generation checks run in a single process only (for now); "
                          "leave it empty under torchrun")
    try:
        tasks = load_tasks(parse_task_list(run.run.eval_tasks), run.run.eval_items)
    except EvalError as err:
        raise ConfigError(f"run.eval_tasks: {err}") from None
    other = [task.name for task in tasks if task.kind != GENERATE]
    if other:
        raise ConfigError(f"run.eval_tasks: {other[0]} is not a generative task (use gen:FILE or chat:...)")

    def check(model: Transformer) -> dict[str, float]:
        scorer = Scorer(model, tokenizer, batch_size=64)
        rates = {}
        for task in tasks:
            results = score_items(GENERATE, task.items, scorer)
            rates[f"val_pass@1/{task.name}"] = sum(r["pass@1"] for r in results) / len(results)
        return {"val_pass@1": sum(rates.values()) / len(rates), **rates}

    return check
