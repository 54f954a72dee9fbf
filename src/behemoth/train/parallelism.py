"""What the training loop asks of its processes, through `behemoth.distributed`; one process
answers trivially. Under torchrun, `join` holds ranks other than 0 until rank 0 has done the
stage's setup (tokenizer, token shards), which they then repeat and find in place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from behemoth.checkpoint import empty_model
from behemoth.checkpoint import save as save_model
from behemoth.distributed import step as collectives
from behemoth.distributed.mesh import DistributedError, ParallelMesh, build_mesh, init_from_env, local_device
from behemoth.errors import ConfigError
from behemoth.model import Transformer
from behemoth.run_checkpoints import TrainerState, last_checkpoint
from behemoth.train.checkpointing import load_checkpoint
from behemoth.train.config import RunConfig
from behemoth.train.optim import build_optimizer


def join(run: RunConfig) -> None:
    """Join the process group under torchrun; ranks other than 0 wait here until rank 0 reaches the
    training loop (`Parallelism.start`)."""
    if not init_from_env(run.parallel, local_device(run.run.device)) or dist.get_rank() == 0:
        return
    try:
        dist.barrier()
    except RuntimeError as err:
        if not _is_collective_failure(err):
            raise
        raise DistributedError(
            f"rank {dist.get_rank()}: rank 0 did not finish the run's setup (tokenizer, data preparation) "
            f"within parallel.timeout_s = {run.parallel.timeout_s:g} s, or it failed (its message says why); "
            "prepare large data beforehand with `behemoth data prepare`, or raise parallel.timeout_s") from None


def process_share() -> tuple[int, int]:
    """(this process's rank, the number of processes): (0, 1) outside torchrun."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value` (picklable), in rank order, on every rank; [value] for one process."""
    if not dist.is_initialized():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def whole_model(model: Transformer, into: Transformer | None = None) -> Transformer:
    """The model with all its weights in one plain module on this rank, to run forwards with no
    collective inside (generation, whose number of forwards differs between ranks): one
    all-gather on every rank at once; `into` is an earlier copy to refill. One process: the model."""
    if not dist.is_initialized():
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    copy = into if into is not None else empty_model(model.config, model.dtype, model.device)
    copy.load_state_dict(weights)
    return copy


class Parallelism:
    """The loop's view of the job: one process (`mesh` None) or a mesh of them."""

    def __init__(self, mesh: ParallelMesh | None, run: RunConfig):
        self.mesh = mesh
        self.run = run

    @classmethod
    def start(cls, run: RunConfig, model: Transformer) -> Parallelism:
        """Called once at the start of the training loop, on every rank."""
        if not dist.is_initialized():
            return cls(None, run)
        if dist.get_rank() == 0:
            dist.barrier()  # rank 0's setup is done: release the ranks waiting in join()
        mesh = build_mesh(run.parallel, model.device, model.config.num_local_experts)
        if run.data.batch_size % mesh.world_size:
            raise ConfigError(f"data.batch_size = {run.data.batch_size} must be a multiple of the number of "
                              f"processes ({mesh.world_size}): each takes an equal share of every batch")
        return cls(mesh, run)

    @property
    def is_main(self) -> bool:
        return self.mesh is None or self.mesh.is_main

    @property
    def world_size(self) -> int:
        return 1 if self.mesh is None else self.mesh.world_size

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    def prepare(self, model: Transformer, checkpoint: Path | None
                ) -> tuple[Transformer, torch.optim.Optimizer, TrainerState | None]:
        """(model laid out over the mesh, its optimizer, the restored state if `checkpoint`)."""
        from behemoth.distributed.checkpoint import is_sharded_checkpoint, load_sharded_checkpoint
        from behemoth.distributed.parallelize import parallelize

        model.train()
        sharded = checkpoint is not None and is_sharded_checkpoint(checkpoint)
        state, whole_state = None, None
        if self.mesh is not None:
            if checkpoint is not None and not sharded:
                # A single-process checkpoint resumed by several processes: every rank loads it whole,
                # then shards the model and hands the whole optimizer state to the sharded optimizer.
                from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

                whole_optimizer = build_optimizer(model, self.run.optim)
                state = load_checkpoint(checkpoint, model, whole_optimizer)
                whole_state = get_optimizer_state_dict(model, whole_optimizer)
                del whole_optimizer
            parallelize(model, self.mesh, self.run.parallel)
        optimizer = build_optimizer(model, self.run.optim)
        if whole_state is not None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(model, optimizer, whole_state, options=options)
        elif checkpoint is not None:
            state = (load_sharded_checkpoint if sharded else load_checkpoint)(checkpoint, model, optimizer)
        return model, optimizer, state

    def shard(self, batch: Any) -> Any:
        """This rank's share of a global batch."""
        return batch if self.mesh is None else collectives.shard_batch(batch, self.mesh.rank, self.mesh.world_size)

    def gradient_sync(self, model: Transformer, enabled: bool) -> None:
        """Accumulating micro-batches: reduce gradients over ranks only after the last one."""
        if self.mesh is not None:
            model.set_requires_gradient_sync(enabled)  # an FSDPModule (also under DDP's replicate)

    def all_reduce(self, values: list[float]) -> list[float]:
        """Sums over ranks (identity for one process)."""
        if self.mesh is None:
            return values
        return collectives.all_reduce_sum(values, self.mesh.device).tolist()

    def loss_share(self, weight: float) -> float:
        """world * (this rank's loss units / the global batch's): the factor that turns the mean
        over ranks of their scaled losses into the mean over the whole batch."""
        total = self.all_reduce([float(weight)])[0]
        return self.world_size * weight / total if total > 0 else 1.0

    def clip_grad_norm(self, model: Transformer, max_norm: float) -> float:
        if self.mesh is None:
            return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
        return collectives.clip_grad_norm_(model.parameters(), max_norm, self.mesh.device)

    def evaluate(self, objective: Any, model: Transformer) -> dict[str, float]:
        """The objective's validation; with several processes every rank runs it on the whole
        validation set (each forward needs all ranks) and gets the same numbers."""
        from torch.distributed.fsdp import FSDPModule

        results = objective.evaluate(model)
        # FSDP's root and DDP's replicas keep their weights gathered after a forward without a
        # backward: reshard, so parameters, optimizer and checkpoints see sharded tensors again.
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
        return results

    def save_checkpoint(self, root: Path, model: Transformer, optimizer: torch.optim.Optimizer, state: TrainerState,
                        tokenizer: Any, keep: int) -> Path:
        """A DCP checkpoint written by every rank (one process saves with train.checkpointing)."""
        from behemoth.distributed.checkpoint import save_sharded_checkpoint

        return save_sharded_checkpoint(root, model, optimizer, state, self.run.save, tokenizer, keep=keep)

    def save_model(self, model: Transformer, path: Path, tokenizer: Any) -> Path:
        """The final model directory: weights gathered to rank 0, which writes it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from behemoth.distributed.checkpoint import run_on_main

        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

        def write() -> Path:
            whole = empty_model(model.config, model.dtype)
            whole.load_state_dict(weights)
            return save_model(whole.eval(), path, tokenizer=tokenizer)

        run_on_main(write)
        return path

    @contextlib.contextmanager
    def failures(self, checkpoints: Path) -> Iterator[None]:
        """A collective that fails (a rank died, hung past parallel.timeout_s, or the network broke)
        becomes one line naming this rank and where to resume from, instead of a traceback."""
        try:
            yield
        except RuntimeError as err:
            if self.mesh is None or not _is_collective_failure(err):
                raise
            where = last_checkpoint(checkpoints, "--resume continues from {}")
            first_line = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            raise DistributedError(
                f"rank {self.mesh.rank} of {self.mesh.world_size}: lost contact with the other processes "
                f"(one died, hung longer than parallel.timeout_s = {self.run.parallel.timeout_s:g} s, or the "
                f"network failed): {first_line}; {where}") from None


def _is_collective_failure(err: RuntimeError) -> bool:
    if isinstance(err, dist.DistError):
        return True
    text = str(err)
    return any(word in text for word in ("gloo", "NCCL", "Connection reset", "Connection closed", "Timed out"))
