"""Markdown for people: the decision record (`decision.md`) and the model card (`README.md`), built
only from the record, so they never disagree with the JSON. The model card follows the Hugging
Face layout: YAML front matter (license, datasets, tags, `model-index` results), then prose.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from behemoth.jsonio import read_jsonl

DECISION_WORDS = {
    "open": "release the weights openly",
    "closed": "keep the weights closed and serve the model behind API keys",
    "hold": "hold the model back (no release)",
}


def decision_markdown(record: dict[str, Any], folder: Path) -> str:
    """decision.md (in `folder`): what was decided, by which rule and why, and the evidence."""
    model, policy = record["model"], record["policy"]
    lines = [f"# Release decision: {record['decision'].upper()}", "",
             f"**{DECISION_WORDS[record['decision']]}**, by rule `{record['rule']}`: {record['reason']}.", "",
             "This decision takes effect only after sign-off: "
             f"`behemoth release approve {folder} --by NAME`.", "",
             "| | |", "|---|---|",
             f"| model | `{model['path']}` |",
             f"| weights SHA-256 | `{model['weights_sha256']}` |",
             f"| baseline | {_baseline(record)} |",
             f"| policy | `{policy['path']}` ({policy['name']}, SHA-256 `{policy['sha256'][:16]}...`) |",
             f"| inputs SHA-256 | `{record['inputs_sha256']}` |",
             f"| created | {record['created']} |", "",
             "## Rules, in order", "",
             "| rule | decision | condition | fired | why |", "|---|---|---|---|---|"]
    for rule in record["rules"]:
        lines.append(f"| {rule['name']} | {rule['decision']} | {rule['condition']} | "
                     f"{'**yes**' if rule['fired'] else 'no'} | {rule['why']} |")
    lines += ["", "## Evaluations", ""]
    for name, entry in record["evaluations"].items():
        lines += [f"### {name}: `{entry['tasks']}`", "", "| task | metrics |", "|---|---|"]
        for task, metrics in entry["metrics"].items():
            lines.append(f"| {task} | {_metric_text(metrics)} |")
        comparison = entry.get("comparison")
        if comparison:
            lines += ["", f"Against the baseline: **{comparison['verdict']}** ({comparison['metric']} "
                          f"{comparison['a']:.4f} -> {comparison['b']:.4f})."]
        lines.append("")
    return "\n".join(lines)


def _baseline(record: dict[str, Any]) -> str:
    base = record.get("baseline")
    return "none (first release)" if base is None else f"`{base['path']}` (`{base['weights_sha256'][:16]}...`)"


def _metric_text(metrics: dict[str, Any]) -> str:
    shown = [(k, v) for k, v in metrics.items() if k != "n"]
    text = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown)
    return f"{text} (n={metrics['n']})" if "n" in metrics else text


def run_facts(model_dir: Path) -> dict[str, Any] | None:
    """The card's training facts from the run that wrote `model_dir` (`behemoth pretrain` and the
    other stages write it as RUN/model beside RUN/config.toml and RUN/metrics.jsonl); None if the
    folder is not a run's."""
    run = Path(model_dir).parent
    if not (run / "metrics.jsonl").is_file() or not (run / "config.toml").is_file():
        return None
    records = [row for _, row in read_jsonl(run / "metrics.jsonl")]
    config = tomllib.loads((run / "config.toml").read_text())
    if not records:
        return None
    last = records[-1]
    validation = {key: value for record in records for key, value in record.items() if key.startswith("val_")}
    facts = {"run": f"{run.name}: preset {config.get('model', {}).get('preset')}, seed {config.get('run', {}).get('seed')}",
             "steps": f"{last['step']} ({last.get('tokens_seen', 0):,} tokens)",
             "final training loss": f"{last['loss']:.4f}"}
    if validation:
        facts["validation at the last evaluation"] = ", ".join(f"{key.removeprefix('val_')} {value:.4f}"
                                                              for key, value in validation.items())
    return {"datasets": [Path(source).name for source in config.get("data", {}).get("sources", [])], "facts": facts}


def model_card(record: dict[str, Any], approval: dict[str, Any], *, name: str, files: list[str],
               training: dict[str, Any] | None = None, license: str = "apache-2.0") -> str:
    """README.md of an open release: Hugging Face metadata, then what the model is and is not."""
    results = _model_index(record)
    adapter = record.get("model", {}).get("adapter")
    front = {"license": license, "library_name": "peft" if adapter else "transformers",
             "pipeline_tag": "text-generation", "base_model": adapter["base"]["name"] if adapter else None,
             "tags": ["llama4", "mixture-of-experts", "behemoth", "gguf", *(["lora"] if adapter else [])],
             "datasets": sorted((training or {}).get("datasets", [])) or None,
             "model-index": [{"name": name, "results": results}] if results else None}
    # JSON is valid YAML (flow style), and json.dumps quotes every string safely.
    yaml = ["---", *(f"{k}: {json.dumps(v, ensure_ascii=False)}" for k, v in front.items() if v is not None), "---"]
    info = training or {}
    if adapter:
        base = adapter["base"]
        what = (f"A LoRA adapter for the Llama 4 architecture model `{base['name']}` (weights SHA-256 "
                f"`{base['weights_sha256']}`), trained with Behemoth and released openly")
        load = ("Load it over that base with PEFT (`PeftModel.from_pretrained(base_model, folder)`), with "
                "llama.cpp beside the base's GGUF (`--lora` the `.gguf` file), or merge it with "
                "`behemoth merge --model BASE --adapter folder --out DIR`. The gate evaluated the base with "
                "this adapter merged in.")
    else:
        what = "A Llama 4 architecture model trained with Behemoth and released openly"
        load = ("Load it with `transformers` (`AutoModelForCausalLM.from_pretrained(folder)`), with llama.cpp "
                "(the `.gguf` file), or with `behemoth serve --model folder`.")
    lines = [*yaml, "", f"# {name}", "",
             f"{what} after its release gate decided **{record['decision']}** (rule `{record['rule']}`) and "
             f"{approval['by']} approved it on {approval['time']}.", "",
             "## Files", "", *[f"- `{f}`" for f in files], "", load, "",
             "## Training", "", *(f"- {k}: {v}" for k, v in info.get("facts", {}).items()), "",
             "## Evaluation", "",
             "| evaluation | task | metric | value |", "|---|---|---|---|",
             *[f"| {r['evaluation']} | {r['task']} | {r['metric']} | {r['value']:.4f} |" for r in _rows(record)], "",
             "## Intended use", "",
             "Research on small language models: training recipes, distillation, evaluation and release tooling. "
             "It is a toy-scale model unless the training section says otherwise.", "",
             "## Limitations", "",
             "Small models trained briefly produce fluent-looking but unreliable text: they state falsehoods, "
             "repeat themselves and follow instructions poorly. They have had no safety tuning beyond what the "
             "training section lists. Do not use the output for decisions about people.", "",
             "## Release gate", "",
             f"Policy `{record['policy']['name']}` (SHA-256 `{record['policy']['sha256']}`), decision "
             f"**{record['decision']}**: {record['reason']}. The full record is `release/decision.json` "
             f"(SHA-256 in the audit log entry `{approval['record_sha256'][:16]}...`), readable as "
             "`release/decision.md`.", ""]
    return "\n".join(lines)


def _rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for evaluation, entry in record["evaluations"].items():
        for task, metrics in entry["metrics"].items():
            for metric, value in metrics.items():
                if metric not in ("n", "chance") and isinstance(value, (int, float)):
                    rows.append({"evaluation": evaluation, "task": task, "metric": metric, "value": float(value)})
    return rows


def _model_index(record: dict[str, Any]) -> list[dict[str, Any]]:
    first: dict[tuple[str, str], dict[str, Any]] = {}  # each task and metric once, from its first evaluation
    for row in _rows(record):
        first.setdefault((row["task"], row["metric"]), row)
    return [{"task": {"type": "text-generation"}, "dataset": {"name": row["task"], "type": row["task"]},
             "metrics": [{"type": row["metric"], "value": round(row["value"], 6)}]} for row in first.values()]
