"""Results and comparisons as tables: plain text for the terminal, Markdown for reports."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from behemoth.eval.compare import NOT_COMPARED
from behemoth.eval.metrics import centred
from behemoth.eval.tasks import SAMPLES


def result_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per scored task: name, metric, value, stderr, n, chance, centred (None where it does not apply)."""
    rows = []
    for name, task in results["tasks"].items():
        if task["kind"] == SAMPLES:
            continue
        metrics, metric = task["metrics"], task["metric"]
        chance, value = metrics.get("chance"), metrics.get(metric)
        rows.append({"task": name, "metric": metric, "value": value, "stderr": task.get("stderr"),
                     "n": metrics.get("n"), "chance": chance,
                     "centred": centred(value, chance) if chance is not None and value is not None else None,
                     "higher_is_better": task.get("higher_is_better", True)})
    return rows


def format_table(results: dict[str, Any], samples: bool = True) -> str:
    """The terminal table: each task's primary metric, then the core score, then samples."""
    table = [("task", "metric", "value", "± stderr", "n", "chance", "centred")]
    for row in result_rows(results):
        table.append((row["task"], row["metric"] + ("" if row["higher_is_better"] else " (lower is better)"),
                      _num(row["value"]), _num(row["stderr"]), str(row["n"]), _num(row["chance"], 3),
                      _num(row["centred"])))
    lines = _columns(table)
    core = results.get("core", {})
    if core.get("score") is not None:
        lines.append(f"core score (mean accuracy above chance over {len(core['tasks'])} task(s)): {core['score']:.4f}")
    extras = _details(results)
    if extras:
        lines += ["", *extras]
    for name, task in results["tasks"].items():
        if samples and task["kind"] == SAMPLES:
            lines += ["", f"{name} (temperature {results['settings']['samples']['temperature']}):"]
            lines += [f"  [seed {s['seed']}] {s['prompt']}{s['text']}".replace("\n", " ") for s in task["items"]]
    model = results.get("model", {})
    lines += ["", f"model {model.get('path')} (sha256 {str(model.get('sha256'))[:16]}...), "
                  f"{results.get('elapsed_s', 0):.1f} s"]
    return "\n".join(lines)


def _details(results: dict[str, Any]) -> list[str]:
    """Secondary numbers worth a line: acc and acc_norm side by side, perplexity, BLiMP paradigms."""
    lines = []
    for name, task in results["tasks"].items():
        metrics = task["metrics"]
        if "acc_norm" in metrics:
            lines.append(f"{name}: acc {metrics['acc']:.4f}, acc_norm {metrics['acc_norm']:.4f} "
                         f"({task.get('total_items')} items available)")
        elif "perplexity" in metrics:
            lines.append(f"{name}: {metrics['bpb']:.4f} bits/byte, token perplexity {metrics['perplexity']:.2f}, "
                         f"{metrics['tokens']:,} tokens in {metrics['n']} documents")
        elif any(key.startswith("sampled_pass@") for key in metrics):
            sampled = ", ".join(f"{key.removeprefix('sampled_')} {v:.4f}" for key, v in metrics.items()
                                if key.startswith("sampled_pass@"))
            temperature = results["settings"]["generation"]["temperature"]
            lines.append(f"{name}: sampled at temperature {temperature}: {sampled}")
        elif "categories" in metrics:
            lines.append(safety_line(name, task))
        elif "groups" in metrics:
            groups = ", ".join(f"{g} {v:.2f}" for g, v in metrics["groups"].items())
            lines.append(f"{name}: {groups}")
    return lines


def safety_line(name: str, task: dict[str, Any]) -> str:
    """A safety task's rates with their intervals, and the primary rate per category."""
    metrics, metric = task["metrics"], task["metric"]
    rates = ", ".join(f"{key.removesuffix('_rate').replace('_', ' ')} {metrics[key]:.3f} "
                      f"[{metrics[key + '_ci'][0]:.3f}, {metrics[key + '_ci'][1]:.3f}]"
                      for key in ("refusal_rate", "attack_success_rate", "compliance_rate") if key in metrics)
    rated = {c: r[metric] for c, r in metrics["categories"].items() if metric in r}
    categories = ", ".join(f"{c} {rate:.2f}" for c, rate in rated.items())
    failed = ""
    if metrics["failed"]:
        # The first failure's cause, so a refused key or an unreadable judge shows where it happened.
        cause = next((i.get("api_error") or i.get("judge_raw") for i in task.get("items", []) if "failed" in i), None)
        failed = f"{metrics['failed']} not judged (classifier failures" + (f"; first: {cause[:160]}" if cause else "") + ")"
    head = "; ".join(part for part in (rates or "no rates", failed) if part)
    return f"{name}: {head}" + (f"\n  {metric} by category: {categories}" if len(rated) > 1 else "")


def markdown_table(results: dict[str, Any], comparison: dict[str, Any] | None = None) -> str:
    """A Markdown table of the results; with a comparison (results as B), its deltas and verdicts too."""
    header = ["task", "metric", "value", "n", "centred"]
    if comparison:
        header += ["previous", "change", f"{comparison['settings']['confidence']:.0%} CI", "verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result_rows(results):
        cells = [row["task"], row["metric"] + ("" if row["higher_is_better"] else " ↓"), _num(row["value"]),
                 str(row["n"]), _num(row["centred"])]
        if comparison:
            cells += _comparison_cells(comparison["tasks"].get(row["task"]))
        lines.append("| " + " | ".join(cells) + " |")
    core = results.get("core", {})
    if core.get("score") is not None:
        cells = ["**core**", "mean centred acc", _num(core["score"]), "", _num(core["score"])]
        if comparison:
            overall = comparison["overall"]
            cells += _comparison_cells(overall if overall.get("metric") == "core" else None)
        lines.append("| " + " | ".join(cells) + " |")
    if comparison:
        overall = comparison["overall"]
        lines += ["", f"Overall verdict against the previous run: **{overall['verdict']}**"
                  + (f" ({overall['metric']} {_signed(overall['delta'])}, CI {_interval(overall['ci'])})"
                     if overall.get("metric") else "")]
    return "\n".join(lines)


def format_comparison(comparison: dict[str, Any]) -> str:
    """Per-task deltas, intervals and verdicts as a plain-text table, then the overall verdict."""
    confidence = comparison["settings"]["confidence"]
    rows = [("task", "metric", "n", "A", "B", "B - A", f"{confidence:.0%} CI", "verdict")]
    for name, task in comparison["tasks"].items():
        if task["verdict"] == NOT_COMPARED:
            rows.append((name, "", "", "", "", "", "", f"not compared: {task['reason']}"))
            continue
        rows.append((name, task["metric"], str(task["n"]), _num(task["a"]), _num(task["b"]),
                     _signed(task["delta"]), _interval(task["ci"]), task["verdict"]))
    overall = comparison["overall"]
    lines = _columns(rows)
    if overall["metric"]:
        what = {"core": "core score", "pass@1": "mean pass@1"}.get(overall["metric"], "mean bits per byte")
        lines += ["", f"overall ({what} over {len(overall['tasks'])} task(s)): {_num(overall['a'])} -> "
                      f"{_num(overall['b'])}, {_signed(overall['delta'])} {_interval(overall['ci'])}: "
                      f"{overall['verdict'].upper()}"]
    else:
        lines.append(f"overall: {overall['verdict']} ({overall['reason']})")
    for key, label in (("only_in_a", "only in A"), ("only_in_b", "only in B")):
        if comparison[key]:
            lines.append(f"{label}: {', '.join(comparison[key])}")
    lines.extend(f"warning: {note}" for note in comparison["warnings"])
    return "\n".join(lines)


def _comparison_cells(entry: dict[str, Any] | None) -> list[str]:
    if entry is None:
        return ["", "", "", "new"]
    if entry["verdict"] == NOT_COMPARED:
        return ["", "", "", f"not compared ({entry['reason']})"]
    return [_num(entry["a"]), _signed(entry["delta"]), _interval(entry["ci"]), entry["verdict"]]


def _num(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _signed(value: float) -> str:
    return f"{value:+.4f}"


def _interval(ci: Sequence[float]) -> str:
    return f"[{_signed(ci[0])}, {_signed(ci[1])}]"


def _columns(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
