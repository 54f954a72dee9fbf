"""Release policies: which evaluations to run, and the ordered rules that map results to a decision.

A policy is a TOML file (schema "behemoth.release.policy/1", every key in docs/RELEASE.md; the default
ships beside this module), checked whole when loaded: unknown keys, wrong types, rules naming no
evaluation, rules that can never fire (`_covers`), and a last rule other than `always` are refused.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from behemoth.errors import BehemothError

POLICY_SCHEMA = "behemoth.release.policy/1"
DECISIONS = ("hold", "closed", "open")
CONDITIONS = ("not_better", "any_worse", "threshold", "always")
BASELINE_CONDITIONS = ("not_better", "any_worse")
MODEL_KINDS = ("base", "chat")  # what `behemoth gate --kind` says the candidate is
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")


class PolicyError(BehemothError):
    """A policy file is invalid, or cannot be applied to the inputs given."""


@dataclass(frozen=True)
class CompareSettings:
    resamples: int = 2000
    confidence: float = 0.95
    seed: int = 0


@dataclass(frozen=True)
class Evaluation:
    name: str
    tasks: str
    limit: int | None = None
    max_length: int | None = None
    batch_size: int = 16
    seed: int = 0
    models: str = "all"  # "chat": run on chat models only (a rule on it is skipped for base models)

    def applies_to(self, kind: str) -> bool:
        return self.models in ("all", kind)

    def variables(self) -> set[str]:
        return set(VARIABLE.findall(self.tasks))

    def task_list(self, values: dict[str, str]) -> str:
        """The task list with each ${NAME} replaced by its value."""
        missing = sorted(self.variables() - set(values))
        if missing:
            raise PolicyError(f"evaluation {self.name!r} needs --var {missing[0]}=VALUE (its tasks are {self.tasks!r})")
        return VARIABLE.sub(lambda m: values[m.group(1)], self.tasks)


@dataclass(frozen=True)
class Rule:
    name: str
    decision: str
    when: str
    evaluation: str | None = None
    task: str | None = None
    metric: str | None = None
    at_least: float | None = None
    at_most: float | None = None
    without_baseline: str = "skip"
    reason: str | None = None

    def describe(self) -> str:
        """The condition in words, for records and reports."""
        if self.when == "always":
            return "always"
        if self.when == "not_better":
            return f"{self.evaluation}: not measurably better than the baseline"
        if self.when == "any_worse":
            return f"{self.evaluation}: some task measurably worse than the baseline"
        bound = f">= {self.at_least:g}" if self.at_least is not None else f"<= {self.at_most:g}"
        return f"{self.evaluation}: {self.task} {self.metric} {bound}"


@dataclass(frozen=True)
class Policy:
    name: str
    path: str
    sha256: str
    evaluations: dict[str, Evaluation]
    rules: tuple[Rule, ...]
    compare: CompareSettings = field(default_factory=CompareSettings)

    def variables(self) -> set[str]:
        return set().union(*(e.variables() for e in self.evaluations.values()))

    def needs_baseline(self, evaluation: str) -> bool:
        return any(r.evaluation == evaluation and r.when in BASELINE_CONDITIONS for r in self.rules)


def default_policy_path() -> Path:
    """The policy shipped with the package (thresholds set for the CPU toy scale)."""
    return Path(str(resources.files("behemoth.release").joinpath("default_policy.toml")))


def load_policy(path: str | Path | None = None) -> Policy:
    """Read and check a policy file (default: the shipped one); PolicyError names the problem."""
    path = Path(path) if path is not None else default_policy_path()
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise PolicyError(f"{path}: cannot read the policy ({err.strerror or err})") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise PolicyError(f"{path}: not valid TOML ({err})") from None
    return parse_policy(data, str(path), hashlib.sha256(raw).hexdigest())


def parse_policy(data: dict[str, Any], where: str = "policy", sha256: str = "") -> Policy:
    """A checked Policy from the parsed TOML table."""
    _keys(data, where, {"schema", "name", "description", "compare", "evaluations", "rules"})
    if data.get("schema") != POLICY_SCHEMA:
        raise PolicyError(f"{where}: schema must be {POLICY_SCHEMA!r}, got {data.get('schema')!r}")
    name = _string(data, "name", where, required=True)
    _string(data, "description", where)  # a note for the file's readers, checked but not kept
    compare = _compare(data.get("compare", {}), f"{where}: [compare]")
    evaluations_table = data.get("evaluations")
    if not isinstance(evaluations_table, dict) or not evaluations_table:
        raise PolicyError(f"{where}: [evaluations] must define at least one evaluation")
    evaluations = {key: _evaluation(key, value, f"{where}: [evaluations.{key}]")
                   for key, value in evaluations_table.items()}
    rules_list = data.get("rules")
    if not isinstance(rules_list, list) or not rules_list:
        raise PolicyError(f"{where}: [[rules]] must list at least one rule")
    rules = tuple(_rule(i, value, f"{where}: rule {i + 1}") for i, value in enumerate(rules_list))
    _check_rules(rules, evaluations, where)
    return Policy(name=name, path=where, sha256=sha256, evaluations=evaluations, rules=rules, compare=compare)


def _keys(table: Any, where: str, allowed: set[str]) -> None:
    if not isinstance(table, dict):
        raise PolicyError(f"{where}: expected a table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise PolicyError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


def _string(table: dict, key: str, where: str, required: bool = False, choices: tuple[str, ...] = ()) -> str | None:
    value = table.get(key)
    if value is None:
        if required:
            raise PolicyError(f"{where}: missing {key!r}")
        return None
    if not isinstance(value, str) or not value.strip():
        raise PolicyError(f"{where}: {key} must be a non-empty string, got {value!r}")
    if choices and value not in choices:
        raise PolicyError(f"{where}: {key} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _number(table: dict, key: str, where: str, kind: type, minimum: float | None = None) -> Any:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise PolicyError(f"{where}: {key} must be {'a number' if kind is float else 'an integer'}, got {value!r}")
    if minimum is not None and value < minimum:
        raise PolicyError(f"{where}: {key} must be at least {minimum}, got {value!r}")
    return kind(value)


def _compare(table: Any, where: str) -> CompareSettings:
    _keys(table, where, {"resamples", "confidence", "seed"})
    confidence = _number(table, "confidence", where, float)
    if confidence is not None and not 0.5 <= confidence < 1:
        raise PolicyError(f"{where}: confidence must be in [0.5, 1), got {confidence}")
    given = {"resamples": _number(table, "resamples", where, int, minimum=100), "confidence": confidence,
             "seed": _number(table, "seed", where, int, minimum=0)}
    return CompareSettings(**{key: value for key, value in given.items() if value is not None})


def _evaluation(key: str, table: Any, where: str) -> Evaluation:
    if not NAME.match(key):
        raise PolicyError(f"{where}: evaluation names use letters, digits and ._- starting with a letter")
    _keys(table, where, {"tasks", "limit", "max_length", "batch_size", "seed", "models"})
    tasks = _string(table, "tasks", where, required=True)
    from behemoth.eval.tasks import parse_task_list

    try:  # the syntax (with placeholders standing in for values) is checked now, not after training
        parse_task_list(VARIABLE.sub("placeholder", tasks))
    except BehemothError as err:
        raise PolicyError(f"{where}: tasks: {err}") from None
    return Evaluation(name=key, tasks=tasks, limit=_number(table, "limit", where, int, minimum=1),
                      max_length=_number(table, "max_length", where, int, minimum=2),
                      batch_size=_number(table, "batch_size", where, int, minimum=1) or 16,
                      seed=_number(table, "seed", where, int, minimum=0) or 0,
                      models=_string(table, "models", where, choices=("all", *MODEL_KINDS)) or "all")


def _rule(index: int, table: Any, where: str) -> Rule:
    _keys(table, where, {"name", "decision", "when", "evaluation", "task", "metric", "at_least", "at_most",
                         "without_baseline", "reason"})
    when = _string(table, "when", where, required=True, choices=CONDITIONS)
    rule = Rule(name=_string(table, "name", where) or f"rule-{index + 1}",
                decision=_string(table, "decision", where, required=True, choices=DECISIONS),
                when=when, evaluation=_string(table, "evaluation", where), task=_string(table, "task", where),
                metric=_string(table, "metric", where), at_least=_number(table, "at_least", where, float),
                at_most=_number(table, "at_most", where, float),
                without_baseline=_string(table, "without_baseline", where, choices=("skip", "fire")) or "skip",
                reason=_string(table, "reason", where))
    _check_rule_fields(rule, table, where)
    return rule


def _check_rule_fields(rule: Rule, table: dict, where: str) -> None:
    needed = {"always": set(), "not_better": {"evaluation"}, "any_worse": {"evaluation"},
              "threshold": {"evaluation", "task", "metric"}}[rule.when]
    allowed = needed | {"name", "decision", "when", "reason"}
    if rule.when in BASELINE_CONDITIONS:
        allowed.add("without_baseline")
    if rule.when == "threshold":
        allowed |= {"at_least", "at_most"}
        if (rule.at_least is None) == (rule.at_most is None):
            raise PolicyError(f"{where}: a threshold rule gives exactly one of at_least and at_most")
    for key in sorted(needed):
        if table.get(key) is None:
            raise PolicyError(f"{where}: a {rule.when!r} rule needs {key!r}")
    extra = sorted(set(table) - allowed)
    if extra:
        raise PolicyError(f"{where}: {extra[0]!r} has no meaning in a {rule.when!r} rule")


def _check_rules(rules: tuple[Rule, ...], evaluations: dict[str, Evaluation], where: str) -> None:
    names = [r.name for r in rules]
    for i, rule in enumerate(rules):
        label = f"{where}: rule {i + 1} ({rule.name})"
        if names.count(rule.name) > 1:
            raise PolicyError(f"{label}: two rules are named {rule.name!r}")
        if rule.evaluation is not None and rule.evaluation not in evaluations:
            raise PolicyError(f"{label}: no evaluation named {rule.evaluation!r} "
                              f"(defined: {', '.join(evaluations)})")
        for before in rules[:i]:
            if _covers(before, rule):
                raise PolicyError(f"{label} can never fire: rule {names.index(before.name) + 1} ({before.name}) "
                                  f"fires first whenever it would ({before.describe()}); "
                                  "contradictory or redundant rules")
    if rules[-1].when != "always":
        raise PolicyError(f"{where}: the last rule must be `when = \"always\"`, so every result maps to a decision")


def _covers(before: Rule, rule: Rule) -> bool:
    """Whether `before` fires in every case in which `rule` would (so `rule` is unreachable)."""
    if before.when == "always":
        return True
    if before.when != rule.when or before.evaluation != rule.evaluation:
        return False
    if before.when in BASELINE_CONDITIONS:
        return before.without_baseline == rule.without_baseline or before.without_baseline == "fire"
    if (before.task, before.metric) != (rule.task, rule.metric):
        return False
    if before.at_least is not None and rule.at_least is not None:
        return before.at_least <= rule.at_least
    if before.at_most is not None and rule.at_most is not None:
        return before.at_most >= rule.at_most
    return False
