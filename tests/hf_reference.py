"""Helpers to build transformers' Llama4ForCausalLM with exactly our weights (test-only)."""

from __future__ import annotations

import pytest
import torch

from behemoth.config import ModelConfig
from behemoth.model import Transformer, init_weights

transformers = pytest.importorskip("transformers", reason="transformers is needed for parity tests")


def random_model(config: ModelConfig, seed: int = 0) -> Transformer:
    """Our model with random weights, norms included (so a skipped norm shows in the output)."""
    torch.manual_seed(seed)
    model = Transformer(config)
    init_weights(model, seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model.eval()


def hf_model_like(model: Transformer, attn_implementation: str = "eager"):
    """transformers' Llama4ForCausalLM with the same config and a copy of the same weights."""
    hf_config = transformers.Llama4TextConfig(**_without_meta(model.config.to_hf_dict()))
    hf_config._attn_implementation = attn_implementation
    hf = transformers.Llama4ForCausalLM(hf_config).to(model.dtype).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected, unexpected
    assert not [m for m in missing if m != "lm_head.weight" or not model.config.tie_word_embeddings], missing
    return hf


def _without_meta(config_dict: dict) -> dict:
    return {k: v for k, v in config_dict.items() if k not in ("architectures", "model_type")}
