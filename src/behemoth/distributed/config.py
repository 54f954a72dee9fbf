"""Parallel settings: the `[parallel]` section of a run configuration (`train.config.RunConfig`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelConfig:
    """How a run launched with torchrun (WORLD_SIZE > 1) spreads over its processes; a
    single-process run ignores it, so a run can be resumed with more or fewer processes."""

    data_parallel: str = "fsdp"  # "fsdp": shard weights, gradients and optimizer state; "ddp": replicate
    expert_parallel: int = 1  # ranks that split the routed experts; divides the processes and the experts
    timeout_s: float = 600.0  # a collective waiting longer (a rank died or hung) stops the job
