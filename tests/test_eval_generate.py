"""Generative evaluation: the answer checks (behemoth.rewards), pass@k, the held-out split of the
synthetic chat tasks, the gen:/chat: tasks, end-to-end runs with a model that answers, and
compare's verdict on pass@1."""

from __future__ import annotations

import itertools
import json
import math
import re
from decimal import Decimal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import behemoth
from behemoth.config import ModelConfig
from behemoth.data import synthetic_chat as sc
from behemoth.data.chat import render_prompt
from behemoth.eval import EvalError, compare_results, format_comparison, run_eval
from behemoth.eval.scoring import pass_at_k
from behemoth.eval.tasks import GENERATE, load_task, parse_task_list
from behemoth.model import Transformer, init_weights
from behemoth.rewards import answer_problem, is_correct, last_number
from behemoth.tokenizer import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------
# Checking replies
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reply, answer, match, expected", [
    ("It is 1,000.", "1000", "number", True),
    ("12 plus 5 is 17.", "17", "number", True),
    ("17 is 12 plus 5", "17", "number", False),  # the last number is the answer given: 5
    ("The answer is 17.0", "17", "number", True),
    ("It went from 3 to -3", "-3", "number", True),
    ("seventeen", "17", "number", False),
    ("Light light.", "light light", "exact", True),
    ('  "LIGHT   light!" ', "light light", "exact", True),
    ("light light light", "light light", "exact", False),
    ("Sure: light light", "light light", "exact", False),
    ("light backwards is thgil.", "thgil", "contains", True),
    ("THGIL!", "thgil", "contains", True),
    ("light backwards is thgilx.", "thgil", "contains", False),
    ("xthgil", "thgil", "contains", False),
    ("(B)", "B", "choice", True),
    ("The answer is B.", "(B)", "choice", True),
    ("A or B", "A", "choice", False),  # hedging between labels gives none
    ("A or B", "B", "choice", False),
    ("B) because it is", "B", "choice", True),
    ("the answer is b", "B", "choice", False),
])
def test_is_correct(reply, answer, match, expected) -> None:
    assert is_correct(reply, answer, match) is expected


def test_choice_is_not_fooled_by_the_pronoun_i_or_the_article_a() -> None:
    assert is_correct("I think the answer is (B).", "B", "choice")
    assert is_correct("A good answer is (C).", "C", "choice")
    assert is_correct("I would say the answer is D, clearly.", "D", "choice")
    assert not is_correct("I think so.", "I", "choice")  # no label given at all
    assert last_number("counting 1,2,3") == Decimal(3)  # commas only group thousands


def test_last_number_and_unknown_match() -> None:
    assert last_number("It is 1,000.") == Decimal(1000)
    assert last_number("from 2.5 to 3") == Decimal(3)
    assert last_number("none at all") is None
    with pytest.raises(ValueError, match="unknown match 'fuzzy'"):
        is_correct("17", "17", "fuzzy")


@pytest.mark.parametrize("answer, match, problem", [
    ("17", "number", None), ("It is 1,000.", "number", None), ("(B)", "choice", None), ("b", "choice", None),
    ("thgil", "contains", None), ("light light", "exact", None),
    ("17", "fuzzy", "must be one of"), ("  ", "exact", "is empty"), ("seventeen", "number", "holds no number"),
    ("BC", "choice", "not a single-letter choice label"), ("(B) sea", "choice", "not a single-letter"),
])
def test_answer_problem(answer, match, problem) -> None:
    found = answer_problem(answer, match)
    assert found is None if problem is None else problem in found


# ------------------------------------------------------------------------------------------------
# pass@k
# ------------------------------------------------------------------------------------------------

def pass_at_k_by_counting(n: int, correct: int, k: int) -> float:
    """The share of k-subsets of n samples (the first `correct` of them right) holding a right one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < correct for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n, correct, k, expected", [
    (5, 2, 1, 0.4), (5, 2, 2, 1 - 3 / 10), (4, 0, 1, 0.0), (4, 0, 3, 0.0), (5, 4, 2, 1.0), (3, 3, 1, 1.0),
    (10, 3, 5, 1 - math.comb(7, 5) / math.comb(10, 5)),
])
def test_pass_at_k(n, correct, k, expected) -> None:
    assert pass_at_k(n, correct, k) == pytest.approx(expected)
    assert pass_at_k(n, correct, k) == pytest.approx(pass_at_k_by_counting(n, correct, k))


def test_pass_at_k_needs_k_within_the_samples() -> None:
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(3, 0, 5)


# ------------------------------------------------------------------------------------------------
# The synthetic chat tasks: training and held-out problems never meet
# ------------------------------------------------------------------------------------------------

def wording_index(wordings: dict[str, tuple[str, ...]]) -> dict[str, sc.Problem]:
    """Every problem asked in every one of `wordings`: question text -> problem."""
    index: dict[str, sc.Problem] = {}
    for kind in sc.KINDS:
        for problem in sc.all_problems(kind):
            for template in wordings[kind]:
                text = template.format(**problem.fields())
                assert index.setdefault(text, problem) == problem, f"{text!r} asks two problems"
    return index


TRAINED_WORDS, REWORDED_WORDS = wording_index(sc.QUESTIONS), wording_index(sc.REWORDED)


def turns(messages: list[dict[str, str]]) -> list[tuple[str, str | None]]:
    """(question, the reply after it or None) for each user message."""
    return [(m["content"], messages[i + 1]["content"] if i + 1 < len(messages) else None)
            for i, m in enumerate(messages) if m["role"] == "user"]


@pytest.fixture(scope="module")
def training_turns() -> list[tuple[str, str]]:
    """Every (question, correct reply) of the training data, earlier turns included."""
    found = [t for conversation in sc.training_conversations(3000) for t in turns(conversation)]
    for row in sc.training_preferences(1000):
        *earlier, (last, _) = turns(row["prompt"])
        found += [*earlier, (last, row["chosen"])]
    return found


@pytest.fixture(scope="module")
def training_questions(training_turns) -> set[str]:
    return {question for question, _ in training_turns}


@pytest.mark.parametrize("kind", sc.KINDS)
def test_training_and_heldout_halves_partition_every_kind(kind) -> None:
    every = sc.all_problems(kind)
    heldout, training = sc.problems(kind, heldout=True), sc.problems(kind, heldout=False)
    assert len(set(every)) == len(every)
    assert set(heldout) | set(training) == set(every) and not set(heldout) & set(training)
    assert all(sc.is_heldout(p) for p in heldout) and not any(sc.is_heldout(p) for p in training)
    assert 0.1 <= len(heldout) / len(every) <= 0.3


def test_every_training_question_asks_a_training_problem_and_is_answered_right(training_turns) -> None:
    assert len(training_turns) > 6000  # 3000 conversations of 1-3 turns, 1000 prompts of 1-3
    for question, reply in training_turns:
        problem = TRAINED_WORDS[question]  # a KeyError would be a wording outside QUESTIONS
        assert not sc.is_heldout(problem), question
        assert is_correct(reply, problem.answer, problem.match), (question, reply)


def test_training_data_has_earlier_turns_and_wrong_rejected_replies() -> None:
    assert {len(c) for c in sc.training_conversations(300)} == {2, 4, 6}
    preferences = sc.training_preferences(300)
    assert {len(row["prompt"]) for row in preferences} == {1, 3, 5}
    for row in preferences:
        problem = TRAINED_WORDS[row["prompt"][-1]["content"]]
        assert is_correct(row["chosen"], problem.answer, problem.match)
        assert not is_correct(row["rejected"], problem.answer, problem.match), row


def test_no_heldout_question_appears_in_training_data(training_questions) -> None:
    for kind, style in itertools.product(sc.KINDS, sc.STYLES):
        for item in sc.heldout_items(kind, style, 200):
            asked = [content for role, content in item.messages if role == "user"]
            assert not set(asked) & training_questions, item.id


def test_no_heldout_problem_in_any_training_wording_appears_in_training_data(training_questions) -> None:
    for kind in sc.KINDS:
        for problem in sc.problems(kind, heldout=True):
            for template in sc.QUESTIONS[kind]:
                assert template.format(**problem.fields()) not in training_questions


def test_reworded_wordings_never_appear_in_training_data(training_questions) -> None:
    assert not set(REWORDED_WORDS) & training_questions
    assert not set(REWORDED_WORDS) & set(TRAINED_WORDS)


# ------------------------------------------------------------------------------------------------
# Held-out items
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("style", sc.STYLES)
def test_heldout_items_are_deterministic_and_prefix_stable(style) -> None:
    for kind in sc.KINDS:
        items = sc.heldout_items(kind, style, 50)
        assert items == sc.heldout_items(kind, style, 50)
        assert items[:10] == sc.heldout_items(kind, style, 10)
        assert items != sc.heldout_items(kind, style, 50, seed=1)


@pytest.mark.parametrize("kind, style", list(itertools.product(sc.KINDS, sc.STYLES)))
def test_heldout_items_ask_heldout_problems_with_their_answers(kind, style) -> None:
    items = sc.heldout_items(kind, style, 200)
    index = REWORDED_WORDS if style == "reworded" else TRAINED_WORDS
    asked = []
    for item in items:
        roles = [role for role, _ in item.messages]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"]
        assert len(roles) in ((3, 5) if style == "multiturn" else (1,))
        problem = index[item.messages[-1][1]]
        assert problem.kind == kind and sc.is_heldout(problem)
        assert (item.answer, item.match) == (problem.answer, problem.match)
        assert is_correct(problem.answer, item.answer, item.match)
        for question, reply in turns([{"role": r, "content": c} for r, c in item.messages[:-1]]):
            earlier = TRAINED_WORDS[question]
            assert sc.is_heldout(earlier) and is_correct(reply, earlier.answer, earlier.match)
        asked.append(problem)
    if style == "multiturn":
        assert {len(item.messages) for item in items} == {3, 5}
    own = sc.problems(kind, heldout=True)
    distinct = min(len(own), len(items))
    assert len(set(asked[:distinct])) == distinct  # distinct while they last
    if len(items) >= len(own):
        assert set(asked) == set(own)


def test_heldout_items_refuse_an_unknown_style() -> None:
    with pytest.raises(ValueError, match="unknown style 'fancy'"):
        sc.heldout_items("add", "fancy")


# ------------------------------------------------------------------------------------------------
# Task lists and gen files
# ------------------------------------------------------------------------------------------------

def test_chat_names_every_kind_in_every_style() -> None:
    specs = parse_task_list("chat")
    names = [spec.name for spec in specs]
    assert len(names) == 12 and len(set(names)) == 12
    assert set(names) == {f"chat:{kind}{'' if style == 'plain' else '-' + style}"
                          for kind in sc.KINDS for style in sc.STYLES}
    assert names[0] == "chat:add" and names[-1] == "chat:reverse-multiturn"


@pytest.mark.parametrize("tasks, words", [("chat:foo", "unknown chat task 'foo'"), ("gen", "needs a path"),
                                          ("chat:add-fancy", "unknown chat task")])
def test_bad_task_names_are_refused(tasks, words) -> None:
    with pytest.raises(EvalError, match=re.escape(words)):
        parse_task_list(tasks)


def test_chat_task_loads_heldout_items() -> None:
    [spec] = parse_task_list("chat:add-reworded")
    task = load_task(spec)
    assert (task.kind, task.metric, len(task.items)) == (GENERATE, "pass@1", 50)
    expected = sc.heldout_items("add", "reworded", 50)
    assert [(i.messages, i.answer, i.match) for i in task.items] == [(i.messages, i.answer, i.match) for i in expected]
    assert load_task(spec, limit=7).items == task.items[:7]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def load_gen(path: Path):
    [spec] = parse_task_list(f"gen:{path}")
    return load_task(spec)


GOOD_ROW = {"prompt": "What is 12 plus 5?", "answer": "17", "match": "number"}


@pytest.mark.parametrize("bad", [
    {"prompt": "What is 12 plus 5?", "match": "number"},
    {"prompt": "What is 12 plus 5?", "answer": "17", "match": "fuzzy"},
    {"prompt": "What is 12 plus 5?", "answer": "seventeen", "match": "number"},
    {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "answer": "x"},
    {"prompt": "", "answer": "17"},
])
def test_a_bad_gen_row_names_file_and_line(bad, tmp_path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [GOOD_ROW, bad])
    with pytest.raises(EvalError, match=re.escape(f"{path}, line 2")):
        load_gen(path)


def test_gen_rows_load_as_messages(tmp_path) -> None:
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "Spell light backwards."}]
    task = load_gen(write_jsonl(tmp_path / "qa.jsonl", [GOOD_ROW, {"prompt": conversation, "answer": "thgil"}]))
    assert (task.kind, task.metric, task.name) == (GENERATE, "pass@1", "gen:qa.jsonl")
    first, second = task.items
    assert (first.messages, first.answer, first.match) == ((("user", "What is 12 plus 5?"),), "17", "number")
    assert second.messages == tuple((m["role"], m["content"]) for m in conversation)
    assert second.match == "contains"  # the default


# ------------------------------------------------------------------------------------------------
# End to end: a tiny model trained to answer "17" to every prompt of the file
# ------------------------------------------------------------------------------------------------

ROWS = [
    {"prompt": "What is 12 plus 5?", "answer": "17", "match": "number"},  # right
    {"prompt": [{"role": "user", "content": "What is 1 plus 1?"}, {"role": "assistant", "content": "2"},
                {"role": "user", "content": "What is 3 plus 4?"}], "answer": "7", "match": "number"},  # wrong
    {"prompt": "Write seventeen in digits.", "answer": "17", "match": "exact"},  # right
    {"prompt": "Which is wet? (A) sky (B) sea", "answer": "B", "match": "choice"},  # wrong
]
EXPECTED_PASS = [1, 0, 1, 0]
REPLY = "17"
CONFIG = dict(hidden_size=64, intermediate_size=96, intermediate_size_mlp=160, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
              interleave_moe_layer_step=2, max_position_embeddings=128, attention_chunk_size=8,
              initializer_range=0.1)
GENERATION = {"samples": 3, "max_new_tokens": 8}


def prompt_messages(row: dict) -> list[dict[str, str]]:
    prompt = row["prompt"]
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def train_to_reply(model: Transformer, prompts: list[list[int]], reply: list[int], steps: int = 60) -> None:
    """Teach `model` to write `reply` after each prompt (loss on the reply's tokens only)."""
    length = max(len(p) for p in prompts) + len(reply)
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    targets = torch.full((len(prompts), length), -100)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt) + len(reply)] = torch.tensor(prompt + reply)
        targets[row, len(prompt) - 1:len(prompt) + len(reply) - 1] = torch.tensor(reply)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["What is 12 plus 5? It is 17. Spell light backwards: thgil. The answer is (B)."] * 20, 300)


@pytest.fixture(scope="module")
def model_dirs(tokenizer, tmp_path_factory) -> dict[str, Path]:
    """"random": untrained weights; "answers": the same trained to reply REPLY to every ROWS prompt."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, **CONFIG))
    init_weights(model, 0)
    root = tmp_path_factory.mktemp("generate")
    random_dir = behemoth.save(model.eval(), root / "random", tokenizer=tokenizer)
    prompts = [render_prompt(tokenizer, prompt_messages(row)) for row in ROWS]
    train_to_reply(model, prompts, tokenizer.encode(REPLY) + [tokenizer.eot_id])
    return {"random": random_dir, "answers": behemoth.save(model, root / "answers", tokenizer=tokenizer)}


@pytest.fixture(scope="module")
def gen_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("gen") / "qa.jsonl", ROWS)


def only_task(results: dict) -> dict:
    [task] = results["tasks"].values()
    return task


def test_each_reply_is_checked_and_summarised(model_dirs, gen_file) -> None:
    task = only_task(run_eval(model_dirs["answers"], f"gen:{gen_file}", use_cache=False, generation=GENERATION))
    items = task["items"]
    assert (task["kind"], task["metric"], len(items)) == ("generate", "pass@1", 4)
    assert [item["reply"] for item in items] == [REPLY] * 4
    for item, row, expected in zip(items, ROWS, EXPECTED_PASS):
        assert (item["answer"], item["match"]) == (row["answer"], row["match"])
        assert item["pass@1"] == int(is_correct(item["reply"], row["answer"], row["match"])) == expected
        assert len(item["samples"]) == 3
        assert item["sampled_correct"] == sum(is_correct(s, row["answer"], row["match"]) for s in item["samples"])
    metrics = task["metrics"]
    assert metrics["pass@1"] == pytest.approx(0.5) and metrics["n"] == 4
    assert metrics["sampled_pass@1"] == pytest.approx(sum(i["sampled_correct"] / 3 for i in items) / 4)
    assert not any(key.startswith("sampled_pass@") and key != "sampled_pass@1" for key in metrics)  # k <= 3 samples
    assert task["stderr"] == pytest.approx(math.sqrt(0.5 * 0.5 / 4))


def test_without_samples_only_the_greedy_reply_is_drawn(model_dirs, gen_file) -> None:
    task = only_task(run_eval(model_dirs["answers"], f"gen:{gen_file}", use_cache=False,
                              generation={"max_new_tokens": 8}))
    assert [item["pass@1"] for item in task["items"]] == EXPECTED_PASS
    assert not any("samples" in item for item in task["items"])
    assert set(task["metrics"]) == {"n", "pass@1"}


def test_a_cached_rerun_gives_the_same_results(model_dirs, gen_file, tmp_path) -> None:
    def run() -> dict:
        return only_task(run_eval(model_dirs["random"], f"gen:{gen_file}", cache_dir=tmp_path,
                                  generation=GENERATION))

    first, second = run(), run()
    assert (first["cached_items"], second["cached_items"]) == (0, 4)
    assert second["items"] == first["items"] and second["metrics"] == first["metrics"]


def test_sampled_replies_follow_the_seed(model_dirs, gen_file) -> None:
    def samples(seed: int) -> list[list[str]]:
        task = only_task(run_eval(model_dirs["random"], f"gen:{gen_file}", use_cache=False, seed=seed,
                                  generation=GENERATION))
        return [item["samples"] for item in task["items"]]

    assert samples(0) == samples(0)
    assert samples(0) != samples(1)


def test_sampled_replies_do_not_depend_on_what_was_cached(model_dirs, gen_file, tmp_path) -> None:
    def items(**options) -> list[dict]:
        return only_task(run_eval(model_dirs["random"], f"gen:{gen_file}", generation=GENERATION, **options))["items"]

    fresh = items(use_cache=False)
    items(cache_dir=tmp_path, limit=2)
    assert items(cache_dir=tmp_path) == fresh


# ------------------------------------------------------------------------------------------------
# compare on pass@1
# ------------------------------------------------------------------------------------------------

def generate_results(correct: list[int], sha: str) -> dict:
    task = {"kind": "generate", "version": 1, "metric": "pass@1", "higher_is_better": True,
            "data": [{"path": "builtin:synthetic-chat/add", "sha256": "d1"}],
            "items": [{"id": f"add-plain-{i}", "pass@1": c} for i, c in enumerate(correct)]}
    return {"schema": "behemoth.eval.results/1", "model": {"sha256": sha},
            "settings": {"max_length": 128, "prefix_id": 1, "dtype": "float32"}, "tasks": {"chat:add": task}}


def right_of(n: int, right: int) -> list[int]:
    return [1] * right + [0] * (n - right)


def test_compare_judges_generative_tasks_by_pass_at_1() -> None:
    weak, strong = generate_results(right_of(60, 10), "a"), generate_results(right_of(60, 50), "b")
    overall = compare_results(weak, strong)["overall"]
    assert (overall["metric"], overall["verdict"], overall["tasks"]) == ("pass@1", "better", ["chat:add"])
    assert (overall["a"], overall["b"]) == (pytest.approx(10 / 60), pytest.approx(50 / 60))
    assert compare_results(strong, weak)["overall"]["verdict"] == "worse"
    assert "overall (mean pass@1 over 1 task(s))" in format_comparison(compare_results(weak, strong))
    same = compare_results(weak, generate_results(right_of(60, 10), "c"))["overall"]
    assert (same["metric"], same["verdict"], same["delta"]) == ("pass@1", "no measurable difference", 0)


def test_eval_off_a_terminal_says_what_it_scores(model_dirs, gen_file, capsys) -> None:
    """No bar without a terminal (a log, CI), but a line as each task starts and ends."""
    run_eval(model_dirs["random"], f"gen:{gen_file}", use_cache=False)
    err = capsys.readouterr().err
    assert f"gen:{gen_file.name}: scoring 4 items (0 cached)..." in err and f"gen:{gen_file.name}: done in" in err
    run_eval(model_dirs["random"], f"gen:{gen_file}", use_cache=False, progress=False)
    assert capsys.readouterr().err == ""
