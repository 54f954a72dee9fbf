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
