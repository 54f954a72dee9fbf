"""Behemoth: an open Llama 4 MoE system, from a laptop CPU to a cluster.

Public API:
    load(path) -> Transformer            a Hugging Face Llama 4 directory (safetensors only)
    save(model, path, tokenizer=None)    writes one that transformers loads unchanged
    ModelConfig, preset(name)            Llama4TextConfig-compatible configuration
    Transformer                          model(input_ids) -> logits [batch, seq, vocab]
    generate(model, input_ids, ...)      new token ids (KV-cached sampling)
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from behemoth.config import PRESETS, ModelConfig, preset
from behemoth.errors import BehemothError, CheckpointError, ConfigError

__version__ = "0.1.0"

# Imported on first use, so that `behemoth info` and `--help` do not pay for loading torch.
_LAZY = {"load": "behemoth.checkpoint", "save": "behemoth.checkpoint", "generate": "behemoth.inference.generate",
         "Transformer": "behemoth.model", "init_weights": "behemoth.model"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'behemoth' has no attribute {name!r}")


__all__ = ["load", "save", "generate", "ModelConfig", "preset", "PRESETS", "Transformer", "init_weights",
           "BehemothError", "CheckpointError", "ConfigError", "__version__"]
