"""`behemoth gate`: evaluate a candidate model under a policy and write the decision record
(`decision.json`, `decision.md` and `evals/` in out_dir; fields in docs/RELEASE.md, section 2).

`inputs_sha256` hashes everything the decision depends on, so equal inputs give equal checksums and
decisions; the record file's own SHA-256 is what the audit log's "decision" entry and `approve` name.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from behemoth.errors import BehemothError
from behemoth.hashing import sha256_file
from behemoth.release import audit
from behemoth.release.policy import BASELINE_CONDITIONS, DECISIONS, MODEL_KINDS, Policy, PolicyError, Rule, load_policy

DECISION_SCHEMA = "behemoth.release.decision/1"
RECORD_FILE, RECORD_MARKDOWN = "decision.json", "decision.md"
DEFAULT_LOG = Path("releases") / "audit.jsonl"
IDENTITY = ("weights_sha256", "config_sha256", "tokenizer_sha256")  # a model's checksums


class GateError(BehemothError):
    """The gate cannot run on these inputs, or a record is unusable."""


def model_identity(directory: str | Path) -> dict[str, Any]:
    """What names a model: checksums of its weights, config and tokenizer (the folder may move)."""
    from behemoth.eval.run import load_model_tokenizer, model_checksum
    from behemoth.eval.errors import EvalError

    folder = Path(directory)
    try:
        load_model_tokenizer(folder)  # a folder without config or tokenizer is refused by name
        weights = model_checksum(folder)
    except EvalError as err:
        raise GateError(str(err)) from None
    from behemoth.checkpoint import model_name

    return {"path": str(folder.resolve()), "name": model_name(folder), "weights_sha256": weights,
            "config_sha256": sha256_file(folder / "config.json"),
            "tokenizer_sha256": sha256_file(folder / "tokenizer.json")}


def adapter_identity(adapter_dir: str | Path, base_dir: str | Path | None = None) -> dict[str, Any]:
    """What names a LoRA adapter release: its files' checksums and (given `base_dir`) the base it adapts."""
    from behemoth.lora_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    folder = Path(adapter_dir)
    for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / file).is_file():
            raise GateError(f"{folder}: no {file} (not an adapter folder)")
    identity = {"path": str(folder.resolve()), "weights_sha256": sha256_file(folder / ADAPTER_WEIGHTS),
                "config_sha256": sha256_file(folder / ADAPTER_CONFIG)}
    return identity if base_dir is None else {**identity, "base": model_identity(base_dir)}


def changed_part(folder: str | Path, identity: dict[str, Any]) -> str | None:
    """"weights", "config" or "tokenizer": the first whose checksum in `folder` is no longer
    `identity`'s (a `model_identity`), or None when the folder holds the same model."""
    now = model_identity(folder)
    return next((key.removesuffix("_sha256") for key in IDENTITY if now[key] != identity.get(key)), None)


def run_gate(model_dir: str | Path, policy: Policy | str | Path | None, out_dir: str | Path, *,
             baseline: str | Path | None = None, variables: dict[str, str] | None = None,
             log: str | Path = DEFAULT_LOG, progress: bool | None = None, kind: str = "chat",
             adapter: str | Path | None = None) -> dict[str, Any]:
    """Evaluate, apply the policy's rules in order, write the record and log the decision. `kind`
    ("chat" or "base") says what the model is: evaluations meant for the other kind are not run.
    With `adapter`, the candidate is that LoRA adapter over the base `model_dir`: the gate evaluates
    the merged model (written to out_dir/adapted-model), names the adapter's and the base's checksums,
    and compares against the base unless another `baseline` is given."""
    from behemoth.eval import compare_results, run_eval, write_json_atomic
    from behemoth.release.cards import decision_markdown

    policy = policy if isinstance(policy, Policy) else load_policy(policy)
    if kind not in MODEL_KINDS:
        raise GateError(f"--kind {kind!r}: give one of {', '.join(MODEL_KINDS)}")
    variables = dict(variables or {})
    out = Path(out_dir)
    if (out / RECORD_FILE).exists():
        raise GateError(f"{out / RECORD_FILE}: a decision record is already there; records are never "
                        "overwritten, choose another --out")
    unknown = sorted(set(variables) - policy.variables())
    if unknown:
        raise PolicyError(f"--var {unknown[0]}: the policy {policy.name!r} uses no such variable")
    task_lists = {name: e.task_list(variables) for name, e in policy.evaluations.items()}  # every ${VAR} given
    audit.verify_log(log)  # a broken log stops the gate before any work
    adapted = None
    if adapter is not None:
        from behemoth.export.merge import merge_adapter

        adapted = adapter_identity(adapter, model_dir)
        baseline = model_dir if baseline is None else baseline
        model_dir = merge_adapter(model_dir, adapter, out / "adapted-model", overwrite=True)
    model = model_identity(model_dir)
    if adapted is not None:
        model["adapter"] = adapted
    base = model_identity(baseline) if baseline is not None else None

    evaluations: dict[str, dict[str, Any]] = {}
    done: dict[tuple, dict[str, Any]] = {}  # evaluations with the same tasks and settings run once
    for name, evaluation in policy.evaluations.items():
        if not evaluation.applies_to(kind):
            continue
        settings = dict(limit=evaluation.limit, max_length=evaluation.max_length, batch_size=evaluation.batch_size,
                        seed=evaluation.seed)
        key = (task_lists[name], *settings.values())
        if key in done:
            results = done[key]
            write_json_atomic(out / "evals" / f"{name}.json", results)
        else:
            results = done[key] = run_eval(model_dir, task_lists[name], out=out / "evals" / f"{name}.json",
                                           progress=progress, **settings)
        entry = {"tasks": task_lists[name], "results": f"evals/{name}.json", "baseline_results": None,
                 "metrics": _metrics(results), "comparison": None,
                 "data": {task: [d["sha256"] for d in t.get("data", [])] for task, t in results["tasks"].items()}}
        if base is not None and policy.needs_baseline(name):
            previous = run_eval(baseline, task_lists[name], out=out / "evals" / f"{name}.baseline.json",
                                progress=progress, **settings)
            overall = compare_results(previous, results, resamples=policy.compare.resamples,
                                      confidence=policy.compare.confidence, seed=policy.compare.seed)["overall"]
            entry["baseline_results"] = f"evals/{name}.baseline.json"
            kept = ("verdict", "metric", "a", "b", "delta", "ci", "better", "worse")
            entry["comparison"] = {key: overall.get(key) for key in kept}
        evaluations[name] = entry

    trace, fired = decide(policy, evaluations, has_baseline=base is not None)
    record = {"schema": DECISION_SCHEMA, "created": audit.utc_now(), "model": model, "kind": kind, "baseline": base,
              "policy": {"path": policy.path, "name": policy.name, "sha256": policy.sha256},
              "variables": variables, "evaluations": evaluations, "rules": trace,
              "decision": fired.decision, "rule": fired.name, "reason": _reason(fired, trace),
              "audit_log": str(Path(log).resolve())}
    record["inputs_sha256"] = inputs_checksum(record)
    out.mkdir(parents=True, exist_ok=True)
    (out / RECORD_MARKDOWN).write_text(decision_markdown(record, out), encoding="utf-8")
    write_json_atomic(out / RECORD_FILE, record)  # last: its presence means the record is complete
    audit.append(log, "decision", {"record_sha256": sha256_file(out / RECORD_FILE), "record": str(out.resolve()),
                                   "decision": record["decision"], "rule": record["rule"],
                                   "model_weights_sha256": model["weights_sha256"],
                                   **({"adapter_weights_sha256": adapted["weights_sha256"],
                                       "base_weights_sha256": adapted["base"]["weights_sha256"]} if adapted else {}),
                                   "policy_sha256": policy.sha256, "inputs_sha256": record["inputs_sha256"]})
    return record


def decide(policy: Policy, evaluations: dict[str, dict[str, Any]], has_baseline: bool) -> tuple[list[dict], Rule]:
    """Try the rules in order: the trace of every rule tried (and why) and the first that fired."""
    trace = []
    for rule in policy.rules:
        fired, why = _test(rule, evaluations, has_baseline)
        trace.append({"name": rule.name, "decision": rule.decision, "condition": rule.describe(),
                      "fired": fired, "why": why})
        if fired:
            return trace, rule
    raise PolicyError(f"{policy.path}: no rule fired")  # unreachable: load_policy demands a final `always`


def _test(rule: Rule, evaluations: dict[str, dict[str, Any]], has_baseline: bool) -> tuple[bool, str]:
    if rule.when == "always":
        return True, "the default when no earlier rule fired"
    entry = evaluations.get(rule.evaluation)
    if entry is None:
        return False, f"evaluation {rule.evaluation!r} is not run for this kind of model (rule skipped)"
    if rule.when in BASELINE_CONDITIONS:
        comparison = entry["comparison"]
        if not has_baseline or comparison is None:
            fire = rule.without_baseline == "fire"
            return fire, "no baseline to compare with (" + ("treated as firing" if fire else "rule skipped") + ")"
        if rule.when == "not_better":
            verdict = comparison["verdict"]
            shown = _interval_text(comparison)
            return verdict != "better", f"overall verdict against the baseline: {verdict}{shown}"
        worse = comparison["worse"]
        return bool(worse), ("tasks measurably worse: " + ", ".join(worse)) if worse else "no task measurably worse"
    value = _metric_value(entry["metrics"], rule)
    if rule.at_least is not None:
        return value >= rule.at_least, f"{rule.task} {rule.metric} = {value:.4f} (threshold >= {rule.at_least:g})"
    return value <= rule.at_most, f"{rule.task} {rule.metric} = {value:.4f} (threshold <= {rule.at_most:g})"


def _metric_value(metrics: dict[str, dict[str, Any]], rule: Rule) -> float:
    task = metrics.get(rule.task)
    if task is None:
        raise PolicyError(f"rule {rule.name!r}: evaluation {rule.evaluation!r} has no task {rule.task!r} "
                          f"(it ran: {', '.join(metrics) or 'nothing'})")
    value = task.get(rule.metric)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        raise PolicyError(f"rule {rule.name!r}: task {rule.task!r} has no numeric metric {rule.metric!r} "
                          f"(it has: {', '.join(k for k, v in task.items() if isinstance(v, (int, float)))})")
    return float(value)


def _interval_text(comparison: dict[str, Any]) -> str:
    if comparison.get("ci") is None:
        return ""
    low, high = comparison["ci"]
    return f" ({comparison['metric']} change {comparison['delta']:+.4f}, 95% interval [{low:+.4f}, {high:+.4f}])"


def _reason(fired: Rule, trace: list[dict]) -> str:
    why = trace[-1]["why"]
    return f"{fired.reason} ({why})" if fired.reason else f"rule {fired.name!r}: {why}"


def _metrics(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per task, the numbers a threshold rule may name; "core" is the aggregate core score."""
    metrics = {name: {k: v for k, v in task.get("metrics", {}).items() if isinstance(v, (int, float))}
               for name, task in results["tasks"].items()}
    for name, task in results["tasks"].items():  # an interval X_ci gives X_low and X_high
        for key, value in task.get("metrics", {}).items():
            if key.endswith("_ci") and isinstance(value, list):
                stem = key.removesuffix("_ci")
                metrics[name][f"{stem}_low"], metrics[name][f"{stem}_high"] = value
    if results.get("core", {}).get("score") is not None:
        metrics["core"] = {"score": results["core"]["score"]}
    return metrics


def inputs_checksum(record: dict[str, Any]) -> str:
    """SHA-256 of what the decision depends on; equal inputs give equal checksums (and decisions)."""
    def identity(model: dict[str, Any] | None) -> Any:
        if model is None:
            return None
        named = {k: v for k, v in model.items() if k.endswith("sha256")}
        if "adapter" in model:  # an adapter's own files and its base
            named["adapter"] = {**identity({k: v for k, v in model["adapter"].items() if k != "base"}),
                                "base": identity(model["adapter"]["base"])}
        return named

    evaluations = {name: {"tasks": e["tasks"], "metrics": e["metrics"], "data": e["data"],
                          "comparison": e["comparison"]} for name, e in record["evaluations"].items()}
    inputs = {"model": identity(record["model"]), "baseline": identity(record["baseline"]),
              "policy": record["policy"]["sha256"], "variables": record["variables"], "kind": record.get("kind"),
              "evaluations": evaluations, "decision": record["decision"], "rule": record["rule"]}
    return hashlib.sha256(audit.canonical(_rounded(inputs))).hexdigest()


def _rounded(value: Any) -> Any:
    """Floats to 12 significant digits, so the checksum does not hinge on the last bit of a sum."""
    if isinstance(value, float):
        return float(f"{value:.12g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def load_record(path: str | Path) -> tuple[dict[str, Any], Path]:
    """(record, its file) from RECORD as given on the command line (the record folder or its decision.json),
    checked for shape; GateError names the file and the problem."""
    from behemoth.jsonio import read_json_object

    file = Path(path) / RECORD_FILE if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise GateError(f"{file}: no decision record (run `behemoth gate ... --out DIR` first)")
    try:
        record = read_json_object(file)
    except BehemothError as err:
        raise GateError(str(err)) from None
    if record.get("schema") != DECISION_SCHEMA:
        raise GateError(f"{file}: not a decision record (schema {record.get('schema')!r})")
    for key in ("model", "policy", "decision", "rule", "audit_log", "inputs_sha256"):
        if key not in record:
            raise GateError(f"{file}: the record has no {key!r}")
    if record["decision"] not in DECISIONS:
        raise GateError(f"{file}: unknown decision {record['decision']!r}")
    return record, file
