"""A frozen int8 base under LoRA adapters (model/int8.py, `lora.base_weights = "int8"`): its products
and their gradients against the dequantised float matrices, what autograd keeps of it, training,
resuming and the written model, and the int8 base under served adapters."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from lora_support import randomise_adapters
from safetensors import safe_open
from test_lora import base, chat_data, run_config  # noqa: F401  (module fixtures)

import behemoth
import behemoth.train.sft as sft_stage
from behemoth.config import preset
from behemoth.errors import ConfigError
from behemoth.lora_files import ADAPTER_WEIGHTS, base_sha256
from behemoth.model import init_weights
from behemoth.model.int8 import (FrozenLinear, dequantize_rows, float_state_dict, int8_linear, is_quantized,
                                 quantize_frozen_base, quantize_rows)
from behemoth.model.lora import apply_lora, merge_lora, merged_state_dict
from behemoth.train.config import LoraConfig, load_run_config
from behemoth.train.dpo import dpo
from behemoth.train.metrics import read_metrics
from behemoth.train.rl import rl
from behemoth.train.sft import sft

INT8 = "lora.base_weights='int8'"
pytestmark = pytest.mark.usefixtures("quick_tiny_runs")


def tiny(seed: int = 0) -> behemoth.Transformer:
    model = behemoth.Transformer(preset("tiny"))
    init_weights(model, seed=seed)
    return model


def test_the_int8_product_and_its_input_gradient_are_the_dequantised_matrix_s() -> None:
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(24, 32, generator=generator), torch.randn(24, generator=generator)
    values, scales = quantize_rows(weight)
    assert (dequantize_rows(values, scales) - weight).abs().max() <= scales.float().max() / 2 + 1e-6
    x = torch.randn(40, 32, generator=generator, dtype=torch.float64).float().requires_grad_()
    reference = x.detach().clone().requires_grad_()
    out = int8_linear(x, values, scales, bias)
    expected = torch.nn.functional.linear(reference, dequantize_rows(values, scales), bias)
    torch.testing.assert_close(out, expected)
    grad = torch.randn(out.shape, generator=generator)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, reference.grad)


def test_under_bfloat16_autocast_the_product_computes_in_bfloat16() -> None:
    generator = torch.Generator().manual_seed(1)
    values, scales = quantize_rows(torch.randn(64, 48, generator=generator))
    x = torch.randn(40, 48, generator=generator, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = int8_linear(x, values, scales)
    expected = torch.nn.functional.linear(x.detach(), dequantize_rows(values, scales))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0.02, atol=0.1)
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, dequantize_rows(values, scales).sum(0).expand_as(x), rtol=0.02, atol=0.1)


def test_autograd_keeps_the_int8_matrix_not_a_float_copy() -> None:
    """The memory claim: what a training step saves for backward holds no float [out, in] matrix."""
    values, scales = quantize_rows(torch.randn(64, 48))
    x = torch.randn(8, 48, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        int8_linear(x, values, scales).sum().backward()
    assert saved and all(t.dtype == torch.int8 or t.numel() < values.numel() for t in saved)
    assert any(t.dtype == torch.int8 and t.shape == values.shape for t in saved)


def test_an_int8_base_with_adapters_computes_its_merged_state_dict() -> None:
    """Adapters over the int8 base = a plain float model of the dequantised base + adapters; close
    to the float base's result, the gradient reaching every adapter."""
    model = tiny()
    float_base = copy.deepcopy(model)
    apply_lora(model, LoraConfig(rank=4, alpha=8.0, targets=["all"]))
    randomise_adapters(model, seed=3, std=0.05, b_only=False)
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(1))
    before_int8 = model(ids)
    sizes = quantize_frozen_base(model)
    assert is_quantized(model) and sizes[1] < sizes[0] / 3
    after = model(ids)
    assert 0 < (after - before_int8).abs().max() < 0.05
    plain = behemoth.Transformer(preset("tiny"))
    plain.load_state_dict(merged_state_dict(model))
    torch.testing.assert_close(plain(ids), after, rtol=1e-4, atol=1e-5)
    # the base alone, dequantised, keeps the float base's names and shapes
    state, reference = float_state_dict(float_base), {k: v for k, v in float_state_dict(model).items()
                                                      if "lora_" not in k}
    assert reference.keys() == state.keys()
    assert all(reference[k].shape == state[k].shape for k in state)
    after.float().logsumexp(-1).mean().backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)
    assert all(p.dtype != torch.int8 for p in model.parameters())


def test_adapters_and_merging_refuse_an_int8_base() -> None:
    model = tiny()
    quantize_frozen_base(model)
    with pytest.raises(ConfigError, match="adapters go on the float base"):
        apply_lora(model, LoraConfig(rank=2, alpha=2.0, targets=["attention"]))
    adapted = tiny()
    apply_lora(adapted, LoraConfig(rank=2, alpha=2.0, targets=["attention"]))
    quantize_frozen_base(adapted)
    with pytest.raises(ConfigError, match="would round the adapters away"):
        merge_lora(adapted)


def test_a_frozen_linear_shares_the_linears_weight_until_quantised() -> None:
    linear = torch.nn.Linear(16, 8)
    frozen = FrozenLinear.of(linear)
    assert frozen.weight is linear.weight and FrozenLinear.of(frozen) is frozen
    x = torch.randn(3, 16)
    torch.testing.assert_close(frozen(x), linear(x))
    frozen.quantize_()
    assert frozen.weight.dtype == torch.int8 and "weight" not in dict(frozen.named_parameters())
    torch.testing.assert_close(frozen(x), linear(x), rtol=0.05, atol=0.02)


# ------------------------------------------------------------------------------------------------
# Training over an int8 base
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def int8_run(base, chat_data, tmp_path_factory):  # noqa: F811
    captured = {}
    real = sft_stage.load_base

    def keep(model_dir, run):
        model, tokenizer = real(model_dir, run)
        captured["model"] = model
        return model, tokenizer

    out = tmp_path_factory.mktemp("int8") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sft_stage, "load_base", keep)
        result = sft(run_config(6, INT8), base, chat_data.sft, out, progress=False)
    return result, captured["model"]


def test_training_over_an_int8_base_moves_the_adapters_only(int8_run, base) -> None:  # noqa: F811
    result, model = int8_run
    assert is_quantized(model)
    losses = [r["loss"] for r in read_metrics(result.out_dir / "metrics.jsonl")]
    assert len(losses) == 6 and losses[-1] < losses[0]
    with safe_open(str(result.adapter_dir / ADAPTER_WEIGHTS), "pt") as reader:
        ours = json.loads(reader.metadata()["behemoth"])
        assert all(reader.get_tensor(k).abs().sum() > 0 for k in reader.keys() if "lora_B" in k)
    # the adapter names the float base it was started from, and how it was held
    assert ours["base_weights"] == "int8" and ours["base_sha256"] == base_sha256(behemoth.load(base))


def test_the_written_model_is_what_the_run_computed(int8_run) -> None:
    result, model = int8_run
    written = behemoth.load(result.model_dir).eval()
    ids = torch.randint(3, 250, (2, 10), generator=torch.Generator().manual_seed(5))
    # with gradients on, as in training (under no_grad a few rows take the bfloat16 decode kernel)
    torch.testing.assert_close(written(ids), model.eval()(ids), rtol=1e-4, atol=1e-5)


def test_the_start_line_says_the_base_is_int8(base, chat_data, tmp_path, capsys) -> None:  # noqa: F811
    sft(run_config(1, INT8, "lora.targets=['experts']"), base, chat_data.sft, tmp_path / "run", progress=False)
    lines = [line for line in capsys.readouterr().err.splitlines() if "held as int8" in line]
    assert len(lines) == 1 and "MiB ->" in lines[0]


def test_resume_over_an_int8_base_is_bit_identical(base, chat_data, tmp_path) -> None:  # noqa: F811
    extra = [INT8, "lora.targets=['attention', 'experts']", "run.checkpoint_every=2"]
    whole = sft(run_config(4, *extra), base, chat_data.sft, tmp_path / "whole", progress=False)
    sft(run_config(2, *extra), base, chat_data.sft, tmp_path / "split", progress=False)
    split = sft(run_config(4, *extra), base, chat_data.sft, tmp_path / "split", resume=True, progress=False)
    losses = [[r["loss"] for r in read_metrics(out / "metrics.jsonl")] for out in (whole.out_dir, split.out_dir)]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_dpo_over_an_int8_base_starts_with_the_policy_equal_to_its_reference(base, chat_data, tmp_path  # noqa: F811
                                                                              ) -> None:
    """The reference log-probabilities come from the int8 base too: at the first step every reward is
    0 and the loss is log 2 exactly (from the float base they would differ by the base's rounding)."""
    result = dpo(run_config(1, INT8, stage="dpo"), base, chat_data.dpo, tmp_path / "run", progress=False)
    first = read_metrics(result.out_dir / "metrics.jsonl")[0]
    assert first["loss"] == pytest.approx(0.6931472, abs=1e-6)
    assert first["chosen_reward"] == pytest.approx(0.0, abs=1e-7)


def test_rl_over_an_int8_base_has_an_int8_reference(base, chat_data, tmp_path) -> None:  # noqa: F811
    """The KL penalty's reference is the policy as it starts, int8 base included: exactly 0 at the first
    step (against the float base, the rounding of the base: about 1e-6 here)."""
    def alternate(completions, **_):
        return [float(i % 2) for i in range(len(completions))]

    run = run_config(1, INT8, "rl.beta=0.1", "rl.num_generations=2", "rl.max_completion_length=4",
                     "data.batch_size=2", stage="rl")
    result = rl(run, base, chat_data.rl, tmp_path / "run", progress=False, reward=alternate)
    assert read_metrics(result.out_dir / "metrics.jsonl")[0]["kl"] == 0.0


@pytest.mark.parametrize("setting, words", [(["lora.base_weights='int4'"], "lora.base_weights must be one of"),
                                            ([INT8, "lora.rank=0"], "needs lora.rank > 0")])
def test_bad_base_weights_are_one_line(setting, words) -> None:
    with pytest.raises(ConfigError, match=words):
        load_run_config(None, setting)
