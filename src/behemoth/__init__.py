"""Behemoth: an open Llama 4 MoE system, from a laptop CPU to a cluster.

Public API:
    load(path) -> Transformer            a Hugging Face Llama 4 directory (safetensors only)
    save(model, path, tokenizer=None)    writes one that transformers loads unchanged
    ModelConfig, preset(name)            Llama4TextConfig-compatible configuration
    Transformer                          model(input_ids) -> logits [batch, seq, vocab]
    generate(model, input_ids, ...)      new token ids (KV-cached sampling)
"""

from behemoth.checkpoint import load, save
from behemoth.config import PRESETS, ModelConfig, preset
from behemoth.errors import BehemothError, CheckpointError, ConfigError
from behemoth.generate import generate
from behemoth.model import Transformer, init_weights

__version__ = "0.1.0"

__all__ = ["load", "save", "generate", "ModelConfig", "preset", "PRESETS", "Transformer", "init_weights",
           "BehemothError", "CheckpointError", "ConfigError", "__version__"]
