"""AdamW with the usual exemptions, and learning-rate schedules as pure functions of the step:
nothing to save, so a run resumed at step N has exactly the rate it would have had.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from behemoth.train.config import OptimConfig


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms, embeddings and biases (decaying them only hurts)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or "embed_tokens" in name or name.endswith("norm.weight")
        (no_decay if exempt else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False: the same arithmetic on every backend, so resumed runs are bit-identical.
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
                             foreach=False)


def learning_rate(step: int, total_steps: int, config: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine or WSD."""
    peak, floor = config.lr, config.lr * config.min_lr_ratio
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    if config.schedule == "wsd":
        decay_steps = max(1, round(total_steps * config.decay_fraction))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return peak
        progress = min(1.0, (step - decay_start + 1) / decay_steps)
        return peak - (peak - floor) * progress
    span = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
