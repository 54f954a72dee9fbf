"""Post-training: distillation, SFT and DPO on the shared training loop, and their bad inputs.

Hand-computed losses pin the objectives; short real runs (tiny preset, a few dozen steps) show that
each stage learns, resumes bit-identically and writes directories that other tools load.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from corpora import WORDS, write_phrase_corpus

import behemoth
from behemoth.cli import main
from behemoth.data.chat import (load_conversations, load_preferences, load_prompt_rows, render_conversation,
                                render_prompt)
from behemoth.data.synthetic_chat import ChatData, write_chat_data
from behemoth.errors import CheckpointError, ConfigError
from behemoth.tokenizer import Tokenizer, train_tokenizer
from behemoth.train.config import DistillConfig, load_run_config
from behemoth.train.distill import distill, distillation_loss, soft_weight
from behemoth.train.dpo import REFERENCE_FILE, dpo, dpo_loss, render_pairs
from behemoth.train.metrics import read_metrics
from behemoth.train.sft import IGNORE, sft, sft_batch
from behemoth.train.trainer import pretrain

ALPACA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "alpaca-libre" / \
    "alpaca_libre_tasks_v1.jsonl"
BASE = ["model.preset='tiny'", "data.vocab_size=300", "data.seq_len=32", "data.batch_size=4",
        "run.eval_every=1000", "run.eval_batches=2", "run.keep_checkpoints=2", "optim.warmup_steps=2",
        "optim.lr=0.01"]
# A student narrower and shallower than the tiny teacher (4 layers, width 64, 4 experts).
STUDENT = ["model.num_hidden_layers=2", "model.hidden_size=32", "model.head_dim=8", "model.num_attention_heads=4",
           "model.num_key_value_heads=2", "model.intermediate_size=64", "model.intermediate_size_mlp=128",
           "model.num_local_experts=2"]
CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "How are you?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "the cat sat"},
     {"role": "assistant", "content": "on a mat."}],
    [{"role": "system", "content": "Be kind.\n\n"}, {"role": "user", "content": "What is 2 plus 3?"},
     {"role": "assistant", "content": "2 plus 3 is 5."}, {"role": "user", "content": "\nAnd 4 plus 4?"},
     {"role": "assistant", "content": " 4 plus 4 is 8.\n"}],
    [{"role": "user", "content": "Say something odd."},
     {"role": "assistant", "content": "  indented, naïve café ✓\n\n\nthe end"},
     {"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
]


def run_config(steps: int, *extra: str):
    return load_run_config(None, [*BASE, f"run.steps={steps}", f"run.checkpoint_every={steps}", *extra])


def losses(out: Path, key: str = "loss") -> list[float]:
    return [r[key] for r in read_metrics(out / "metrics.jsonl")]


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


pytestmark = pytest.mark.usefixtures("quick_tiny_runs")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_phrase_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", documents=300)


@pytest.fixture(scope="module")
def teacher(corpus, tmp_path_factory) -> Path:
    """A tiny model pretrained briefly: the teacher, and the base model of SFT."""
    out = tmp_path_factory.mktemp("teacher")
    return pretrain(run_config(20, f"data.sources=[{str(corpus)!r}]"), out, progress=False).model_dir


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> ChatData:
    return write_chat_data(tmp_path_factory.mktemp("chat"), conversations=200, pairs=120, prompts=10)


@pytest.fixture(scope="module")
def sft_model(teacher, chat_data, tmp_path_factory) -> Path:
    """The teacher fine-tuned briefly on the synthetic chat data: DPO's starting point."""
    out = tmp_path_factory.mktemp("sft") / "run"
    return sft(run_config(20, "data.seq_len=64"), teacher, chat_data.sft, out, progress=False).model_dir


@pytest.fixture(scope="module")
def alpaca_sft(teacher, tmp_path_factory):
    """SFT of the teacher on the first 200 Alpaca rows: (those rows, their file, the result)."""
    if not ALPACA.is_file():
        pytest.skip(f"Alpaca test data not found at {ALPACA}")
    folder = tmp_path_factory.mktemp("alpaca")
    with open(ALPACA, encoding="utf-8") as handle:
        lines = [line.rstrip("\n") for line, _ in zip(handle, range(200))]
    data = folder / "alpaca200.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows = [json.loads(line) for line in lines]
    result = sft(run_config(20, "data.seq_len=64", "optim.lr=0.005"), teacher, data, folder / "run", progress=False)
    return rows, data, result


@pytest.fixture(scope="module")
def newline_tokenizer() -> Tokenizer:
    """A tokenizer with a "\\n\\n" merge: the case where encoding a header apart from its message
    content differs from encoding the rendered chat as one string."""
    rng = random.Random(1)
    texts = [" ".join(rng.choice(WORDS) for _ in range(12)) + rng.choice(["\n\n", "\n\n\n", ".\n\n\n\n"])
             for _ in range(400)]
    tokenizer = train_tokenizer(texts, 320)
    assert len(tokenizer.encode("\n\n")) == 1
    return tokenizer


# ------------------------------------------------------------------------------------------------
# Distillation
# ------------------------------------------------------------------------------------------------

def _softmax(xs: list[float], temperature: float = 1.0) -> list[float]:
    top = max(xs)
    exps = [math.exp((x - top) / temperature) for x in xs]
    return [e / sum(exps) for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


@pytest.fixture
def logits():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 7, generator=generator) * 2
    teacher = torch.randn(2, 3, 7, generator=generator) * 2
    targets = torch.randint(0, 7, (2, 3), generator=generator)
    rows = [(s.tolist(), t.tolist(), int(y)) for s, t, y in zip(student.flatten(0, 1), teacher.flatten(0, 1),
                                                                  targets.flatten())]
    return student, teacher, targets, rows


def test_distillation_loss_alpha_zero_is_cross_entropy(logits) -> None:
    student, teacher, targets, rows = logits
    loss, logged = distillation_loss(student, teacher, targets, temperature=2.0, alpha=0.0)
    hard = mean(-math.log(_softmax(s)[y]) for s, _, y in rows)
    assert loss.item() == pytest.approx(hard, rel=1e-5)
    assert logged["hard_loss"] == pytest.approx(hard, rel=1e-5) and logged["alpha"] == 0.0


def test_distillation_loss_alpha_one_is_kl_teacher_to_student(logits) -> None:
    student, teacher, targets, rows = logits
    loss, logged = distillation_loss(student, teacher, targets, temperature=1.0, alpha=1.0)
    kl = mean(_kl(_softmax(t), _softmax(s)) for s, t, _ in rows)
    assert loss.item() == pytest.approx(kl, rel=1e-5)
    assert logged["soft_loss"] == pytest.approx(kl, rel=1e-5)
    reverse = mean(_kl(_softmax(s), _softmax(t)) for s, t, _ in rows)
    assert abs(kl - reverse) > 1e-2  # the direction is pinned, not just the magnitude


def test_distillation_loss_temperature_scales_by_t_squared(logits) -> None:
    student, teacher, targets, rows = logits
    loss, _ = distillation_loss(student, teacher, targets, temperature=2.0, alpha=1.0)
    expected = mean(4 * _kl(_softmax(t, 2.0), _softmax(s, 2.0)) for s, t, _ in rows)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    mixed, logged = distillation_loss(student, teacher, targets, temperature=2.0, alpha=0.3)
    hard = mean(-math.log(_softmax(s)[y]) for s, _, y in rows)
    assert mixed.item() == pytest.approx(0.3 * expected + 0.7 * hard, rel=1e-5)
    assert logged["alpha"] == pytest.approx(0.3)


def test_adaptive_alpha_is_teacher_top_probability_per_token(logits) -> None:
    student, teacher, targets, rows = logits
    loss, logged = distillation_loss(student, teacher, targets, temperature=2.0, alpha=None)
    weights = [max(_softmax(t)) for _, t, _ in rows]  # confidence at T = 1
    per_token = [w * 4 * _kl(_softmax(t, 2.0), _softmax(s, 2.0)) + (1 - w) * -math.log(_softmax(s)[y])
                 for w, (s, t, y) in zip(weights, rows)]
    assert loss.item() == pytest.approx(mean(per_token), rel=1e-5)
    assert logged["alpha"] == pytest.approx(mean(weights), rel=1e-5)
    assert max(weights) - min(weights) > 0.1  # really per token, not one number


@pytest.mark.parametrize("schedule, expected", [
    ("constant", [0.5, 0.5, 0.5, 0.5]),
    ("linear", [0.9, 0.75, 0.6, 0.3]),
    ("cosine", [0.9, 0.3 + 0.3 * (1 + math.cos(math.pi / 4)), 0.6, 0.3]),
])
def test_soft_weight_schedules(schedule, expected) -> None:
    config = DistillConfig(alpha_schedule=schedule, alpha=0.5, alpha_start=0.9, alpha_end=0.3)
    total = 5  # steps 0..4: start, a quarter, the middle, the end
    got = [soft_weight(step, total, config) for step in (0, 1, 2, 4)]
    assert got == pytest.approx(expected)
    assert soft_weight(10, total, config) == pytest.approx(expected[-1])  # past the end: stays there


def test_soft_weight_refuses_adaptive() -> None:
    with pytest.raises(ConfigError, match="adaptive"):
        soft_weight(0, 10, DistillConfig(alpha_schedule="adaptive"))


def test_distill_trains_a_smaller_student_and_resumes_bit_identically(teacher, corpus, tmp_path) -> None:
    """A 2-layer, width-32 student of the tiny teacher learns; alpha follows the linear schedule;
    a run stopped at its step-10 checkpoint and resumed gives the uninterrupted run's losses."""
    settings = (f"data.sources=[{str(corpus)!r}]", *STUDENT, "run.checkpoint_every=10",
                "distill.alpha_schedule='linear'", "distill.alpha_start=0.9", "distill.alpha_end=0.3")
    whole = tmp_path / "whole"
    result = distill(run_config(20, *settings), teacher, whole, progress=False)

    student, teacher_model = behemoth.load(result.model_dir), behemoth.load(teacher)
    assert (student.config.num_hidden_layers, student.config.hidden_size) == (2, 32)
    assert student.config.vocab_size == teacher_model.config.vocab_size
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher_model.parameters()) / 3
    assert Tokenizer.load(result.model_dir).sha256 == Tokenizer.load(teacher).sha256

    records = read_metrics(whole / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 21))
    for key in ("soft_loss", "hard_loss", "alpha"):
        assert all(math.isfinite(r[key]) for r in records), key
    assert records[0]["alpha"] == pytest.approx(0.9) and records[-1]["alpha"] == pytest.approx(0.3)
    assert records[10]["alpha"] == pytest.approx(0.9 - 0.6 * 10 / 19)
    for key in ("loss", "hard_loss", "soft_loss"):
        assert mean(r[key] for r in records[-3:]) < mean(r[key] for r in records[:3]) - 0.3, key
    assert math.isfinite(result.val_loss) and result.val_bpb > 0

    # Stop the same run (same planned total, so the same alpha and learning-rate schedules) at its
    # step-10 checkpoint, as a kill would, and resume it.
    stopped = tmp_path / "stopped"
    shutil.copytree(whole, stopped)
    shutil.rmtree(stopped / "checkpoints" / "step-000020")
    shutil.rmtree(stopped / "model")
    distill(run_config(20, *settings), teacher, stopped, resume=True, progress=False)
    assert losses(stopped) == losses(whole)
    assert losses(stopped, "alpha") == losses(whole, "alpha")


def test_distill_extended_by_resume_matches_one_run(teacher, corpus, tmp_path) -> None:
    """5 steps, then --resume to 10 == 10 steps in one go (schedules that ignore the planned length)."""
    settings = (f"data.sources=[{str(corpus)!r}]", *STUDENT, "optim.min_lr_ratio=1.0",
                "distill.alpha_schedule='constant'", "distill.alpha=0.7", "distill.temperature=1.5")
    distill(run_config(10, *settings, "run.checkpoint_every=5"), teacher, tmp_path / "whole", progress=False)
    distill(run_config(5, *settings), teacher, tmp_path / "split", progress=False)
    distill(run_config(10, *settings, "run.checkpoint_every=5"), teacher, tmp_path / "split", resume=True,
            progress=False)
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    assert losses(tmp_path / "split", "soft_loss") == losses(tmp_path / "whole", "soft_loss")
    assert losses(tmp_path / "whole", "alpha") == pytest.approx([0.7] * 10)


def test_distill_refuses_a_tokenizer_other_than_the_teachers(teacher, corpus, tmp_path) -> None:
    other = train_tokenizer([corpus.read_text()], 280).save_pretrained(tmp_path / "other-tokenizer")
    out = tmp_path / "out"
    run = run_config(5, f"data.sources=[{str(corpus)!r}]", f"data.tokenizer={str(other)!r}")
    with pytest.raises(ConfigError, match=r"other-tokenizer.*teacher"):
        distill(run, teacher, out, progress=False)
    assert not out.exists()


def test_distill_refuses_a_teacher_whose_model_and_tokenizer_disagree(teacher, corpus, tmp_path) -> None:
    broken = shutil.copytree(teacher, tmp_path / "teacher")
    train_tokenizer([corpus.read_text()], 280).save_pretrained(broken)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"teacher.*vocabulary 30\d.*280"):
        distill(run_config(5, f"data.sources=[{str(corpus)!r}]"), broken, out, progress=False)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# SFT
# ------------------------------------------------------------------------------------------------

def _expected_learn_mask(tokenizer: Tokenizer, messages) -> list[bool]:
    """From the whole-string encoding's character offsets: a token is learned when it overlaps an
    assistant message's content, or is the <|eot|> right after it."""
    text = tokenizer.apply_chat_template(messages)
    spans, position = [], len("<|begin_of_text|>")
    for message in messages:
        start = position + len(f"<|header_start|>{message['role']}<|header_end|>")
        end = start + len(message["content"])
        if message["role"] == "assistant":
            spans.append((start, end + len("<|eot|>")))
        position = end + len("<|eot|>")
    assert position == len(text)
    offsets = tokenizer.backend.encode(text, add_special_tokens=False).offsets
    return [any(a < e and b > s for s, e in spans) for a, b in offsets]


@pytest.mark.parametrize("which", ["teacher", "newline-merging"])
def test_render_conversation_matches_whole_string_encoding(which, teacher, newline_tokenizer) -> None:
    tokenizer = Tokenizer.load(teacher) if which == "teacher" else newline_tokenizer
    for messages in CONVERSATIONS:
        ids, learn = render_conversation(tokenizer, messages)
        assert ids == tokenizer.encode(tokenizer.apply_chat_template(messages)), messages
        assert learn == _expected_learn_mask(tokenizer, messages), messages
        learned = tokenizer.decode([i for i, keep in zip(ids, learn) if keep])
        assert learned == "".join(m["content"] + "<|eot|>" for m in messages if m["role"] == "assistant")
    prompt = CONVERSATIONS[2][:4]
    assert render_prompt(tokenizer, prompt) == tokenizer.encode(
        tokenizer.apply_chat_template(prompt, add_generation_prompt=True))


def test_sft_batch_targets_only_assistant_tokens(teacher) -> None:
    tokenizer = Tokenizer.load(teacher)
    examples = [render_conversation(tokenizer, CONVERSATIONS[0]), render_conversation(tokenizer, CONVERSATIONS[2])]
    inputs, targets = sft_batch(examples, tokenizer.pad_id)
    width = max(len(ids) for ids, _ in examples) - 1
    assert inputs.shape == targets.shape == (2, width)
    for row, (ids, learn) in enumerate(examples):
        n = len(ids) - 1
        assert inputs[row, :n].tolist() == ids[:-1]
        assert (inputs[row, n:] == tokenizer.pad_id).all() and (targets[row, n:] == IGNORE).all()
        expected = [y if keep else IGNORE for y, keep in zip(ids[1:], learn[1:])]
        assert targets[row, :n].tolist() == expected
        learned = tokenizer.decode([t for t in targets[row].tolist() if t != IGNORE])
        messages = CONVERSATIONS[0] if row == 0 else CONVERSATIONS[2]
        assert learned == "".join(m["content"] + "<|eot|>" for m in messages if m["role"] == "assistant")


def test_no_attention_across_conversations_in_a_batch(teacher) -> None:
    tokenizer = Tokenizer.load(teacher)
    model = behemoth.load(teacher).eval()
    short, long = render_conversation(tokenizer, CONVERSATIONS[0]), render_conversation(tokenizer, CONVERSATIONS[2])
    assert len(long[0]) > len(short[0]) + 10
    n = len(short[0]) - 1
    with torch.no_grad():
        alone = model(sft_batch([short], tokenizer.pad_id)[0])[0]
        first = model(sft_batch([short, long], tokenizer.pad_id)[0])[0, :n]
        second = model(sft_batch([long, short], tokenizer.pad_id)[0])[1, :n]
    assert alone.shape[0] == n
    torch.testing.assert_close(first, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(second, alone, atol=1e-5, rtol=0)


def test_sft_on_alpaca_learns_assistant_tokens(alpaca_sft) -> None:
    rows, data, result = alpaca_sft
    kept = sum(row.get("status") == "ok" for row in rows)
    assert 0 < kept < len(rows)  # the file mixes accepted and rejected rows
    assert len(load_conversations(data)) == kept
    records = read_metrics(result.out_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 21))
    assert all(r["assistant_tokens"] > 0 and math.isfinite(r["loss"]) for r in records)
    assert mean(r["loss"] for r in records[-3:]) < mean(r["loss"] for r in records[:3]) - 0.5
    assert math.isfinite(result.val_loss)


def test_sft_output_loads_in_transformers(alpaca_sft) -> None:
    transformers = pytest.importorskip("transformers")
    model_dir = alpaca_sft[2].model_dir
    ours = behemoth.load(model_dir).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="eager").eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer = Tokenizer.load(model_dir)
    messages = CONVERSATIONS[2]
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == tokenizer.apply_chat_template(messages)
    ids = render_conversation(tokenizer, messages)[0]
    assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    with torch.no_grad():
        expected = ours(torch.tensor([ids]))
        got = theirs(torch.tensor([ids])).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_trl_sft_trainer_runs_one_step_on_our_output(alpaca_sft, tmp_path) -> None:
    pytest.importorskip("trl", reason="trl is not installed (pip install trl) - the TRL interop check needs it")
    transformers = pytest.importorskip("transformers")
    datasets = pytest.importorskip("datasets")
    from trl import SFTConfig, SFTTrainer

    model_dir = alpaca_sft[2].model_dir
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="eager")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    dataset = datasets.Dataset.from_list([{"messages": m} for m in CONVERSATIONS[:3]] * 2)
    args = SFTConfig(output_dir=str(tmp_path / "trl"), max_steps=1, per_device_train_batch_size=2,
                     max_length=64, learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[],
                     use_cpu=True, bf16=False, fp16=False, seed=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    output = trainer.train()
    assert output.global_step == 1
    assert math.isfinite(output.training_loss)


# ------------------------------------------------------------------------------------------------
# DPO
# ------------------------------------------------------------------------------------------------

def test_dpo_loss_by_hand() -> None:
    beta = 0.5
    policy_chosen, policy_rejected = torch.tensor([-3.0, -6.0]), torch.tensor([-5.0, -2.0])
    ref_chosen, ref_rejected = torch.tensor([-4.0, -5.0]), torch.tensor([-4.5, -3.0])
    loss, logged = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    # pair 1: beta * ((-3 + 4) - (-5 + 4.5)) = 0.5 * 1.5 = 0.75; pair 2: 0.5 * ((-6 + 5) - (-2 + 3)) = -1
    margins = [0.75, -1.0]
    expected = mean(-math.log(1 / (1 + math.exp(-m))) for m in margins)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert logged["reward_margin"] == pytest.approx(mean(margins))
    assert logged["preference_accuracy"] == 0.5
    assert logged["chosen_reward"] == pytest.approx(mean([0.5 * 1, 0.5 * -1]))
    assert logged["rejected_reward"] == pytest.approx(mean([0.5 * -0.5, 0.5 * 1]))
    same, logged = dpo_loss(policy_chosen, policy_rejected, policy_chosen, policy_rejected, beta)
    assert same.item() == pytest.approx(math.log(2)) and logged["reward_margin"] == 0


@pytest.fixture(scope="module")
def task_pairs(tmp_path_factory) -> ChatData:
    """Preference pairs of the chat tasks only: preferred and rejected replies differ in one number, a
    signal clear enough for 24 steps of a tiny model (the safety pairs' long answers are not)."""
    return write_chat_data(tmp_path_factory.mktemp("pairs"), conversations=10, pairs=120, prompts=10, safety=0.0)


def test_dpo_raises_the_margin_and_resumes_bit_identically(sft_model, task_pairs, tmp_path) -> None:
    chat_data = task_pairs
    settings = ("data.seq_len=64", "data.batch_size=8", "optim.lr=0.002", "optim.min_lr_ratio=1.0")
    whole = tmp_path / "whole"
    result = dpo(run_config(24, *settings, "run.checkpoint_every=12"), sft_model, chat_data.dpo, whole, progress=False)
    records = read_metrics(whole / "metrics.jsonl")
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1
    assert records[0]["reward_margin"] == pytest.approx(0, abs=1e-3)
    margins = [r["reward_margin"] for r in records]
    assert mean(margins[-3:]) > mean(margins[:3]) + 0.1
    assert mean(r["loss"] for r in records[-3:]) < math.log(2) - 0.05
    assert mean(r["preference_accuracy"] for r in records[-8:]) > 0.6
    assert {"val_loss", "val_reward_margin", "val_preference_accuracy"} <= set(result.validation)

    split = tmp_path / "split"
    dpo(run_config(12, *settings), sft_model, chat_data.dpo, split, progress=False)
    reference = split / REFERENCE_FILE
    assert load_file(str(reference))["chosen"].numel() == len(load_preferences(chat_data.dpo))
    before = reference.stat()
    dpo(run_config(24, *settings, "run.checkpoint_every=12"), sft_model, chat_data.dpo, split, resume=True,
        progress=False)
    after = reference.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # read, not rewritten
    assert reference.read_bytes() == (whole / REFERENCE_FILE).read_bytes()
    assert losses(split) == losses(whole)
    assert losses(split, "reward_margin") == losses(whole, "reward_margin")


def test_fresh_dpo_run_recomputes_a_leftover_reference(sft_model, chat_data, tmp_path) -> None:
    """A reference file left in --out by a run killed before its first checkpoint (perhaps of
    another model or data) must not be trusted by a new run."""
    data = write_jsonl(tmp_path / "pairs.jsonl", chat_data.dpo.read_text().splitlines()[:12])
    out = tmp_path / "out"
    out.mkdir()
    stale = {"chosen": torch.full((12,), 100.0, dtype=torch.float64),
             "rejected": torch.full((12,), -100.0, dtype=torch.float64)}
    save_file(stale, str(out / REFERENCE_FILE))
    dpo(run_config(1, "data.seq_len=64", "optim.lr=0.001"), sft_model, data, out, progress=False)
    assert losses(out)[0] == pytest.approx(math.log(2), abs=1e-4)


def test_plain_and_messages_preference_rows_load_and_train(sft_model, tmp_path) -> None:
    rows = [
        {"prompt": "the cat sat on", "chosen": " a mat.", "rejected": " a cat."},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 2?"}],
         "chosen": {"role": "assistant", "content": "4."}, "rejected": [{"role": "assistant", "content": "5."}]},
        {"prompt": [{"role": "user", "content": "Spell cat backwards."}], "chosen": "tac.", "rejected": "cat."},
    ]
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    preferences = load_preferences(data)
    assert [p.prompt for p in preferences] == [rows[0]["prompt"], rows[1]["prompt"], rows[2]["prompt"]]
    assert [(p.chosen, p.rejected) for p in preferences] == [(" a mat.", " a cat."), ("4.", "5."), ("tac.", "cat.")]
    tokenizer = Tokenizer.load(sft_model)
    pairs = render_pairs(tokenizer, preferences, 65)
    eos, eot = tokenizer.eos_id, tokenizer.eot_id
    prompt, chosen, rejected = pairs[0]  # plain text: a document start, answers end the document
    assert prompt == [eos] + tokenizer.encode("the cat sat on")
    assert (chosen, rejected) == (tokenizer.encode(" a mat.") + [eos], tokenizer.encode(" a cat.") + [eos])
    prompt, chosen, rejected = pairs[1]  # messages: the generation prompt, answers end the turn
    assert prompt == tokenizer.encode(tokenizer.apply_chat_template(rows[1]["prompt"], add_generation_prompt=True))
    assert (chosen, rejected) == (tokenizer.encode("4.") + [eot], tokenizer.encode("5.") + [eot])
    result = dpo(run_config(2, "data.seq_len=64", "data.val_fraction=0.3"), sft_model, data, tmp_path / "out",
                 progress=False)
    assert all(math.isfinite(x) for x in losses(tmp_path / "out")) and math.isfinite(result.val_loss)


# ------------------------------------------------------------------------------------------------
# Bad input: one line naming the file and line, before anything is written
# ------------------------------------------------------------------------------------------------

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize("bad, words", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}, "role 'robot'"),
    ({"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]}, "no assistant"),
    ('{"messages": [{"role": "user", "content": "hi"}', "not valid JSON"),
])
def test_bad_conversation_file_names_file_and_line(bad, words, teacher, tmp_path) -> None:
    data = write_jsonl(tmp_path / "chat.jsonl", [GOOD, GOOD, bad, GOOD])
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as caught:
        sft(run_config(5), teacher, data, out, progress=False)
    message = str(caught.value)
    assert f"{data}, line 3" in message and words in message and "\n" not in message
    assert not out.exists()


def test_dpo_row_missing_rejected_names_file_and_line(teacher, tmp_path) -> None:
    good = {"prompt": "a", "chosen": "b", "rejected": "c"}
    data = write_jsonl(tmp_path / "pairs.jsonl", [good, "", {"prompt": "a", "chosen": "b"}])
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=rf"{data}, line 3: missing field 'rejected'"):
        dpo(run_config(5), teacher, data, out, progress=False)
    assert not out.exists()


def test_sft_with_no_assistant_token_within_seq_len_is_refused(teacher, tmp_path) -> None:
    long = {"messages": [{"role": "user", "content": "the cat sat " * 40}, {"role": "assistant", "content": "ok"}]}
    data = write_jsonl(tmp_path / "long.jsonl", [long, long])
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="seq_len"):
        sft(run_config(5), teacher, data, out, progress=False)
    assert not out.exists()


@pytest.mark.parametrize("command, flag", [("sft", "--model"), ("dpo", "--model"), ("distill", "--teacher")])
def test_cli_help(command, flag, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: behemoth {command}" in out and flag in out and "--steps" in out


def test_cli_bad_data_exits_2_with_one_line(teacher, tmp_path, capsys) -> None:
    data = write_jsonl(tmp_path / "chat.jsonl", [GOOD, "not json"])
    out = tmp_path / "out"
    assert main(["sft", "--model", str(teacher), "--data", str(data), "--out", str(out), "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("behemoth: error: ") and f"{data}, line 2" in err
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b"}])
    assert main(["dpo", "--model", str(teacher), "--data", str(pairs), "--out", str(out), "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{pairs}, line 1: missing field 'rejected'" in err
    assert not out.exists()


def test_cli_distill_with_another_tokenizer_exits_2(teacher, corpus, tmp_path, capsys) -> None:
    other = train_tokenizer([corpus.read_text()], 280).save_pretrained(tmp_path / "other")
    out = tmp_path / "out"
    code = main(["distill", "--teacher", str(teacher), "--data", str(corpus), "--out", str(out), "--steps", "2",
                 "--preset", "tiny", "--set", f"data.tokenizer={str(other)!r}"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(other) in err
    assert not out.exists()


@pytest.mark.parametrize("which", ["teacher", "newline-merging"])
def test_training_ids_continue_the_inference_prompt(which, teacher, newline_tokenizer) -> None:
    """What SFT trains on after each assistant header is exactly what a served prompt ends with,
    so the model is never trained on one token boundary and prompted with another."""
    from behemoth.inference.prompts import TokenText

    tokenizer = Tokenizer.load(teacher) if which == "teacher" else newline_tokenizer
    served = TokenText(tokenizer)
    for messages in CONVERSATIONS:
        ids, _ = render_conversation(tokenizer, messages)
        for k, message in enumerate(messages):
            if message["role"] == "assistant":
                prompt = served.chat_prompt_ids(messages[:k])
                assert prompt == render_prompt(tokenizer, messages[:k])
                assert ids[:len(prompt)] == prompt, (messages, k)


def test_each_post_training_stage_has_its_own_defaults_beneath_file_and_flags(tmp_path) -> None:
    """DPO at pretraining's 3e-3 (or the old 2e-4) wipes out what SFT taught (bench/RESULTS.md,
    "Post-training"): each stage starts from its own rate, and a config file or --set still wins."""
    assert load_run_config(None, []).optim.lr == 3e-3
    dpo_run = load_run_config(None, [], stage="dpo")
    assert (dpo_run.optim.lr, dpo_run.optim.weight_decay, dpo_run.optim.warmup_steps) == (2e-6, 0.0, 5)
    assert load_run_config(None, [], stage="rl").optim.lr == 1e-4
    config = tmp_path / "run.toml"
    config.write_text("[optim]\nlr = 5e-6\n")
    from_file = load_run_config(config, [], stage="dpo")
    assert (from_file.optim.lr, from_file.optim.weight_decay) == (5e-6, 0.0)  # the file's lr, the stage's decay
    assert load_run_config(config, ["optim.lr=7e-6"], stage="dpo").optim.lr == 7e-6


def test_pretraining_distillation_and_sft_take_muon_rl_and_dpo_adamw() -> None:
    """Muon reaches AdamW's final bits/byte in 0.40x the time when pretraining, ends distillation
    lower and triples SFT's held-out pass@1 at equal steps (bench/RESULTS.md); RL and DPO stay on
    AdamW, as does RunConfig's own default."""
    names = {stage: load_run_config(None, [], stage=stage).optim.name
             for stage in (None, "pretrain", "distill", "sft", "rl", "dpo")}
    assert names == {None: "adamw", "pretrain": "muon", "distill": "muon", "sft": "muon", "rl": "adamw",
                     "dpo": "adamw"}
    assert load_run_config(None, ["optim.name='adamw'"], stage="pretrain").optim.name == "adamw"


def test_cli_writes_example_chat_data_every_stage_reads(tmp_path, capsys) -> None:
    assert main(["data", "example-chat", "--out", str(tmp_path), "--conversations", "30", "--prompts", "20",
                 "--pairs", "10"]) == 0
    printed = capsys.readouterr().out
    assert all(str(tmp_path / name) in printed for name in ("sft.jsonl", "rl.jsonl", "dpo.jsonl"))
    assert len(load_conversations(tmp_path / "sft.jsonl")) == 30 and len(load_preferences(tmp_path / "dpo.jsonl")) == 10
    assert len(load_prompt_rows(tmp_path / "rl.jsonl")) == 20
    assert main(["data", "example-chat", "--out", str(tmp_path / "x"), "--pairs", "0"]) == 2
    assert "--pairs must be at least 1" in capsys.readouterr().err and not (tmp_path / "x").exists()
    for command in (["data", "example-chat"], ["speedrun"]):  # checked before anything is written
        assert main([*command, "--out", str(tmp_path / "y"), "--safety-share", "1.5"]) == 2
        assert "--safety-share must be between 0 and 1, got 1.5" in capsys.readouterr().err
        assert not (tmp_path / "y").exists()


def test_a_run_folder_given_for_a_model_points_to_its_model(teacher, chat_data, tmp_path) -> None:
    """`--teacher runs/mine` (the run folder) used to say only `runs/mine/tokenizer.json: missing`."""
    run_folder = teacher.parent
    assert (run_folder / "model") == teacher
    with pytest.raises(CheckpointError, match=f"{run_folder}: a run folder, not a model directory; its model is {teacher}"):
        sft(run_config(2), run_folder, chat_data.sft, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
