"""Optimizers (AdamW, or Muon for the hidden matrices with AdamW for the rest) and learning-rate
schedules as pure functions of the step (nothing to save: a resumed run has exactly its rate).

Muon follows `torch.optim.Muon` (coefficients, Nesterov momentum, decoupled weight decay,
"original" scaling), which takes 2D parameters only; `newton_schulz` also orthogonalises each
matrix of our expert stacks [E, in, out] in one batched product (tested equal on 2D). Under FSDP2
a stack split only along its expert dimension is orthogonalised where it lies; any other shard is
gathered whole, orthogonalised identically on every rank and sliced again (one all-gather).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.adam import adam as adam_step  # the step function of torch's Adam and AdamW

from behemoth.train.config import OptimConfig

# torch.optim.Muon's quintic Newton-Schulz coefficients (Keller Jordan's), for the same updates
NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)
NS_STEPS = 5


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    """AdamW for every parameter, or (`"muon"`) Muon for the hidden matrices and expert stacks with
    AdamW for embeddings, LM head, norms and router. Each group keeps its peak rate in `peak_lr`;
    no weight decay on norms, embeddings and biases (decaying them only hurts)."""
    decay, no_decay, matrices, stacks = [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or "embed_tokens" in name or name.endswith("norm.weight")
        hidden = not exempt and "lm_head" not in name and ".router." not in name
        if config.name == "muon" and hidden:
            (stacks if param.ndim == 3 else matrices).append(param)
        else:
            (no_decay if exempt else decay).append(param)
    adam = [{"params": decay, "weight_decay": config.weight_decay, "peak_lr": config.lr},
            {"params": no_decay, "weight_decay": 0.0, "peak_lr": config.lr}]
    if config.name == "adamw":
        # foreach=False: the same arithmetic on every backend, so resumed runs are bit-identical.
        return torch.optim.AdamW(adam, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
                                 foreach=False)
    muon = dict(weight_decay=config.weight_decay, peak_lr=config.muon_lr, use_muon=True)
    groups = [*adam, {"params": matrices, **muon, "stacked": False}, {"params": stacks, **muon, "stacked": True}]
    return Muon([g for g in groups if g["params"]], lr=config.lr, betas=(config.beta1, config.beta2),
                eps=config.eps, momentum=config.muon_momentum)


class Muon(torch.optim.Optimizer):
    """Muon on the groups marked `use_muon` (2D weights [out, in], or expert stacks [E, in, out]
    with `stacked`), AdamW (torch's own step function) on the others."""

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float], eps: float, momentum: float,
                 nesterov: bool = True):
        defaults = dict(lr=lr, betas=betas, eps=eps, momentum=momentum, nesterov=nesterov, weight_decay=0.0,
                        use_muon=False, stacked=False)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["use_muon"]:
                for param in params:
                    self._muon_update(param, group)
            elif params:
                self._adamw_update(params, group)

    def _muon_update(self, param: torch.Tensor, group: dict) -> None:
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param)
        buffer, momentum = state["momentum_buffer"], group["momentum"]
        buffer.lerp_(param.grad, 1 - momentum)
        update = param.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
        update = orthogonalise(update, group["stacked"])
        # torch.optim.Muon's "original" scaling, by the matrix's output over input width
        rows, cols = (param.shape[-1], param.shape[-2]) if group["stacked"] else (param.shape[0], param.shape[1])
        param.mul_(1 - group["lr"] * group["weight_decay"])
        param.add_(update.to(param.dtype), alpha=-group["lr"] * math.sqrt(max(1.0, rows / cols)))

    def _adamw_update(self, params: list[torch.Tensor], group: dict) -> None:
        for param in params:
            if not self.state[param]:
                self.state[param].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(param),
                                         exp_avg_sq=torch.zeros_like(param))
        states = [self.state[p] for p in params]
        adam_step(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                  [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states], foreach=False,
                  decoupled_weight_decay=True, amsgrad=False, beta1=group["betas"][0], beta2=group["betas"][1],
                  lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def orthogonalise(update: torch.Tensor, stacked: bool) -> torch.Tensor:
    """`newton_schulz` of a plain tensor or of a DTensor shard (see the module notes)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(update, DTensor):
        return newton_schulz(update)
    whole_matrices = stacked and all(p.is_replicate() or (p.is_shard() and p.dim == 0) for p in update.placements)
    if whole_matrices:
        return DTensor.from_local(newton_schulz(update.to_local()), update.device_mesh, update.placements,
                                  shape=update.shape, stride=update.stride())
    whole = newton_schulz(update.full_tensor())
    return distribute_tensor(whole, update.device_mesh, update.placements, src_data_rank=None)


def newton_schulz(matrix: torch.Tensor, steps: int = NS_STEPS, eps: float = 1e-7) -> torch.Tensor:
    """An approximately orthogonal matrix with the singular vectors of `matrix` [..., m, n] (each of a
    batch on its own), by torch.optim.Muon's quintic iteration in bfloat16; in float64 for float64
    weights (runs compared across layouts, where a gradient summed in another order would round to
    another bfloat16 now and then)."""
    a, b, c = NS_COEFFICIENTS
    x = matrix if matrix.dtype == torch.float64 else matrix.bfloat16()
    tall = matrix.size(-2) > matrix.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm at most 1
    batched = x.ndim == 3
    for _ in range(steps):
        gram = x @ x.mT
        if batched:
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        else:
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def lr_factor(step: int, total_steps: int, config: OptimConfig) -> float:
    """The multiple of each group's peak rate at step `step` (0-based): linear warmup, then cosine or
    WSD down to optim.min_lr_ratio."""
    floor = config.min_lr_ratio
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "wsd":
        decay_steps = max(1, round(total_steps * config.decay_fraction))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / decay_steps)
        return 1.0 - (1.0 - floor) * progress
    span = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return floor + (1.0 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

