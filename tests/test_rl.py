"""Online RL (`behemoth rl`): the GRPO arithmetic by hand, rewards, routing identity between the
engine and the loss, and short real runs on a tiny model that learn, resume bit-identically after a
SIGKILL, and train on 2 processes as on one.

The runs start from a tiny model fine-tuned for a few seconds to answer "Pick a color." with one of
four colors, each about a quarter of the time; RL rewards "gold" and must raise that share.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hf_reference import random_model
from phrase_model import CONFIG, Digits
from safetensors.torch import load_file

import behemoth
from behemoth.cli import main
from behemoth.config import preset
from behemoth.data.chat import render_conversation
from behemoth.errors import ConfigError
from behemoth.inference import SamplingParams, complete
from behemoth.inference.offline import Completion
from behemoth.model import init_weights
from behemoth.run_checkpoints import list_checkpoints
from behemoth.tokenizer import train_tokenizer
from behemoth.train.config import load_run_config
from behemoth.train.metrics import read_metrics
from behemoth.train.rl import (Rollout, call_reward_function, clipped_token_loss, completion_logps,
                               group_advantages, k3_kl, load_reward_function, rl, sample_std, token_weights)

WORDINGS = ("Pick a color.", "Name a color.", "Which color?", "Say a color.")
COLORS = ("red", "blue", "green", "gold")
SETTINGS = ["model.preset='tiny'", "data.batch_size=4", "run.eval_every=1000", "run.eval_batches=1",
            "optim.warmup_steps=0", "optim.lr=0.001", "optim.min_lr_ratio=1.0", "run.device='cpu'",
            "rl.num_generations=8", "rl.max_completion_length=8"]
WORKER = Path(__file__).parent / "test_distributed_worker.py"
TIMING = ("rollout_s", "rollout_tokens_per_s", "update_tokens_per_s", "tokens_per_s", "mfu")
# One torch thread here, and OMP_NUM_THREADS=1 in the processes started: they compute the same bits.
pytestmark = pytest.mark.usefixtures("quick_tiny_runs")


def run_config(steps: int, *extra: str):
    return load_run_config(None, [*SETTINGS, f"run.steps={steps}", f"run.checkpoint_every={steps}", *extra], stage="rl")


def records(out: Path) -> list[dict]:
    """The metrics of a run without its timings, which differ between runs."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(out / "metrics.jsonl")]


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny model (with its tokenizer) that answers the color question with each color about
    equally often: 60 steps of supervised training on random answers."""
    tokenizer = train_tokenizer([f"{w} {c}" for w in WORDINGS for c in COLORS] * 20, 300)
    config = preset("tiny").replace(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                                    eos_token_id=[tokenizer.eos_id, tokenizer.eot_id], pad_token_id=tokenizer.pad_id)
    torch.manual_seed(0)
    model = behemoth.Transformer(config)
    init_weights(model, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    for _ in range(60):
        examples = [render_conversation(tokenizer, [{"role": "user", "content": rng.choice(WORDINGS)},
                                                    {"role": "assistant", "content": rng.choice(COLORS)}])
                    for _ in range(16)]
        width = max(len(ids) for ids, _ in examples) - 1
        inputs = torch.full((16, width), tokenizer.pad_id)
        targets = torch.full((16, width), -100)
        for row, (ids, learn) in enumerate(examples):
            inputs[row, :len(ids) - 1] = torch.tensor(ids[:-1])
            targets[row, :len(ids) - 1] = torch.tensor([t if keep else -100 for t, keep in zip(ids[1:], learn[1:])])
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return behemoth.save(model.eval(), tmp_path_factory.mktemp("base") / "model", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "rl.jsonl"
    rows = [{"prompt": wording, "answer": "gold", "match": "exact", "id": f"{i}-{j}"}
            for i in range(6) for j, wording in enumerate(WORDINGS)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ------------------------------------------------------------------------------------------------
# The arithmetic, by hand
# ------------------------------------------------------------------------------------------------

def test_advantages_per_group_batch_and_unscaled() -> None:
    rewards = [1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0]  # two groups of 4
    # group 1: mean 0.25, std (Bessel) = sqrt((0.5625 + 3 * 0.0625) / 3) = 0.5; group 2: all equal
    advantages, uniform = group_advantages(rewards, 4, "group")
    assert advantages == pytest.approx([0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, 0, 0, 0, 0])
    assert uniform == [False, True]
    batch_std = sample_std(rewards)  # mean 1.125: sqrt((0.015625 + 3 * 1.265625 + 4 * 0.765625) / 7)
    assert batch_std == pytest.approx(math.sqrt((0.015625 + 3 * 1.265625 + 4 * 0.765625) / 7))
    advantages, _ = group_advantages(rewards, 4, "batch")
    assert advantages[:2] == pytest.approx([0.75 / (batch_std + 1e-4), -0.25 / (batch_std + 1e-4)])
    advantages, _ = group_advantages(rewards, 4, "none")
    assert advantages == pytest.approx([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])


def test_unscored_completions_stay_out_of_their_groups_statistics() -> None:
    advantages, uniform = group_advantages([1.0, None, 0.0, None, None, None], 3, "none")
    assert advantages == [0.5, 0.0, -0.5, 0.0, 0.0, 0.0]
    assert uniform == [False, True]  # a group with nothing scored carries no signal
    advantages, _ = group_advantages([3.0, None, 1.0], 3, "group")
    assert advantages == pytest.approx([1 / (math.sqrt(2) + 1e-4), 0.0, -1 / (math.sqrt(2) + 1e-4)])


def test_loss_types_aggregate_token_losses_as_defined() -> None:
    token_loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [5.0, 6.0, 0.0]])
    lengths, mask = [3, 1, 2], torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)

    def aggregated(loss_type: str, kept=(True, True, True), max_length: int = 4) -> float:
        weights = torch.tensor(token_weights(lengths, kept, loss_type, max_length))[:, None] * mask
        return float((token_loss * weights).sum())

    assert aggregated("grpo") == pytest.approx(((1 + 2 + 3) / 3 + 4 / 1 + (5 + 6) / 2) / 3)
    assert aggregated("dr_grpo") == pytest.approx(21 / (3 * 4))
    assert aggregated("dapo") == pytest.approx(21 / 6)
    # a completion left out weighs nothing and counts in no normaliser
    assert aggregated("dapo", (True, False, True)) == pytest.approx(17 / 5)
    assert aggregated("grpo", (True, False, True)) == pytest.approx((2 + 5.5) / 2)
    assert aggregated("dr_grpo", (False, False, False)) == 0


def test_clipped_loss_and_where_it_clips() -> None:
    old = torch.zeros(1, 4)
    logps = torch.log(torch.tensor([[1.5, 1.5, 0.5, 1.1]])).requires_grad_()
    advantages = torch.tensor([[2.0, -1.0, -1.0, 1.0]])
    loss, clipped = clipped_token_loss(logps, old, advantages, epsilon=0.2, epsilon_high=0.28)
    # token 0: r = 1.5 > 1.28 with A > 0 -> -1.28 * 2; token 1: A < 0, min(-1.5, -1.28) = -1.5 (never
    # clipped upward for a bad token); token 2: r = 0.5 < 0.8 with A < 0 -> -0.8 * -1; token 3: inside
    assert loss.detach().tolist()[0] == pytest.approx([-2.56, 1.5, 0.8, -1.1])
    assert clipped.tolist() == [[True, False, True, False]]
    loss.sum().backward()
    # d(-r A)/d logp = -r A where not clipped, 0 where the clip holds
    assert logps.grad.tolist()[0] == pytest.approx([0.0, 1.5, 0.0, -1.1])
    same, clipped = clipped_token_loss(logps.detach(), logps.detach(), advantages, 0.2, 0.2)
    assert same[0].tolist() == pytest.approx([-2.0, 1.0, 1.0, -1.0]) and not clipped.any()  # ratio 1: -A


def test_k3_kl_estimator() -> None:
    logps, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.0, -1.0, -1.5])
    expected = [0.0, math.exp(1) - 1 - 1, math.exp(-1) + 1 - 1]
    assert k3_kl(logps, ref).tolist() == pytest.approx(expected)
    # unbiased: the mean over samples of the policy is KL(policy || ref)
    policy, reference = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    samples = torch.multinomial(policy, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    estimate = k3_kl(policy.log()[samples], reference.log()[samples]).mean()
    assert float(estimate) == pytest.approx(float((policy * (policy / reference).log()).sum()), rel=0.02)


# ------------------------------------------------------------------------------------------------
# Rewards
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def reward_module(tmp_path, monkeypatch) -> str:
    (tmp_path / "my_rewards.py").write_text(
        "def gold_or_none(prompts, completions, completion_ids, answer, **fields):\n"
        "    return [None if 'blue' in c else float('gold' in c) for c in completions]\n"
        "def wrong_length(prompts, completions, **fields):\n"
        "    return [1.0]\n"
        "not_a_function = 3\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    return "my_rewards"


@pytest.mark.parametrize("spec, words", [
    ("my_rewards", "expected module:function"), ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
    ("my_rewards:missing", "has no function 'missing'"), ("my_rewards:not_a_function", "has no function")])
def test_a_bad_reward_function_name_is_one_line(reward_module, spec, words) -> None:
    with pytest.raises(ConfigError, match=words) as error:
        load_reward_function(spec)
    assert "\n" not in str(error.value)


def test_reward_functions_get_row_fields_as_lists_and_may_leave_completions_unscored(reward_module) -> None:
    from behemoth.data.chat import PromptRow

    rows = [PromptRow([{"role": "user", "content": "Pick."}], "gold", "exact",
                      {"prompt": "Pick.", "answer": "gold", "id": i}) for i in range(3)]
    completions = [Completion([1], [2, 3], text, [0.0, 0.0], "stop") for text in ("gold", "blue", "red")]
    seen = {}

    def spy(**kwargs):
        seen.update(kwargs)
        return [1, None, 0.5]

    assert call_reward_function(spy, rows, completions) == [1.0, None, 0.5]
    assert seen == {"prompts": ["Pick."] * 3, "completions": ["gold", "blue", "red"],
                    "completion_ids": [[2, 3]] * 3, "answer": ["gold"] * 3, "id": [0, 1, 2]}
    assert call_reward_function(load_reward_function(f"{reward_module}:gold_or_none"), rows, completions) == \
        [1.0, None, 0.0]
    with pytest.raises(ConfigError, match="returned 1 rewards for 3 completions"):
        call_reward_function(load_reward_function(f"{reward_module}:wrong_length"), rows, completions)
    for bad in ([1.0, math.nan, 0.0], [True, 0.0, 0.0], "abc"):
        with pytest.raises(ConfigError, match="reward function"):
            call_reward_function(lambda **_: bad, rows, completions)


# ------------------------------------------------------------------------------------------------
# The engine and the loss route alike
# ------------------------------------------------------------------------------------------------

def test_engine_logprobs_equal_the_training_forward_at_the_same_weights() -> None:
    """Rollouts are sampled by the engine (eval mode, KV cache, chunked attention across chunk
    boundaries, one token per step); the loss reads the same tokens in one train-mode forward.
    With the selection bias frozen at zero (as RL keeps it) both route every token alike."""
    model = random_model(CONFIG, seed=3)
    prompts = [[5, 17, 3, 40, 2, 9, 11][:n] for n in (3, 7, 5, 6)]
    params = [SamplingParams(max_new_tokens=12, temperature=1.0, seed=i, ignore_eos=True) for i in range(4)]
    completions = complete(model, Digits(), prompts, params)
    rollouts = [Rollout(c.prompt_ids, c.token_ids, c.finish_reason, None, None) for c in completions]
    model.train()
    routers = []
    logps, _, mask = completion_logps(model, rollouts, pad_id=0, routers=routers)
    engine = torch.nn.utils.rnn.pad_sequence([torch.tensor(c.logprobs) for c in completions], batch_first=True)
    assert mask.all() and logps.shape == (4, 12)
    assert torch.allclose(logps.detach(), engine, atol=1e-4, rtol=0)
    assert all(len(r.expert_ids.unique()) > 1 for r in routers)  # routing is not trivial here

    # A bias that moved (as the loop's balance would move it) reroutes the loss's forward only.
    for layer in model.model.layers:
        if layer.is_moe:
            layer.feed_forward.selection_bias.copy_(torch.tensor([3.0, -3.0, 3.0, -3.0]))
    moved, _, _ = completion_logps(model, rollouts, pad_id=0)
    assert not torch.allclose(moved.detach(), engine, atol=1e-2)


# ------------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------------

def test_rl_raises_the_reward_and_keeps_routing_frozen(base, prompts, tmp_path) -> None:
    out = tmp_path / "run"
    result = rl(run_config(16, "run.eval_every=16", "optim.lr=0.002"), base, prompts, out, progress=False)
    logged = read_metrics(out / "metrics.jsonl")
    rewards = [r["reward"] for r in logged]
    assert 0.1 < rewards[0] < 0.5  # about a quarter of the answers are gold at the start
    assert mean(rewards[-4:]) > max(0.7, mean(rewards[:4]) + 0.25)  # over 6 seeds: 0.85-0.91, from 0.31-0.43
    assert [r["pass_rate"] for r in logged] == rewards  # the built-in reward is the verifier's verdict
    first = logged[0]
    assert first["clip_ratio"] == 0  # one iteration per batch of rollouts: the ratio is exactly 1
    for key in ("reward_std", "completion_length", "truncated_ratio", "entropy", "frac_reward_zero_std",
                "rollout_tokens_per_s", "update_tokens_per_s"):
        assert key in first and math.isfinite(first[key]) and first[key] >= 0, key
    assert "kl" not in first
    assert {"val_reward", "val_pass_rate"} <= set(result.validation)
    # The selection bias never moved (see the routing test), and the run folder says so.
    saved = load_file(str(list_checkpoints(out / "checkpoints")[-1] / "trainer.safetensors"))
    biases = [v for k, v in saved.items() if k.startswith("selection_bias.")]
    assert biases and all(not b.any() for b in biases)
    assert "bias_update_rate = 0.0" in (out / "config.toml").read_text()


def test_micro_batches_and_reused_rollouts_train_as_one_batch(base, prompts, tmp_path) -> None:
    """DAPO's token mean and the KL are taken over the whole step: two micro-batches of 2 prompts
    train exactly as one of 4 (the same rollouts, as their seeds depend only on step and place); in
    float32, as bfloat16 products of differently shaped batches round apart by about 1%."""
    settings = ("rl.beta=0.1", "rl.num_iterations=2", "rl.epsilon_high=0.28", "rl.drop_zero_std_groups=true",
                "run.dtype='float32'")
    one = rl(run_config(4, *settings), base, prompts, tmp_path / "one", progress=False)
    two = rl(run_config(4, *settings, "data.batch_size=2", "optim.grad_accum=2"), base, prompts, tmp_path / "two",
             progress=False)
    a, b = records(tmp_path / "one"), records(tmp_path / "two")
    for key in ("reward", "completion_length", "frac_reward_zero_std"):
        assert [r[key] for r in a] == [r[key] for r in b]
    for key in ("loss", "kl", "entropy", "clip_ratio", "grad_norm"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-4, abs=1e-6), key
    assert a[0]["kl"] == pytest.approx(0, abs=1e-9) and a[1]["kl"] > 1e-6  # the policy starts at the reference, then moves away
    assert a[1]["reward"] == a[0]["reward"]  # the second step reuses the first step's rollouts
    assert one.final_loss == pytest.approx(two.final_loss, rel=1e-4, abs=1e-6)


def test_a_reward_function_scores_the_rollouts(base, prompts, tmp_path, reward_module) -> None:
    out = tmp_path / "run"
    rl(run_config(2), base, prompts, out, progress=False, reward=f"{reward_module}:gold_or_none")
    for record in read_metrics(out / "metrics.jsonl"):
        assert record["reward"] >= record["pass_rate"]  # blue answers are unscored: out of the mean


def test_resume_after_sigkill_matches_an_uninterrupted_run(base, prompts, tmp_path) -> None:
    """Rollouts reused for 2 steps; the run is killed after its first checkpoint and resumed in a
    new process: the same rollouts are sampled again and the metrics match bit for bit."""
    settings = ["run.steps=8", "run.checkpoint_every=2", "rl.num_iterations=2", "rl.epsilon=0.1"]
    rl(load_run_config(None, [*SETTINGS, *settings], stage="rl"), base, prompts, tmp_path / "whole", progress=False)
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "behemoth", "rl", "--model", str(base), "--data", str(prompts), "--out", str(out)]
    for setting in [*SETTINGS, *settings]:
        command += ["--set", setting]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list_checkpoints(out / "checkpoints") and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    stderr = process.communicate()[1].decode()
    assert process.returncode == -signal.SIGKILL, stderr[-2000:]
    survivors = list_checkpoints(out / "checkpoints")
    assert survivors and int(survivors[-1].name.split("-")[1]) < 8
    finished = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert records(out) == records(tmp_path / "whole")
    assert any(r["clip_ratio"] > 0 for r in records(out))  # the reused rollouts were trained on twice


@pytest.mark.parametrize("setting, words", [
    ("run.checkpoint_every=3", "run.checkpoint_every = 3 must be a multiple of rl.num_iterations = 2"),
    ("run.steps=5", "run.steps = 5 must be a multiple of rl.num_iterations = 2")])
def test_checkpoints_must_fall_between_groups_of_reused_rollouts(base, prompts, tmp_path, setting, words) -> None:
    run = load_run_config(None, [*SETTINGS, "run.steps=4", "run.checkpoint_every=2", "rl.num_iterations=2", setting])
    with pytest.raises(ConfigError, match=words):
        rl(run, base, prompts, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("setting, words", [
    ("rl.num_generations=1", "rl.num_generations must be at least 2"), ("rl.loss_type='ppo'", "rl.loss_type"),
    ("rl.scale_rewards=true", "rl.scale_rewards must be str"), ("rl.temperature=0", "rl.temperature"),
    ("rl.epsilon=1.5", "rl.epsilon"), ("rl.beta=-1", "rl.beta"), ("rl.max_completion_length=0", "rl.max_completion")])
def test_bad_rl_settings_are_one_line_naming_the_key(setting, words) -> None:
    with pytest.raises(ConfigError, match=words) as error:
        load_run_config(None, [setting])
    assert "\n" not in str(error.value)


def test_prompt_rows_are_checked_before_any_work(base, tmp_path) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "Pick a color.", "answer": "gold"}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(ConfigError, match=f"{data}, line 2: no \"answer\""):
        rl(run_config(2), base, data, tmp_path / "out", progress=False)
    data.write_text(json.dumps({"prompt": [{"role": "assistant", "content": "hi"}], "answer": "a"}) + "\n")
    with pytest.raises(ConfigError, match="line 1: the prompt's last message must be the user's"):
        rl(run_config(2), base, data, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_rl(base, prompts, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["rl", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "usage: behemoth rl" in text and "--reward" in text and "--model" in text
    out = tmp_path / "out"
    args = ["rl", "--model", str(base), "--data", str(prompts), "--out", str(out), "--steps", "2"]
    assert main([*args, "--reward", "no_such_module_xyz:f"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot import 'no_such_module_xyz'" in err
    assert not out.exists()


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="torch.distributed with the gloo backend is not available in this build")
def test_two_processes_train_like_one(base, prompts, tmp_path) -> None:
    """torchrun, 2 ranks (gloo, FSDP): each samples its half of the prompts with a gathered copy of
    the weights, and the step is the one a single process takes (float64, see test_distributed)."""
    settings = [*SETTINGS, "run.steps=4", "run.checkpoint_every=4", "run.dtype='float64'", "rl.num_iterations=2",
                "rl.loss_type='dapo'", "rl.scale_rewards='batch'", "rl.beta=0.05", "run.eval_every=4"]
    rl(load_run_config(None, settings, stage="rl"), base, prompts, tmp_path / "one", progress=False)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
               "rl", "--model", str(base), "--data", str(prompts), "--out", str(tmp_path / "two")]
    for setting in settings:
        command += ["--set", setting]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=180,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert finished.returncode == 0, finished.stderr[-4000:]
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    for key in ("reward", "pass_rate", "completion_length", "frac_reward_zero_std", "val_reward"):
        assert [r.get(key) for r in two] == [r.get(key) for r in one], key
    for key in ("loss", "grad_norm", "entropy", "clip_ratio", "kl"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-7, abs=1e-12), key
    ranks = [load_file(str(tmp_path / "two" / f"bias.rank{rank}.safetensors")) for rank in (0, 1)]
    assert all(not bias.any() for rank in ranks for bias in rank.values())
