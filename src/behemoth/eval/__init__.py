"""Evaluation: benchmark tasks, scoring, the core score, regression verdicts, lm-evaluation-harness.

    run_eval(model_dir, "blimp,hellaswag,ppl:held.txt", limit=100, out="eval.json") -> results dict
    load_results(path) -> results dict
    compare_results(a, b) -> comparison dict (B against baseline A: better / worse / no measurable difference)
    format_table(results), format_comparison(comparison), markdown_table(results, comparison=None) -> str
    evaluate_model(model, tokenizer, tasks, model_info=describe_model(dir, model, tokenizer)) for a loaded model

Modules, one concern each: tasks (names, task-list syntax, data files), scoring (log-likelihoods with
our model), metrics (per-task numbers), core (the chance-centred aggregate), cache (per-item JSON
cache), compare (paired bootstrap, verdicts), tables (results and comparisons as text and Markdown),
run (the whole run), lm_eval_adapter (the `behemoth` model type for lm-evaluation-harness; imported
only on demand).
"""

from behemoth.eval.compare import BETTER, NO_DIFFERENCE, NOT_COMPARED, WORSE, compare_results
from behemoth.eval.cache import write_json_atomic
from behemoth.eval.core import core_score
from behemoth.eval.errors import EvalError
from behemoth.eval.run import describe_model, evaluate_model, load_results, model_checksum, run_eval
from behemoth.eval.tables import format_comparison, format_table, markdown_table, result_rows
from behemoth.eval.tasks import TASK_NAMES, parse_task_list

__all__ = ["run_eval", "evaluate_model", "describe_model", "load_results", "model_checksum", "write_json_atomic",
           "compare_results", "format_comparison",
           "format_table", "markdown_table", "result_rows", "core_score", "parse_task_list", "TASK_NAMES",
           "EvalError", "BETTER", "WORSE", "NO_DIFFERENCE", "NOT_COMPARED"]
