"""A tiny model trained on a repeating phrase, for tests of serving speed-ups that must keep
what a model learned (int8 weights, the compiled decode step)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hf_reference import random_model

from behemoth.config import ModelConfig
from behemoth.model import Transformer

CONFIG = ModelConfig(
    vocab_size=96, hidden_size=64, intermediate_size=96, intermediate_size_mlp=160, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
    interleave_moe_layer_step=2, max_position_embeddings=128, attention_chunk_size=8, initializer_range=0.1)


class Digits:
    """Token ids as text, for the engine; no end-of-text ids."""

    eos_id = eot_id = None

    @staticmethod
    def decode(ids) -> str:
        return "".join(f" {i}" for i in ids)


def pattern_text(length: int, seed: int) -> torch.Tensor:
    """A learnable sequence: a repeating phrase of 12 ids, with a random start."""
    phrase = torch.randperm(CONFIG.vocab_size, generator=torch.Generator().manual_seed(0))[:12]
    start = int(torch.randint(0, 12, (1,), generator=torch.Generator().manual_seed(seed)))
    return phrase.repeat(length // 12 + 2)[start:start + length]


def train_phrase_model() -> Transformer:
    """A model trained until it predicts the phrase (about a second)."""
    model = random_model(CONFIG, seed=1)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(60):
        batch = torch.stack([pattern_text(33, seed=step * 8 + row) for row in range(8)])
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()
