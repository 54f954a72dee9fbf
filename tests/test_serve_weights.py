"""Serving weight formats (behemoth.inference.weights) and the engine's own torch threads."""

from __future__ import annotations

import copy
import dataclasses
import threading

import pytest
import torch
import torch.nn.functional as F
from cpu_kinds import KINDS, runnable_cpu, simulated_cpu
from hf_reference import random_model
from phrase_model import CONFIG, Digits, pattern_text, train_phrase_model

from behemoth.cli import serving as cli
from behemoth.errors import ConfigError
from behemoth.hardware import choose_paths, detect_cpu
from behemoth.inference.generate import generate
from behemoth.model import Transformer
from behemoth.inference.engine import Engine, SamplingParams, leave_cores_to_engines
from behemoth.inference.weights import (DEQUANTIZED_ROWS, WEIGHT_FORMATS, BFloat16Linear, Int8Linear, int8_matmul,
                                    prepare_weights, quantize_rows)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture(scope="module")
def trained() -> Transformer:
    return train_phrase_model()


def test_weight_formats_are_the_cli_choices() -> None:
    assert cli.WEIGHT_FORMATS == WEIGHT_FORMATS


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown weight format 'int4'"):
        prepare_weights(random_model(CONFIG, seed=0), "int4")


def test_int8_off_the_cpu_is_refused_before_any_conversion() -> None:
    """torch's int8 weight-only kernel is a CPU kernel: on another device (here "meta", standing in for
    CUDA) the format is one line, and the model is left as it was."""
    model = random_model(CONFIG, seed=0).to("meta")
    with pytest.raises(ConfigError, match="int8 weights run on the CPU only .*meta.*use bfloat16"):
        prepare_weights(model, "int8")
    assert not any(isinstance(m, Int8Linear) for m in model.modules())


def test_quantized_rows_are_within_half_a_step() -> None:
    weight = torch.randn(3, 40, 64) * torch.logspace(-3, 1, 40)[None, :, None]  # rows of very different sizes
    values, scales = quantize_rows(weight)
    assert values.dtype == torch.int8 and scales.shape == (3, 40)
    restored = values.float() * scales.float()[..., None]
    assert ((restored - weight).abs() <= scales.float()[..., None] / 2 + 1e-6).all()
    assert (values.abs().amax(dim=-1) >= 126).all()  # each row uses the whole range


def test_fused_int8_linear_follows_the_float_projections() -> None:
    torch.manual_seed(0)
    linears = [torch.nn.Linear(64, n, bias=True) for n in (64, 32, 32)]
    fused = Int8Linear.fused(linears)
    x = torch.randn(5, 7, 64)
    exact = torch.cat([linear(x) for linear in linears], dim=-1)
    out = fused(x).float()
    assert out.shape == exact.shape and fused(x).dtype == torch.bfloat16
    assert Int8Linear.fused(linears, float_output=True)(x).dtype == torch.float32
    assert (out - exact).norm() / exact.norm() < 0.02


@pytest.mark.parametrize("prompt_dtype", [torch.bfloat16, torch.float32])  # native-bfloat16 CPUs; AVX2-only
def test_int8_prompt_products_equal_the_decode_kernel_up_to_bfloat16_rounding(prompt_dtype, monkeypatch) -> None:
    # prompts (DEQUANTIZED_ROWS rows or more) multiply by the int8 matrix cast to prompt_dtype;
    # decode steps use the weight-only kernel; both are the same product of the same int8 values
    torch.manual_seed(0)
    values, scales = quantize_rows(torch.randn(48, 64))
    prompt = torch.randn(DEQUANTIZED_ROWS + 3, 64).to(torch.bfloat16)
    one_at_a_time = torch.cat([int8_matmul(row[None], values, scales, prompt_dtype) for row in prompt])
    cast_products = []
    linear = F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, *rest: cast_products.append(w.dtype) or linear(x, w, *rest))
    together = int8_matmul(prompt, values, scales, prompt_dtype)
    assert cast_products == [prompt_dtype]  # the prompt took the cast matrix...
    assert together.dtype == torch.bfloat16 and together.shape == (DEQUANTIZED_ROWS + 3, 48)
    scale = one_at_a_time.float().abs().amax(dim=-1, keepdim=True)
    assert ((together.float() - one_at_a_time.float()).abs() <= 2 ** -7 * scale).all()  # ...and agrees


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_bfloat16_linear_equals_the_linear_in_bfloat16_at_any_row_count(bias: bool, pack: bool) -> None:
    if pack and not detect_cpu().onednn_bf16:
        pytest.skip("this CPU's oneDNN has no bfloat16 products (AVX2 only): nothing to pack; the unpacked "
                    "bfloat16 products are checked")
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=bias)
    head = BFloat16Linear(linear, pack=pack)
    assert (head._packed is not None) == pack  # the reordered weights are what `pack` is for
    reference = torch.nn.Linear(64, 48, bias=bias).to(torch.bfloat16)
    reference.load_state_dict(linear.state_dict())
    for rows in (1, 3, 16, 40):
        x = torch.randn(rows, 64)
        out = head(x)
        assert out.dtype == torch.bfloat16 and out.shape == (rows, 48)
        assert torch.equal(out, reference(x.to(torch.bfloat16)))


def test_paths_follow_the_cpu() -> None:
    """Without native bfloat16 a bfloat16 product of many rows costs several float32 ones
    (bench/RESULTS.md), so such a CPU keeps float32 where the other takes bfloat16."""
    avx2, native = choose_paths(simulated_cpu("avx2-only")), choose_paths(simulated_cpu("avx512-bf16"))
    assert (avx2.lm_head, avx2.int8_prompt_dtype, avx2.training_bf16) == ("float32", torch.float32, "emulated")
    assert (native.lm_head, native.int8_prompt_dtype, native.training_bf16) == (
        "bfloat16 packed", torch.bfloat16, "native")
    # AVX-512 without its bfloat16 extension, or a torch whose oneDNN refuses bfloat16: no native bfloat16
    for features in (dataclasses.replace(simulated_cpu("avx512-bf16"), avx512_bf16=False),
                     dataclasses.replace(simulated_cpu("avx512-bf16"), onednn_bf16=False)):
        assert choose_paths(features).lm_head == "float32"


@pytest.mark.parametrize("kind", KINDS)
def test_each_cpu_kind_gets_its_lm_head(trained, kind) -> None:
    cpu = runnable_cpu(kind)
    int8 = prepare_weights(copy.deepcopy(trained), "int8", cpu)
    if kind == "avx2-only":  # float32, as trained
        assert type(int8.lm_head) is torch.nn.Linear and torch.equal(int8.lm_head.weight, trained.lm_head.weight)
    else:
        assert isinstance(int8.lm_head, BFloat16Linear) and int8.lm_head._packed is not None
        assert torch.equal(int8.lm_head.weight, trained.lm_head.weight.to(torch.bfloat16))
    assert int8.model.layers[0].self_attn.qkv_proj.prompt_dtype == choose_paths(cpu).int8_prompt_dtype
    model = prepare_weights(copy.deepcopy(trained), "bfloat16", cpu)  # bfloat16 everything, on every CPU
    assert isinstance(model.lm_head, BFloat16Linear) and model.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(model.lm_head.weight, trained.lm_head.weight.to(torch.bfloat16))


@pytest.mark.parametrize("kind", KINDS)
def test_int8_model_keeps_what_the_trained_model_learned(trained, kind) -> None:
    int8 = prepare_weights(copy.deepcopy(trained), "int8", runnable_cpu(kind))
    assert int8.model.layers[0].self_attn.qkv_proj is not None and not hasattr(int8.model.layers[0].self_attn, "q_proj")
    assert int8.dtype == torch.float32  # hidden states and KV cache stay float
    text = torch.stack([pattern_text(40, seed=1000 + row) for row in range(4)])
    with torch.no_grad():
        exact, approx = trained(text), int8(text).float()
    assert (exact.argmax(-1) == approx.argmax(-1)).float().mean() > 0.97
    loss_exact = F.cross_entropy(exact[:, :-1].flatten(0, 1), text[:, 1:].flatten())
    loss_int8 = F.cross_entropy(approx[:, :-1].flatten(0, 1), text[:, 1:].flatten())
    assert loss_exact < 1.0  # it did learn the phrase...
    assert abs(loss_int8 - loss_exact) < 0.05 * loss_exact + 0.01  # ...and int8 keeps it


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prompt_length", [20, DEQUANTIZED_ROWS + 8])  # both kinds of prompt product
def test_int8_greedy_continues_the_phrase(trained, prompt_length, kind) -> None:
    int8 = prepare_weights(copy.deepcopy(trained), "int8", runnable_cpu(kind))
    text = pattern_text(prompt_length + 40, seed=7)
    out = generate(int8, text[None, :prompt_length], max_new_tokens=40)
    assert out[0].tolist() == text[prompt_length:].tolist()


def test_layers_of_unsupported_width_keep_float_weights() -> None:
    # hidden 72 is not a multiple of 16: projections reading it stay float; o_proj (64 in) is int8
    config = CONFIG.replace(hidden_size=72)
    model = random_model(config, seed=0)
    int8 = prepare_weights(copy.deepcopy(model), "int8")
    attention = int8.model.layers[0].self_attn
    assert attention.qkv_proj is None and isinstance(attention.q_proj, torch.nn.Linear)
    assert isinstance(attention.o_proj, Int8Linear)
    ids = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        exact, approx = model(ids), int8(ids).float()
    assert (approx - exact).norm() / exact.norm() < 0.05


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prompt_length", [16, DEQUANTIZED_ROWS + 8])  # int8: both kinds of prompt product
@pytest.mark.parametrize("weights", ["int8", "bfloat16"])
def test_engine_decodes_with_each_format_as_generate_does(trained, weights, prompt_length, kind) -> None:
    model = prepare_weights(copy.deepcopy(trained), weights, runnable_cpu(kind))
    prompt = pattern_text(prompt_length, seed=3)
    expected = generate(model, prompt[None], max_new_tokens=12)[0].tolist()
    with Engine(model, Digits(), max_batch_size=4) as engine:
        request = engine.submit(prompt.tolist(), SamplingParams(temperature=0.0, max_new_tokens=12))
        tokens = [event.token_id for event in request]
    assert tokens == expected
    assert request.finish_reason == "length"


def test_bfloat16_format_halves_the_weights(trained) -> None:
    model = prepare_weights(copy.deepcopy(trained), "bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.dtype == torch.bfloat16
    assert model.rope_inv_freq.dtype == torch.float32  # angles at long positions stay exact


def test_engine_thread_uses_its_own_thread_count(trained) -> None:
    seen: list[tuple[str, int]] = []
    model = copy.deepcopy(trained)
    forward = model.hidden_states

    def spy(*args, **kwargs):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return forward(*args, **kwargs)

    model.hidden_states = spy
    with Engine(model, Digits(), threads=1) as engine:
        list(engine.submit([1, 2, 3], SamplingParams(max_new_tokens=3)))
    assert seen and all(entry == ("behemoth-engine", 1) for entry in seen)
    with pytest.raises(ConfigError, match="threads must be a positive integer"):
        Engine(model, Digits(), threads=0)


def test_leave_cores_to_engines_returns_the_count_and_keeps_one() -> None:
    result: dict[str, int] = {}

    def body() -> None:  # on a thread of its own: the test process keeps its setting
        torch.set_num_threads(2)
        result["returned"] = leave_cores_to_engines()
        result["after"] = torch.get_num_threads()

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert result == {"returned": 2, "after": 1}
