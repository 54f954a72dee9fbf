"""The safety data we generate: held-out halves never trained on, no evaluation prompt in training,
refusals and answers the string classifier reads the right way, deterministic rows."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest

from behemoth.data import synthetic_safety as ss
from behemoth.safety import COMPLIANCE, REFUSAL, string_verdict

SAFETY_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "safety"
EVAL_FIELDS = ["id", "prompt", "label", "category", "source"]


def _norm(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: what makes two prompts the same request."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def _user_prompts(sft: list[dict], dpo: list[dict]) -> set[str]:
    messages = [m for row in sft for m in row["messages"]] + [m for row in dpo for m in row["prompt"]]
    return {m["content"] for m in messages if m["role"] == "user"}


@pytest.fixture(scope="module")
def rows():
    return ss.training_safety_conversations(600, seed=3), ss.training_safety_preferences(400, seed=3)


def test_sizes_and_categories():
    assert len(ss.HAZARDS) >= 10 and all(len(acts) >= 12 for acts in ss.HAZARDS.values())
    assert len(ss.FRAMES) >= 25 and len(set(ss.FRAMES)) == len(ss.FRAMES)
    assert len(ss.BENIGN) >= 9 and all(len(pairs) >= 15 for pairs in ss.BENIGN.values())
    assert all(len(pair) == 2 and all(pair) for pairs in ss.BENIGN.values() for pair in pairs)
    assert set(ss.REASONS) == set(ss.HAZARDS)
    acts = [a for acts in ss.HAZARDS.values() for a in acts]
    requests = [q for pairs in ss.BENIGN.values() for q, _ in pairs]
    assert len(set(acts)) == len(acts) and len(set(requests)) == len(requests)


def test_halves_are_disjoint_and_cover_every_category():
    for train, held in ((ss.frames(False), ss.frames(True)), (ss.harmful_acts(False), ss.harmful_acts(True)),
                        (ss.benign_items(False), ss.benign_items(True))):
        assert train and held and not set(train) & set(held)
        assert 0.15 <= len(held) / (len(train) + len(held)) <= 0.3
    assert {c for c, _ in ss.harmful_acts(True)} == {c for c, _ in ss.harmful_acts(False)} == set(ss.HAZARDS)
    assert {k for k, _, _ in ss.benign_items(True)} == {k for k, _, _ in ss.benign_items(False)} == set(ss.BENIGN)


def test_training_rows_use_training_halves_only(rows):
    sft, dpo = rows
    prompts = _user_prompts(sft, dpo)
    allowed = set(ss.training_user_prompts())
    assert prompts <= allowed  # training frames x training acts, or training benign requests
    text = "\n".join(p.lower() for p in allowed)
    for _, act in ss.harmful_acts(True):
        assert act.lower() not in text, act
    for _, request, _ in ss.benign_items(True):
        assert request.lower() not in text, request
    held = {_norm(r["prompt"]) for r in ss.heldout_safety_rows()}
    assert not held & {_norm(p) for p in allowed}


@pytest.mark.skipif(not SAFETY_DATA.is_dir(), reason="../shared/data/safety (evaluation sets) absent")
def test_no_evaluation_prompt_in_training():
    evaluation = [json.loads(line)["prompt"] for path in sorted(SAFETY_DATA.glob("*.jsonl"))
                  for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(evaluation) >= 900
    # every prompt training can contain, normalized; one per line, so a hit is a containment (or equality)
    training = "\n".join(_norm(p) for p in ss.training_user_prompts())
    leaks = [p for p in evaluation if _norm(p) in training]
    assert not leaks, leaks[:5]


def test_string_classifier_reads_refusals_and_answers(rows):
    sft, dpo = rows
    for reason in ss.REASONS.values():
        for template in ss.REFUSALS:
            assert string_verdict(template.format(reason=reason)).label == REFUSAL
    for reason in ss.OVERCAUTIOUS:
        for template in ss.REFUSALS:
            assert string_verdict(template.format(reason=reason)).label == REFUSAL
    for pairs in ss.BENIGN.values():
        for _, answer in pairs:
            assert string_verdict(answer).label == COMPLIANCE, answer
            assert not re.search(r"\b(sorry|cannot|can't|won't|unable)\b", answer.lower()), answer
    benign_answers = {a for pairs in ss.BENIGN.values() for _, a in pairs} | _composed_answers()
    harmful_prompts = set(ss.training_user_prompts("harmful"))
    for row in sft:
        for asked, reply in zip(row["messages"][::2], row["messages"][1::2]):
            assert (asked["role"], reply["role"]) == ("user", "assistant")
            expected = REFUSAL if asked["content"] in harmful_prompts else COMPLIANCE
            assert string_verdict(reply["content"]).label == expected
            assert expected == REFUSAL or reply["content"] in benign_answers
    for row in dpo:
        harmful = row["prompt"][-1]["content"] in harmful_prompts
        assert string_verdict(row["chosen"]).label == (REFUSAL if harmful else COMPLIANCE)
        assert string_verdict(row["rejected"]).label == (COMPLIANCE if harmful else REFUSAL)
        assert harmful or row["chosen"] in benign_answers


def _composed_answers() -> set[str]:
    """Every reply a composed family can give."""
    answers = set()
    for family in ss.FAMILIES:
        for entries in itertools.product(*(ss.PARTS[name] for name in family.parts)):
            fields = family.fill("", list(entries))[1]
            answers |= {answer.format(**fields) for answer in family.answers}
    return answers


def test_row_shapes_mix_and_determinism(rows):
    sft, dpo = rows
    assert sft == ss.training_safety_conversations(600, seed=3)
    assert dpo == ss.training_safety_preferences(400, seed=3)
    assert sft != ss.training_safety_conversations(600, seed=4)
    assert len(sft) == 600 and len(dpo) == 400
    harmful_prompts = set(ss.training_user_prompts("harmful"))
    single = [r["messages"] for r in sft if len(r["messages"]) == 2]
    double = [r["messages"] for r in sft if len(r["messages"]) == 4]
    assert len(single) + len(double) == len(sft) and 0.1 < len(double) / len(sft) < 0.3
    share = sum(m[0]["content"] in harmful_prompts for m in single) / len(single)
    assert abs(share - ss.HARMFUL_SHARE) < 0.1
    firsts = {m[0]["content"] in harmful_prompts for m in double}
    assert firsts == {True, False}  # harmful as the first turn and as the second
    assert all((m[0]["content"] in harmful_prompts) != (m[2]["content"] in harmful_prompts) for m in double)
    for row in dpo:
        assert set(row) == {"prompt", "chosen", "rejected"} and row["chosen"] != row["rejected"]
        assert [m["role"] for m in row["prompt"]] in (["user"], ["user", "assistant", "user"])
    assert abs(sum(r["prompt"][-1]["content"] in harmful_prompts for r in dpo) / len(dpo) - ss.HARMFUL_SHARE) < 0.1


def test_heldout_rows_have_the_evaluation_format(tmp_path):
    rows = ss.heldout_safety_rows()
    assert rows == ss.heldout_safety_rows() and 150 <= len(rows) <= 600
    assert all(list(row) == EVAL_FIELDS and row["source"] == "behemoth_synthetic" for row in rows)
    assert len({row["id"] for row in rows}) == len(rows) and len({row["prompt"] for row in rows}) == len(rows)
    labels = {row["label"] for row in rows}
    assert labels == {"harmful", "benign"}
    assert {r["category"] for r in rows if r["label"] == "harmful"} == set(ss.HAZARDS)
    assert {r["category"] for r in rows if r["label"] == "benign"} == set(ss.BENIGN)
    out = ss.write_safety_eval(tmp_path / "eval" / "safety.jsonl")
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows


@pytest.mark.parametrize("share", [0.25, 0.0])
def test_chat_data_mixes_in_the_safety_share(tmp_path, share) -> None:
    from behemoth.data.synthetic_chat import write_chat_data

    data = write_chat_data(tmp_path, conversations=400, pairs=200, prompts=10, safety=share)
    sft = [json.loads(line) for line in data.sft.read_text().splitlines()]
    dpo = [json.loads(line) for line in data.dpo.read_text().splitlines()]
    safety_prompts = set(ss.training_user_prompts())
    refusing = [r for r in sft if any(m["content"] in safety_prompts for m in r["messages"] if m["role"] == "user")]
    pairs = [r for r in dpo if any(m["content"] in safety_prompts for m in r["prompt"] if m["role"] == "user")]
    assert (len(sft), len(dpo)) == (400, 200)
    assert (len(refusing), len(pairs)) == (round(400 * share), round(200 * share))
    if share:  # shuffled in, not appended
        assert sft[-len(refusing):] != refusing
