"""Our Transformer computes what transformers' Llama4ForCausalLM computes, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hf_reference import hf_model_like, random_model

from behemoth.config import ModelConfig, preset

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, intermediate_size_mlp=160,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            num_local_experts=8, num_experts_per_tok=1, max_position_embeddings=512,
            attention_chunk_size=8, floor_scale=4, attn_scale=0.5)

# Each case exercises something the issue lists; sequences (21 tokens) cross chunk boundaries (8).
CASES = {
    "interleave1-top1-qknorm": dict(interleave_moe_layer_step=1, use_qk_norm=True),
    "interleave2-top2-no-qknorm": dict(interleave_moe_layer_step=2, num_experts_per_tok=2, use_qk_norm=False),
    "llama3-rope-scaling": dict(rope_theta=10000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "gqa4-head-dim-not-hidden-over-heads": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=24),
    "custom-no-rope-pattern": dict(no_rope_layers=[0, 1, 0, 1]),
    "tied-embeddings-no-temperature": dict(tie_word_embeddings=True, attn_temperature_tuning=False),
    "no-chunking": dict(attention_chunk_size=None, interleave_moe_layer_step=2),
    "all-dense": dict(moe_layers=[]),
}


def make_config(case: str) -> ModelConfig:
    return ModelConfig(**{**BASE, **CASES[case]})


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_transformers(case: str) -> None:
    model = random_model(make_config(case), seed=1)
    reference = hf_model_like(model)
    ids = torch.randint(0, model.config.vocab_size, (3, 21), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = model(ids), reference(ids).logits
    assert ours.shape == (3, 21, model.config.vocab_size)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_temperature_tuning_and_chunking_change_the_output() -> None:
    """Guards the parity tests against configs whose features never take effect."""
    config = make_config("interleave1-top1-qknorm")
    ids = torch.randint(0, config.vocab_size, (1, 21), generator=torch.Generator().manual_seed(3))
    base = random_model(config, seed=4)
    with torch.no_grad():
        logits = base(ids)
        for change in (dict(attn_temperature_tuning=False), dict(attention_chunk_size=None)):
            other = random_model(config.replace(**change), seed=4)
            assert (other(ids) - logits).abs().max().item() > 1e-3, change


@pytest.mark.parametrize("case", ["interleave1-top1-qknorm", "interleave2-top2-no-qknorm", "tied-embeddings-no-temperature"])
def test_gradients_match_transformers(case: str) -> None:
    model = random_model(make_config(case), seed=5).train()
    reference = hf_model_like(model).train()
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(0, model.config.vocab_size, (2, 21), generator=gen)
    labels = torch.randint(0, model.config.vocab_size, (2, 21), generator=gen)

    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())

    loss_of(model(ids)).backward()
    loss_of(reference(ids).logits).backward()
    theirs = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        expected = theirs[name].grad
        scale = expected.abs().max().item()
        assert scale > 0, f"{name} got no gradient in transformers"
        assert (param.grad - expected).abs().max().item() <= 1e-4 * scale, name


def test_presets_match_transformers_shapes() -> None:
    """The tiny preset's parameters have exactly transformers' names and shapes."""
    model = random_model(preset("tiny"))
    reference = hf_model_like(model)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert ours == theirs
