"""Regression verdicts: paired bootstrap per task and overall, on synthetic results files."""

from __future__ import annotations

import json
import math
import random

import pytest

from behemoth.cli import main
from behemoth.eval import EvalError, compare_results, format_comparison, markdown_table
from behemoth.eval.cache import write_json_atomic
from behemoth.eval.core import core_score
from behemoth.eval.metrics import summarize


def accuracy_task(correct: list[int], chance: float = 0.25, sha: str = "d1") -> dict:
    items = [{"id": str(i), "acc": c, "acc_norm": c, "chance": chance} for i, c in enumerate(correct)]
    return {"kind": "multiple_choice", "version": 1, "metric": "acc", "higher_is_better": True,
            "data": [{"path": "x.jsonl", "sha256": sha}], "metrics": summarize("multiple_choice", items),
            "items": items}


def perplexity_task(nats: list[float], n_bytes: int = 100) -> dict:
    items = [{"id": str(i), "nats": x, "tokens": 30, "bytes": n_bytes} for i, x in enumerate(nats)]
    return {"kind": "perplexity", "version": 1, "metric": "bpb", "higher_is_better": False,
            "data": [{"path": "held.txt", "sha256": "p1"}], "metrics": summarize("perplexity", items), "items": items}


def results(tasks: dict, sha: str = "model-a") -> dict:
    return {"schema": "behemoth.eval.results/1", "model": {"sha256": sha},
            "settings": {"max_length": 2048, "prefix_id": 1, "dtype": "float32"}, "tasks": tasks,
            "core": core_score(tasks)}


def coin_flips(n: int, p: float, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [int(rng.random() < p) for _ in range(n)]


def test_identical_results_show_no_measurable_difference():
    a = results({"hellaswag": accuracy_task(coin_flips(300, 0.4, 1)), "ppl": perplexity_task([70.0 + i % 7 for i in range(50)])})
    comparison = compare_results(a, json.loads(json.dumps(a)))
    for task in comparison["tasks"].values():
        assert task["delta"] == 0 and task["ci"] == [0, 0]
        assert task["verdict"] == "no measurable difference"
    assert comparison["overall"]["metric"] == "core"
    assert comparison["overall"]["verdict"] == "no measurable difference"
    assert comparison["warnings"] == ["both results are of the same weights (same model checksum)"]


def test_clearly_better_results_are_better_with_an_interval_above_zero():
    before, after = coin_flips(400, 0.30, 2), coin_flips(400, 0.55, 3)
    a = results({"arc": accuracy_task(before), "blimp": accuracy_task(coin_flips(400, 0.5, 4), chance=0.5)})
    b = results({"arc": accuracy_task(after), "blimp": accuracy_task(coin_flips(400, 0.5, 4), chance=0.5)}, "model-b")
    comparison = compare_results(a, b)
    arc = comparison["tasks"]["arc"]
    assert arc["verdict"] == "better" and arc["ci"][0] > 0 and arc["n"] == 400
    assert arc["delta"] == pytest.approx(sum(after) / 400 - sum(before) / 400)
    assert arc["ci"][0] < arc["delta"] < arc["ci"][1]
    assert comparison["tasks"]["blimp"]["verdict"] == "no measurable difference"
    overall = comparison["overall"]
    assert overall["verdict"] == "better" and overall["ci"][0] > 0 and overall["better"] == ["arc"]
    # the core score moves by the centred change averaged over both tasks
    assert overall["delta"] == pytest.approx(arc["delta"] / 0.75 / 2)
    # and the other way round it is worse
    backwards = compare_results(b, a)
    assert backwards["tasks"]["arc"]["verdict"] == "worse" and backwards["overall"]["verdict"] == "worse"
    assert "BETTER" in format_comparison(comparison)
    assert "| arc | acc |" in markdown_table(b, comparison)


def test_small_noisy_difference_is_not_measurable():
    before = coin_flips(60, 0.40, 5)
    after = list(before)
    after[:3] = [1 - x for x in after[:3]]  # three items of sixty flipped
    comparison = compare_results(results({"t": accuracy_task(before)}), results({"t": accuracy_task(after)}))
    task = comparison["tasks"]["t"]
    assert task["ci"][0] <= 0 <= task["ci"][1]
    assert task["verdict"] == "no measurable difference"


def test_lower_bits_per_byte_is_better():
    a = results({"ppl": perplexity_task([80.0 + (i % 5) for i in range(40)])})
    b = results({"ppl": perplexity_task([70.0 + (i % 5) for i in range(40)])}, "model-b")
    comparison = compare_results(a, b)
    task = comparison["tasks"]["ppl"]
    assert task["delta"] == pytest.approx(-10 / math.log(2) / 100)
    assert task["verdict"] == "better" and task["ci"][1] < 0
    assert comparison["overall"]["metric"] == "bpb" and comparison["overall"]["verdict"] == "better"


def test_pairs_by_item_id_and_refuses_different_data():
    a = results({"t": accuracy_task(coin_flips(100, 0.5, 6)), "u": accuracy_task([1, 0] * 20, sha="old")})
    b_tasks = {"t": accuracy_task(coin_flips(100, 0.5, 6)[:50]), "u": accuracy_task([1, 0] * 20, sha="new"),
               "extra": accuracy_task([1, 1])}
    comparison = compare_results(a, results(b_tasks))
    assert comparison["tasks"]["t"]["n"] == 50
    assert comparison["tasks"]["u"] == {"verdict": "not compared", "reason": "the data files differ (SHA-256)"}
    assert comparison["only_in_b"] == ["extra"] and comparison["only_in_a"] == []
    assert comparison["overall"]["tasks"] == ["t"]


def test_bootstrap_is_reproducible_and_checks_its_settings():
    a = results({"t": accuracy_task(coin_flips(200, 0.3, 7))})
    b = results({"t": accuracy_task(coin_flips(200, 0.4, 8))})
    assert compare_results(a, b, seed=3) == compare_results(a, b, seed=3)
    with pytest.raises(EvalError, match="resamples"):
        compare_results(a, b, resamples=10)


def test_cli_compare_writes_json(tmp_path, capsys):
    a = results({"t": accuracy_task(coin_flips(300, 0.3, 9))})
    b = results({"t": accuracy_task(coin_flips(300, 0.6, 10))}, "model-b")
    write_json_atomic(tmp_path / "a.json", a)
    write_json_atomic(tmp_path / "b.json", b)
    out = tmp_path / "cmp.json"
    assert main(["eval", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(out)]) == 0
    assert "better" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["schema"] == "behemoth.eval.compare/1" and saved["overall"]["verdict"] == "better"
    assert main(["eval", "compare", str(tmp_path / "a.json"), str(tmp_path / "missing.json")]) == 2
    assert "missing.json: no such results file" in capsys.readouterr().err
