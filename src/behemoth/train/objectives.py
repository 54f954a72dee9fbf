"""Training objectives: next-token loss and MoE balance terms (BalanceConfig): the auxiliary-loss-
free expert bias (default, DeepSeek-V3: no gradient, never a gate value), the switch-style
balance loss num_experts * sum_e(token share_e * mean router prob_e), and the router z-loss
mean(logsumexp(logits)^2), which keeps router logits small.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from behemoth.model import RouterOutput, Transformer


def wide(logits: torch.Tensor) -> torch.Tensor:
    """Logits in float32 at least, for losses: bfloat16 (autocast) is widened, float64 kept."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(wide(logits.flatten(0, 1)), targets.flatten())


def expert_load(router: RouterOutput, num_experts: int) -> torch.Tensor:
    """Fraction of routed token slots each expert received, [num_experts]."""
    counts = torch.bincount(router.expert_ids.flatten(), minlength=num_experts).float()
    return counts / counts.sum().clamp(min=1)


def switch_balance_loss(router: RouterOutput, num_experts: int) -> torch.Tensor:
    probs = router.logits.softmax(dim=-1).mean(dim=0)
    return num_experts * (expert_load(router, num_experts).detach() * probs).sum()


def router_z_loss(router: RouterOutput) -> torch.Tensor:
    return router.logits.logsumexp(dim=-1).pow(2).mean()


@torch.no_grad()
def update_selection_bias(model: Transformer, loads: list[torch.Tensor], rate: float) -> None:
    """Nudge each MoE layer's selection bias toward equal load: overloaded experts' down, the others'
    up, by `rate`. `loads`: one [num_experts] vector per MoE layer, summed over micro-batches and
    ranks, so every replica moves identically."""
    moe_layers = [layer.feed_forward for layer in model.model.layers if layer.is_moe]
    for moe, load in zip(moe_layers, loads, strict=True):
        moe.selection_bias += rate * torch.sign(load.mean() - load)
