"""The process group and device mesh of a run launched by torchrun (WORLD_SIZE > 1; any other
process never touches torch.distributed).

Mesh: world = dp_mod_ep x ep ranks. Every rank is a data-parallel replica, and every parameter
outside the routed experts is sharded over all of them ("dp", flattened). The routed experts are
split over "ep" (borrowing data-parallel ranks, as torchtitan does) and sharded further over
"dp_mod_ep"; with expert_parallel = 1, "ep" has size 1 and changes nothing.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from behemoth.distributed.config import ParallelConfig
from behemoth.errors import BehemothError, ConfigError

if TYPE_CHECKING:  # the device mesh pulls in DTensor, slow to import; single-process runs skip it
    from torch.distributed.device_mesh import DeviceMesh


class DistributedError(BehemothError):
    """Another rank failed, vanished or stopped answering: the job cannot continue."""


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun set it; 1 when not launched by torchrun."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def local_device(name: str) -> torch.device:
    """The device this process trains on: under torchrun, "auto" and "cuda" mean cuda:LOCAL_RANK."""
    cuda = torch.cuda.is_available()
    if name == "auto":
        name = "cuda" if cuda else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and launched_world_size() > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes shared files."""
    return not dist.is_initialized() or dist.get_rank() == 0


def init_from_env(config: ParallelConfig, device: torch.device) -> bool:
    """Join the process group (once) when launched with more than one process; True if distributed.
    `config.timeout_s` bounds every collective: a rank that dies or hangs makes the others fail."""
    if launched_world_size() <= 1:
        return False
    if dist.is_initialized():
        return True
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ConfigError(f"WORLD_SIZE is set but {name} is not: launch distributed runs with torchrun")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # gloo beside NCCL: small CPU-side collectives (barriers, flags) work on either device.
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=config.timeout_s))
    atexit.register(close)
    return True


@dataclass
class ParallelMesh:
    """Who this process is and the meshes its parameters live on."""

    rank: int
    world_size: int
    device: torch.device
    expert_parallel: int
    mesh: DeviceMesh  # 2D: ("dp_mod_ep", "ep")
    dp: DeviceMesh  # 1D over every rank: data parallelism, sharding of non-expert parameters

    @property
    def ep(self) -> DeviceMesh:
        """The ranks that split the routed experts between them."""
        return self.mesh["ep"]

    @property
    def dp_mod_ep(self) -> DeviceMesh:
        """The ranks that hold the same experts: expert weights are sharded over these."""
        return self.mesh["dp_mod_ep"]

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def build_mesh(config: ParallelConfig, device: torch.device, num_experts: int) -> ParallelMesh:
    """The mesh for `config` over the initialised process group; checks the degrees fit."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    ep = config.expert_parallel
    if world % ep:
        raise ConfigError(f"parallel.expert_parallel = {ep} must divide the number of processes ({world})")
    if ep > 1 and num_experts % ep:
        raise ConfigError(f"parallel.expert_parallel = {ep} must divide the routed experts ({num_experts})")
    mesh = init_device_mesh(device.type, (world // ep, ep), mesh_dim_names=("dp_mod_ep", "ep"))
    dp = mesh["dp_mod_ep", "ep"]._flatten("dp")
    return ParallelMesh(dist.get_rank(), world, device, ep, mesh, dp)


def close() -> None:
    """Leave the process group (at the end of a distributed run)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_if_distributed(code: int) -> None:
    """End a process that joined a process group with `code`, without finalizing the interpreter
    (else return): gloo's threads free a collective's tensors a moment after it completes, and
    during finalization they cannot take the GIL to do so (about one run in a hundred aborted).
    Every file is written by now, so leave the group, flush and exit."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    close()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
