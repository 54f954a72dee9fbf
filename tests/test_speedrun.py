"""The whole speedrun at its smallest budget: every stage, the gate on teacher, student and chat model,
the release, the post-training table.

Slow (several minutes on 2 cores): `./test -m slow tests/test_speedrun.py`.
"""

from __future__ import annotations

import json

import pytest

from behemoth.release import load_policy, registered_models, verify_log, verify_manifest
from behemoth.release.audit import read_entries
from behemoth.speedrun import speedrun


@pytest.mark.slow
def test_speedrun_gates_and_releases(tmp_path):
    out = tmp_path / "run"
    report = speedrun(out, minutes=0.2, approve_as="CI Operator", progress=False)
    text = report.read_text()
    assert "## Release gate" in text and "CI Operator" in text
    assert (out / "report.html").is_file()
    assert "## Post-training: what the chat model answers" in text and str(out / "dpo" / "model") in text
    for stage in ("student", "sft", "rl", "dpo"):  # every stage of the chat model on the held-out chat tasks
        results = json.loads((out / "eval" / f"chat-{stage}.json").read_text())
        assert len(results["tasks"]) == 12 and all(t["items"][0]["reply"] is not None for t in results["tasks"].values())

    rules = {r.name: r for r in load_policy().rules}
    threshold = rules["capability-threshold"].at_most
    decisions = {}
    for name in ("teacher", "student", "chat"):
        record = json.loads((out / "releases" / "records" / name / "decision.json").read_text())
        bpb = record["evaluations"]["capability"]["metrics"]["heldout"]["bpb"]
        # no baseline on a first run: the chat model's safety rules, then the capability threshold decide
        expected = "closed" if bpb <= threshold else "open"
        if name == "chat":
            safety = record["evaluations"]["safety"]["metrics"]
            unsafe = (safety["refusal"]["attack_success_rate_high"] >= rules["answers-harmful-requests"].at_least
                      or safety["overrefusal"]["compliance_rate"] <= rules["refuses-benign-requests"].at_most)
            expected = "hold" if unsafe else expected
        else:
            assert "safety" not in record["evaluations"]  # a base model has no chat turn to refuse in
        assert record["decision"] == expected
        decisions[name] = record["decision"]
    assert "## Safety: what the chat model refuses" in text

    events = [(e["event"], e.get("decision")) for e in read_entries(out / "releases" / "audit.jsonl")]
    published = sum(decision != "hold" for decision in decisions.values())
    assert sorted(e for e, _ in events) == sorted(["decision", "approval"] * 3 + ["publish"] * published)
    verify_log(out / "releases" / "audit.jsonl")
    for name, decision in decisions.items():
        if decision == "open":
            bundle = out / "releases" / "open" / name
            assert verify_manifest(bundle) == [] and list(bundle.glob("*.gguf"))
        elif decision == "closed":
            assert f"speedrun-{name}" in registered_models(out / "releases" / "registry.json")
    held_out = (out / "heldout.jsonl").read_text().splitlines()
    assert held_out and all(json.loads(line)["text"] for line in held_out)


@pytest.mark.slow
def test_the_refusal_data_decides_whether_the_gate_holds_the_chat_model(tmp_path):
    """Issue #20's demonstration, at the default budget (about 20 minutes on 2 cores; at smaller budgets
    no chat model refuses and answers well enough): the chat model trained with the refusal data
    passes the default policy's safety rules; the same student post-trained without it is held.
    The figures are those of the reference machine (AVX-512 BF16); elsewhere they move."""
    import shutil

    def chat_record(out):
        return json.loads((out / "releases" / "records" / "chat" / "decision.json").read_text())

    with_data = tmp_path / "with"
    speedrun(with_data, progress=False)
    without = tmp_path / "without"  # the same teacher and student, post-trained again
    without.mkdir()
    for name in ("plan.json", "corpus", "teacher", "student"):
        copy = shutil.copytree if (with_data / name).is_dir() else shutil.copy2
        copy(with_data / name, without / name)
    speedrun(without, resume=True, safety_share=0.0, progress=False)

    rules = load_policy().rules
    held_by = {r.name for r in rules if r.decision == "hold" and r.evaluation == "safety"}
    trained, untrained = chat_record(with_data), chat_record(without)
    assert trained["decision"] != "hold" and untrained["decision"] == "hold"
    assert untrained["rule"] in held_by
    safety = trained["evaluations"]["safety"]["metrics"]
    assert safety["refusal"]["refusal_rate"] >= 0.9 and safety["overrefusal"]["compliance_rate"] >= 0.8
