"""Evaluation: benchmark tasks, scoring, the core score, regression verdicts, lm-evaluation-harness.

    run_eval(model_dir, "blimp,hellaswag,ppl:held.txt", limit=100, out="eval.json") -> results dict
    compare_results(a, b) -> B against baseline A: better / worse / no measurable difference
    evaluate_model(model, tokenizer, tasks, model_info=describe_model(dir, model, tokenizer)) for a loaded model
"""

from behemoth.eval.compare import BETTER, NO_DIFFERENCE, NOT_COMPARED, WORSE, compare_results
from behemoth.eval.cache import write_json_atomic
from behemoth.eval.core import core_score
from behemoth.eval.errors import EvalError
from behemoth.eval.run import describe_model, evaluate_model, load_results, model_checksum, run_eval
from behemoth.eval.tables import format_comparison, format_table, markdown_table, result_rows
from behemoth.eval.tasks import TASK_NAMES, parse_task_list

__all__ = ["run_eval", "evaluate_model", "describe_model", "load_results", "model_checksum", "write_json_atomic",
           "compare_results", "format_comparison", "format_table", "markdown_table", "result_rows",
           "core_score", "parse_task_list", "TASK_NAMES", "EvalError", "BETTER", "WORSE", "NO_DIFFERENCE",
           "NOT_COMPARED"]
