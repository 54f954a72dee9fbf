"""LoRA adapters (model/lora.py) and their training (train/loop.py) and merging (`behemoth merge`).

The arithmetic is pinned on the tiny preset by hand: an adapted model starts equal to its base,
the routed experts' per-expert terms equal a dense W[e] + A[e] @ B[e] * scale computed by hand, and
the merged weights compute what the adapters did. Short real runs (a few steps) show that only the
adapters train, the base stays bit-identical, runs resume bit-identically, and every post-training
stage takes adapters.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from corpora import write_phrase_corpus
from lora_support import randomise_adapters
from safetensors import safe_open
from safetensors.torch import load_file

import behemoth
import behemoth.train.sft as sft_stage
from behemoth.lora_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, base_sha256
from behemoth.cli import main
from behemoth.config import preset
from behemoth.data.synthetic_chat import ChatData, write_chat_data
from behemoth.errors import CheckpointError, ConfigError
from behemoth.model import init_weights
from behemoth.model.lora import (ExpertLoRA, apply_lora, base_state_dict, lora_state_dict, merge_lora,
                                 merged_state_dict)
from behemoth.model.moe import Experts, route
from behemoth.tokenizer import Tokenizer, train_tokenizer
from behemoth.train.config import LoraConfig, load_run_config
from behemoth.train.distill import distill
from behemoth.train.dpo import dpo
from behemoth.train.metrics import read_metrics
from behemoth.train.optim import build_optimizer
from behemoth.train.rl import rl
from behemoth.train.sft import sft
from behemoth.train.trainer import pretrain

SETTINGS = ["data.seq_len=48", "data.batch_size=4", "run.eval_every=1000", "run.eval_batches=1",
            "run.dtype='float32'", "run.device='cpu'", "optim.warmup_steps=0", "optim.lr=0.01",
            "optim.min_lr_ratio=1.0", "lora.rank=4", "lora.alpha=8.0"]
pytestmark = pytest.mark.usefixtures("quick_tiny_runs")


def run_config(steps: int, *extra: str, stage: str | None = None):
    return load_run_config(None, [*SETTINGS, f"run.steps={steps}", f"run.checkpoint_every={steps}", *extra],
                           stage=stage)


def tiny_model(seed: int = 0, **overrides) -> behemoth.Transformer:
    model = behemoth.Transformer(preset("tiny").replace(**overrides))
    init_weights(model, seed=seed)
    return model


def settings(rank: int = 4, targets: list[str] | None = None, **others) -> LoraConfig:
    return LoraConfig(rank=rank, alpha=8.0, targets=targets or ["all"], **others)


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> ChatData:
    return write_chat_data(tmp_path_factory.mktemp("chat"), conversations=48, pairs=24, prompts=8, safety=0.0)


@pytest.fixture(scope="module")
def base(chat_data, tmp_path_factory) -> Path:
    """A tiny model with a tokenizer trained on the chat data: the base every run adapts."""
    texts = [line for path in (chat_data.sft, chat_data.dpo, chat_data.rl) for line in path.read_text().splitlines()]
    tokenizer = train_tokenizer(texts, 300)
    model = tiny_model(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                       eos_token_id=[tokenizer.eos_id, tokenizer.eot_id], pad_token_id=tokenizer.pad_id)
    return behemoth.save(model.eval(), tmp_path_factory.mktemp("base") / "model", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def sft_run(base, chat_data, tmp_path_factory) -> SimpleNamespace:
    """3 SFT steps with adapters everywhere, the router included; the trained model kept."""
    captured = {}

    def keep(model_dir, run):
        model, tokenizer = real(model_dir, run)
        captured["model"] = model
        return model, tokenizer

    real = sft_stage.load_base
    out = tmp_path_factory.mktemp("sft") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sft_stage, "load_base", keep)
        result = sft(run_config(3, "lora.targets=['all', 'router']"), base, chat_data.sft, out, progress=False)
    return SimpleNamespace(result=result, model=captured["model"], out=out)


# ------------------------------------------------------------------------------------------------
# The arithmetic
# ------------------------------------------------------------------------------------------------

def test_an_adapted_model_starts_equal_to_its_base() -> None:
    model = tiny_model()
    ids = torch.randint(0, 512, (2, 10))
    before, one_token_before = model(ids), model(ids[:1, :1])  # one token: the experts' own path
    apply_lora(model, settings(targets=["all", "router"]))
    assert torch.equal(model(ids), before)
    assert torch.equal(model(ids[:1, :1]), one_token_before)


def test_routed_expert_terms_equal_a_dense_reference_by_hand() -> None:
    """Each token's picked experts apply W[e] + A[e] @ B[e] * scale, computed here densely."""
    torch.manual_seed(0)
    experts = Experts(num_experts=4, hidden_size=8, intermediate_size=6)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.3)
    torch.nn.init.normal_(experts.down_proj, std=0.3)
    generator = torch.Generator().manual_seed(0)
    experts.lora_gate_up = ExpertLoRA(experts.gate_up_proj, rank=2, scale=1.5, dropout=0.0, generator=generator)
    experts.lora_down = ExpertLoRA(experts.down_proj, rank=2, scale=1.5, dropout=0.0, generator=generator)
    for lora in (experts.lora_gate_up, experts.lora_down):
        torch.nn.init.normal_(lora.lora_B, std=0.5)
    x = torch.randn(5, 8)
    expert_ids, gates = route(torch.randn(5, 4), top_k=2)
    dense_gate_up = experts.gate_up_proj + experts.lora_gate_up.lora_A @ experts.lora_gate_up.lora_B * 1.5
    dense_down = experts.down_proj + experts.lora_down.lora_A @ experts.lora_down.lora_B * 1.5
    expected = torch.zeros(5, 8)
    for t in range(5):
        for e, g in zip(expert_ids[t].tolist(), gates[t]):
            gate, up = ((x[t] * g) @ dense_gate_up[e]).chunk(2)
            expected[t] += (F.silu(gate) * up) @ dense_down[e]
    with torch.no_grad():
        torch.testing.assert_close(experts(x, expert_ids, gates), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(experts(x[:1], expert_ids[:1], gates[:1]), expected[:1], rtol=1e-5, atol=1e-5)


def test_merged_weights_compute_what_the_adapters_did() -> None:
    model = tiny_model()
    apply_lora(model, settings(targets=["all", "router"], use_rslora=True))
    randomise_adapters(model)
    model.eval()
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        adapted = model(ids)
        plain = tiny_model(seed=5)
        plain.load_state_dict(merged_state_dict(model))
        torch.testing.assert_close(plain.eval()(ids), adapted, rtol=1e-5, atol=1e-5)
        merged = merge_lora(model)
        assert not lora_state_dict(merged)
        torch.testing.assert_close(merged(ids), adapted, rtol=1e-5, atol=1e-5)


def test_rslora_scales_by_the_square_root_of_the_rank() -> None:
    plain = apply_lora(tiny_model(), settings(rank=4))
    rs = apply_lora(tiny_model(), settings(rank=4, use_rslora=True))
    assert (plain.scale, rs.scale) == (2.0, 4.0)


@pytest.mark.parametrize("target, preset_name", [("nope", "tiny"), ("self_attn.gate_proj", "tiny"),
                                                  ("experts", "dense-small")])
def test_a_target_that_matches_nothing_is_one_line_naming_it(target, preset_name) -> None:
    with torch.device("meta"):  # only the module layout matters
        model = behemoth.Transformer(preset(preset_name))
    with pytest.raises(ConfigError, match=f"lora.targets: '{target}' matches nothing") as err:
        apply_lora(model, settings(targets=["attention", target]))
    assert "\n" not in str(err.value)
    assert all(p.requires_grad for p in model.parameters())  # refused before anything changed


def test_coverage_names_the_modules_and_the_trained_parameters() -> None:
    model = tiny_model()
    total = sum(p.numel() for p in model.parameters())
    coverage = apply_lora(model, settings(targets=["q_proj", "v_proj", "experts"]))
    # tiny, rank 4: 4 layers of q (64 -> 64) and v (64 -> 32: 2 kv heads of 16); 2 MoE layers of two
    # stacks, 4 experts each: gate_up 64 -> 2 x 128, down 128 -> 64
    trained = 4 * 4 * ((64 + 64) + (64 + 32)) + 2 * 4 * 4 * ((64 + 256) + (128 + 64))
    assert coverage.trained == trained
    assert coverage.line() == (f"lora: rank 4, scale 2, 12 modules: attention 8 (q_proj, v_proj); experts 4 "
                               f"(gate_up_proj, down_proj); training {trained:,} of {total + trained:,} parameters "
                               f"({100 * trained / (total + trained):.2f}%), the base frozen")


def test_the_router_is_a_target_only_when_named() -> None:
    everything = apply_lora(tiny_model(), settings(targets=["all"]))
    assert not any(site.endswith("router") for site in everything.sites)
    router = apply_lora(tiny_model(), settings(targets=["router"]))
    assert router.sites == ["model.layers.1.feed_forward.router", "model.layers.3.feed_forward.router"]


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_the_optimizer_holds_the_adapters_only(name) -> None:
    model = tiny_model()
    apply_lora(model, settings(targets=["all", "router"]))
    optim = load_run_config(None, [f"optim.name='{name}'"]).optim
    optimizer = build_optimizer(model, optim)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(t) for t in lora_state_dict(model).values()}
    model(torch.randint(0, 512, (2, 8))).sum().backward()
    optimizer.step()
    assert {id(p) for p in optimizer.state} <= held


# ------------------------------------------------------------------------------------------------
# Training runs
# ------------------------------------------------------------------------------------------------

def test_sft_trains_only_the_adapters_and_leaves_the_base_bit_identical(sft_run, base) -> None:
    model, start = sft_run.model, behemoth.load(base)
    own = base_state_dict(model)
    assert all(torch.equal(own[name], tensor) for name, tensor in start.state_dict().items())
    assert all(not p.requires_grad for name, p in model.named_parameters() if "lora_" not in name)
    moved = [name for name, t in lora_state_dict(model).items() if name.endswith("lora_B.weight") and t.abs().sum() > 0]
    assert len(moved) == len(lora_state_dict(model)) // 2  # every adapter trained
    # the router's adapter really changes routing logits
    layer = model.model.layers[1].feed_forward
    tokens = torch.randn(6, 64)
    with torch.no_grad():
        assert not torch.allclose(layer.router_logits(tokens), F.linear(tokens, layer.router.weight))


def test_optimizer_state_in_the_checkpoint_is_the_adapters(sft_run) -> None:
    checkpoint = sft_run.out / "checkpoints" / "step-000003"
    moments = load_file(str(checkpoint / "trainer.safetensors"))
    shapes = sorted(tuple(t.shape) for k, t in moments.items() if k.endswith(".exp_avg"))
    assert shapes == sorted(tuple(t.shape) for t in lora_state_dict(sft_run.model).values())
    assert (checkpoint / "adapter" / ADAPTER_WEIGHTS).is_file()


def test_the_run_writes_the_merged_model_and_the_adapter(sft_run, base) -> None:
    result = sft_run.result
    assert result.adapter_dir == sft_run.out / "adapter"
    config = json.loads((result.adapter_dir / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["base_model_name_or_path"] == str(base.resolve())
    assert config["target_parameters"] and all(".experts." in name for name in config["target_parameters"])
    assert any(name.endswith(".router") for name in config["target_modules"])
    with safe_open(str(result.adapter_dir / ADAPTER_WEIGHTS), framework="pt") as reader:
        ours = json.loads(reader.metadata()["behemoth"])
    assert ours["targets"] == ["all", "router"] and ours["base_sha256"] == base_sha256(behemoth.load(base))
    merged = behemoth.load(result.model_dir).eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), sft_run.model.eval()(ids), rtol=1e-5, atol=1e-5)


def test_cli_merge_round_trip_and_bad_input(sft_run, base, tmp_path, capsys) -> None:
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(base), "--adapter", str(sft_run.result.adapter_dir), "--out", str(out)]) == 0
    merged, trained = behemoth.load(out).state_dict(), behemoth.load(sft_run.result.model_dir).state_dict()
    assert all(torch.equal(merged[name], t) for name, t in trained.items())
    assert (out / "tokenizer.json").is_file()
    capsys.readouterr()
    other = behemoth.save(tiny_model(hidden_size=32, head_dim=8), tmp_path / "other")
    same_shape = behemoth.save(tiny_model(seed=9, vocab_size=merged["lm_head.weight"].shape[0]), tmp_path / "same")
    for model, adapter, words in ((base, tmp_path / "missing", "no such adapter directory"),
                                  (other, sft_run.result.adapter_dir, "does not fit the base"),
                                  (same_shape, sft_run.result.adapter_dir, "was trained on another base")):
        target = tmp_path / "refused"
        assert main(["merge", "--model", str(model), "--adapter", str(adapter), "--out", str(target)]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1
        assert not target.exists()


def test_resume_is_bit_identical(base, chat_data, tmp_path) -> None:
    """4 steps in one go == 2 steps, stop, resume to 4 (dropout on: the RNG is restored too)."""
    extra = ["lora.dropout=0.1", "lora.targets=['attention', 'experts']", "run.checkpoint_every=2"]
    whole = sft(run_config(4, *extra), base, chat_data.sft, tmp_path / "whole", progress=False)
    sft(run_config(2, *extra), base, chat_data.sft, tmp_path / "split", progress=False)
    split = sft(run_config(4, *extra), base, chat_data.sft, tmp_path / "split", resume=True, progress=False)
    losses = [[r["loss"] for r in read_metrics(out / "metrics.jsonl")] for out in (whole.out_dir, split.out_dir)]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    a, b = (load_file(str(r.adapter_dir / ADAPTER_WEIGHTS)) for r in (whole, split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the base comes from --model again on a resume: another base is refused, naming the checkpoint's
    model = behemoth.load(base)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    other = behemoth.save(model, tmp_path / "other", tokenizer=Tokenizer.load(base))
    with pytest.raises(CheckpointError, match="was trained on another base"):
        sft(run_config(6, *extra), other, chat_data.sft, tmp_path / "split", resume=True, progress=False)


def test_the_coverage_line_is_printed_at_the_start(base, chat_data, tmp_path, capsys) -> None:
    sft(run_config(1, "lora.targets=['o_proj']"), base, chat_data.sft, tmp_path / "run", progress=False)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lora:")]
    assert len(lines) == 1 and "attention 4 (o_proj)" in lines[0]


def test_a_bad_target_is_refused_before_training(base, chat_data, tmp_path) -> None:
    with pytest.raises(ConfigError, match="'gate_up' matches nothing"):
        sft(run_config(1, "lora.targets=['gate_up']"), base, chat_data.sft, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def assert_adapters_trained(result) -> None:
    """Every B left zero, the model written (merged) loads."""
    tensors = load_file(str(result.adapter_dir / ADAPTER_WEIGHTS))
    assert all(t.abs().sum() > 0 for name, t in tensors.items() if name.endswith("lora_B.weight"))
    assert behemoth.load(result.model_dir)


def test_dpo_takes_adapters(base, chat_data, tmp_path) -> None:
    assert_adapters_trained(dpo(run_config(2, stage="dpo"), base, chat_data.dpo, tmp_path / "run",
                                progress=False))


def test_rl_takes_adapters(base, chat_data, tmp_path) -> None:
    def alternate(completions, **_):  # one good and one bad completion per group: a gradient to follow
        return [float(i % 2) for i in range(len(completions))]

    run = run_config(2, "rl.num_generations=2", "rl.max_completion_length=4", "data.batch_size=2",
                     stage="rl")
    assert_adapters_trained(rl(run, base, chat_data.rl, tmp_path / "run", progress=False, reward=alternate))


def test_distill_takes_adapters(base, tmp_path) -> None:
    corpus = write_phrase_corpus(tmp_path / "corpus.txt", documents=40)
    run = run_config(2, f"data.sources=[{str(corpus)!r}]", "model.preset='tiny'", "data.seq_len=16", stage="distill")
    result = distill(run, base, tmp_path / "run", progress=False)
    config = json.loads((result.adapter_dir / ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"].startswith("a fresh tiny student (run.seed 0)")
    assert_adapters_trained(result)


def test_pretraining_refuses_adapters(tmp_path) -> None:
    with pytest.raises(ConfigError, match="pretraining trains every weight"):
        pretrain(run_config(1), tmp_path / "run", progress=False)


@pytest.mark.parametrize("setting, words", [("lora.rank=-1", "lora.rank must not be negative"),
                                            ("lora.alpha=0", "lora.alpha must be positive"),
                                            ("lora.dropout=1.0", "lora.dropout must be in"),
                                            ("lora.targets='all'", "lora.targets must be list")])
def test_bad_lora_settings_are_one_line(setting, words) -> None:
    with pytest.raises(ConfigError, match=words):
        load_run_config(None, [setting])


def test_lora_is_off_by_default() -> None:
    assert load_run_config(None, []).lora.rank == 0
