"""Distributed checkpoints with torch.distributed.checkpoint (DCP), and their consolidation.

A `step-N` folder holds the model's config and tokenizer files (no weights), `dcp/` (weights,
optimizer moments, expert biases, as each rank's shards: N processes' checkpoint loads into M or
into one), `rng.<rank>.safetensors`, and trainer.json, config.toml and manifest.json. All ranks
write into `.step-N.dcp.tmp`; rank 0 adds the small files, fsyncs and renames it into place.

DCP's `.metadata` is a pickle: `SafeFileSystemReader` admits only DCP's metadata classes,
torch.Size, dtypes and paths, and refuses non-tensor entries (which DCP would load with
weights_only=False), after the manifest's SHA-256 check. A crafted checkpoint runs no code.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from behemoth.checkpoint import write_config_files
from behemoth.config import ModelConfig
from behemoth.distributed.mesh import DistributedError
from behemoth.durable import fsync_path, fsync_tree
from behemoth.errors import CheckpointError
from behemoth.model import Transformer
from behemoth.run_checkpoints import (TRAINER_STATE, TrainerState, checkpoint_name, prune_checkpoints,
                                      read_trainer_state, saved_param_groups, trainer_json, verify_checkpoint,
                                      write_manifest)

SHARDS = "dcp"
FORMAT = "dcp"
T = TypeVar("T")


def is_sharded_checkpoint(directory: Path) -> bool:
    """True for a checkpoint written by a distributed run (DCP shards), False for a single-process one."""
    return (directory / SHARDS).is_dir()


def save_sharded_checkpoint(root: Path, model: Transformer, optimizer: torch.optim.Optimizer, state: TrainerState,
                            save_config: Callable[[Path], None], tokenizer: Any = None, keep: int = 2) -> Path:
    """Write checkpoint `step-N` under `root` from every rank (a collective); keep the newest `keep`.
    `save_config(path)` writes config.toml."""
    rank, world = dist.get_rank(), dist.get_world_size()
    final = root / checkpoint_name(state.step)
    # One name every rank can compute: no need to broadcast a random temporary name.
    staging = root / f".{final.name}.{FORMAT}.tmp"
    run_on_main(lambda: _fresh_directory(staging))
    tensors, optim = _state_tensors(model, optimizer)
    groups = [{k: v for k, v in group.items() if k != "params"} for group in optim["param_groups"]]
    dcp.save(tensors, storage_writer=FileSystemWriter(staging / SHARDS))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(staging / f"rng.{rank}.safetensors"))
    dist.barrier()

    def finish() -> None:
        write_config_files(model.config, model.dtype, staging)  # what `consolidate` needs beside the shards
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        (staging / TRAINER_STATE).write_text(trainer_json(state, groups, format=FORMAT, world_size=world))
        save_config(staging / "config.toml")
        write_manifest(staging, state.step)
        fsync_tree(staging)
        if final.exists():  # re-saving the same step (a resumed run's first save): replace it
            shutil.rmtree(final)
        staging.rename(final)
        fsync_path(root)
        prune_checkpoints(root, keep)

    try:
        run_on_main(finish)
    except BaseException:
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _fresh_directory(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)  # left by a job killed while saving this step
    path.mkdir(parents=True)


def _state_tensors(model: Transformer, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict]:
    """(the tensors DCP saves and loads, the optimizer state dict they come from)."""
    optim = get_optimizer_state_dict(model, optimizer)
    return {"model": get_model_state_dict(model), "optimizer": optim["state"], "selection_bias": _biases(model)}, optim


def _biases(model: Transformer) -> dict[str, torch.Tensor]:
    """The aux-loss-free selection biases (identical on every rank), by layer index."""
    return {str(i): layer.feed_forward.selection_bias for i, layer in enumerate(model.model.layers) if layer.is_moe}


def load_sharded_checkpoint(directory: Path, model: Transformer, optimizer: torch.optim.Optimizer) -> TrainerState:
    """Restore weights, optimizer, expert biases (and RNG, when the world size is unchanged) into
    `model`, laid out over any number of processes or none. Collective when distributed."""
    distributed = dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    run_on_main(lambda: verify_checkpoint(directory))
    trainer = _read_trainer_state(directory)
    # The optimizer template first: initialising its state steps the optimizer with zero
    # gradients, which must not touch weights loaded afterwards.
    tensors, optim = _state_tensors(model, optimizer)
    with _single_process_quiet():
        dcp.load(tensors, storage_reader=SafeFileSystemReader(directory / SHARDS), no_dist=not distributed)
    set_model_state_dict(model, tensors["model"])
    groups = [{**group, **saved} for group, saved in zip(optim["param_groups"], saved_param_groups(trainer),
                                                         strict=True)]
    set_optimizer_state_dict(model, optimizer, {"state": tensors["optimizer"], "param_groups": groups})
    with torch.no_grad():
        for name, bias in _biases(model).items():
            bias.copy_(tensors["selection_bias"][name])
    # Each rank's RNG as saved, when the job has as many ranks as the saver (training draws no
    # random numbers after init anyway).
    rng = directory / f"rng.{rank}.safetensors"
    if trainer.get("world_size") == world and rng.is_file():
        saved = load_file(str(rng))
        torch.set_rng_state(saved["cpu"])
        if "cuda" in saved and torch.cuda.is_available():
            torch.cuda.set_rng_state(saved["cuda"])
    return read_trainer_state(trainer)


def _read_trainer_state(directory: Path) -> dict:
    try:
        trainer = json.loads((directory / TRAINER_STATE).read_text())
        if trainer.get("format") != FORMAT:
            raise KeyError("format")
        return trainer
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{directory / TRAINER_STATE}: not a distributed trainer state ({err})") from None


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns each time it loads without a process group; here that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def run_on_main(work: Callable[[], T]) -> T | None:
    """Run `work` on rank 0 while the others wait; every rank raises if it failed (no rank is left
    waiting in a collective for one that gave up). Without a process group, just run it."""
    if not dist.is_initialized():
        return work()
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = work()
        except Exception as err:  # re-raised below, after telling the other ranks
            error = err
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int32)
    dist.broadcast(flag, src=0)
    if error is not None:
        raise error
    if flag.item():
        raise DistributedError(f"rank {dist.get_rank()}: stopping because rank 0 failed (its message says why)")
    return result


# -- reading DCP metadata without unpickling arbitrary objects ------------------------------------

_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                 "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
     ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata: its own classes, torch.Size, dtypes and paths; anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with a restricted unpickler for `.metadata` and tensor entries only.
    `read_metadata` does what FileSystemReader's does (torch 2.13) but for the unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as stream:
                metadata = _MetadataUnpickler(stream).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: not valid checkpoint metadata ({err})") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: not valid checkpoint metadata (holds {type(metadata).__name__})")
        for key, entry in metadata.state_dict_metadata.items():
            if isinstance(entry, BytesStorageMetadata):  # DCP would torch.load it with weights_only=False
                raise CheckpointError(f"{path}: entry {key!r} is not a tensor; only tensors are loaded")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# -- consolidation: a distributed checkpoint -> a Hugging Face model directory --------------------

def consolidate(checkpoint: Path, out_dir: Path, dtype: torch.dtype | None = None) -> Path:
    """Write a distributed checkpoint's weights (and tokenizer, if any) as a model directory, from
    one process holding the whole model in CPU memory: no communication, so rank 0 may call it alone."""
    from behemoth.checkpoint import DTYPES, empty_model
    from behemoth.checkpoint import save as save_model
    from behemoth.tokenizer import Tokenizer

    checkpoint = Path(checkpoint)
    if not is_sharded_checkpoint(checkpoint):
        raise CheckpointError(f"{checkpoint}: not a distributed checkpoint (no {SHARDS}/ folder)")
    verify_checkpoint(checkpoint)
    config = ModelConfig.load(checkpoint / "config.json")
    trained_in = json.loads((checkpoint / "config.json").read_text()).get("dtype", "float32")
    model = empty_model(config, DTYPES.get(trained_in, torch.float32))  # the shards' own dtype
    weights = model.state_dict()
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)  # the same tensor as the embedding
    with _single_process_quiet():
        dcp.load({"model": weights}, storage_reader=SafeFileSystemReader(checkpoint / SHARDS), no_dist=True)
    if dtype is not None:
        model.to(dtype)
    tokenizer = Tokenizer.load(checkpoint) if (checkpoint / "tokenizer.json").is_file() else None
    return save_model(model.eval(), out_dir, tokenizer=tokenizer)
