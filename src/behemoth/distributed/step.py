"""What one training step needs from the process group beyond what FSDP does by itself."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from behemoth.errors import ConfigError


def shard_batch(batch: Any, rank: int, world_size: int) -> Any:
    """This rank's rows of a global batch (a tensor, a tuple of tensors, or a list of examples):
    every rank draws the same batch, so loader state is the same everywhere and a checkpoint
    resumes on any number of processes."""
    if isinstance(batch, tuple):
        return tuple(shard_batch(part, rank, world_size) for part in batch)
    rows = len(batch)
    if rows % world_size:
        raise ConfigError(f"a batch of {rows} rows does not split evenly over {world_size} processes; "
                          "make data.batch_size a multiple of the number of processes")
    share = rows // world_size
    return batch[rank * share:(rank + 1) * share]


def all_reduce_sum(values: list[float] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum float64 values over all ranks in one collective (float64: token counts stay exact)."""
    tensor = torch.as_tensor(values, dtype=torch.float64).to(device)
    dist.all_reduce(tensor)
    return tensor.cpu()


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, device: torch.device) -> float:
    """Scale gradients so their global L2 norm is at most `max_norm`; return the norm before. Each
    rank sums the squares of its pieces (a replicated piece weighted to count once), one
    all-reduce adds them up: the stock clip cannot combine parameters on different meshes."""
    from torch.distributed.tensor import DTensor  # imported here: DTensor takes most of a second to import

    grads = [p.grad for p in parameters if p.grad is not None]
    local = torch.zeros((), dtype=torch.float64, device=device)
    for grad in grads:
        local += _local_square_sum(grad)
    dist.all_reduce(local)
    total = math.sqrt(local.item())
    coefficient = max_norm / (total + 1e-6)
    if coefficient < 1.0:
        for grad in grads:
            (grad.to_local() if isinstance(grad, DTensor) else grad).mul_(coefficient)
    return total


def _local_square_sum(grad: torch.Tensor) -> torch.Tensor:
    """This rank's share of sum(grad^2) over the whole job."""
    from torch.distributed.tensor import DTensor

    world = dist.get_world_size()
    if not isinstance(grad, DTensor):  # a whole tensor on every rank
        return grad.double().pow(2).sum() / world
    mesh = grad.device_mesh
    copies = world / mesh.size()  # ranks outside the mesh hold the same pieces
    for dim, placement in enumerate(grad.placements):
        if placement.is_replicate():
            copies *= mesh.size(dim)
    return grad.to_local().double().pow(2).sum() / copies
