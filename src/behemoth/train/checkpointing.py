"""Training checkpoints: the model in our Hugging Face layout, everything else beside it.

    checkpoints/step-000100/
      config.json, generation_config.json, model.safetensors, tokenizer files   (a model directory)
      trainer.safetensors   optimizer moments, MoE selection biases, RNG states
      trainer.json          step, optimizer hyper-parameters, loader position, tokens seen
      config.toml           the resolved run configuration
      manifest.json         SHA-256 and size of every file above

A checkpoint is assembled in a temporary folder, fsynced, and renamed into place, so a run killed
at any moment leaves only complete checkpoints (and perhaps a temporary folder, ignored and
cleaned up). Before anything is loaded, every file is checked against the manifest: a truncated
or altered checkpoint is reported by name and never used. Only safetensors and JSON are read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from behemoth.hashing import sha256_file
from behemoth.checkpoint import write_model_files
from behemoth.durable import fsync_path, fsync_tree
from behemoth.errors import CheckpointError
from behemoth.model import Transformer
from behemoth.train.config import RunConfig

MANIFEST = "manifest.json"
TRAINER_TENSORS = "trainer.safetensors"
TRAINER_STATE = "trainer.json"
PREFIX = "step-"


@dataclass
class TrainerState:
    step: int  # optimizer steps completed
    tokens_seen: int
    loader: dict[str, Any]


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def save_checkpoint(root: Path, model: Transformer, optimizer: torch.optim.Optimizer, state: TrainerState,
                    run_config: RunConfig, tokenizer: Any = None, keep: int = 2) -> Path:
    """Write checkpoint `step-N` under `root` atomically; keep only the newest `keep`."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(state.step)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    try:
        write_model_files(model, staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        tensors, optimizer_json = _trainer_tensors(model, optimizer)
        save_file(tensors, str(staging / TRAINER_TENSORS))
        trainer = {"format": 1, "step": state.step, "tokens_seen": state.tokens_seen,
                   "loader": state.loader, "optimizer": optimizer_json}
        (staging / TRAINER_STATE).write_text(json.dumps(trainer, indent=1) + "\n")
        run_config.save(staging / "config.toml")
        _write_manifest(staging, state.step)
        fsync_tree(staging)
        if final.exists():  # re-saving the same step (a resumed run's first save): replace it
            _remove(final)
        os.rename(staging, final)
        fsync_path(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _prune(root, keep)
    return final


def _trainer_tensors(model: Transformer, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer moments, selection biases and RNG states as named tensors; the rest as JSON."""
    tensors: dict[str, torch.Tensor] = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = rng
    for i, layer in enumerate(model.model.layers):
        if layer.is_moe:
            tensors[f"selection_bias.{i}"] = layer.feed_forward.selection_bias.detach().cpu()
    optim_state = optimizer.state_dict()
    for index, moments in optim_state["state"].items():
        for name, value in moments.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()}
              for group in optim_state["param_groups"]]
    return tensors, {"param_groups": groups}


def _write_manifest(directory: Path, step: int) -> None:
    """SHA-256 and size of every file, subfolders included (a distributed checkpoint keeps its
    shards in `dcp/`), named by their path relative to `directory`."""
    files = {p.relative_to(directory).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in sorted(directory.rglob("*")) if p.is_file()}
    (directory / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1) + "\n")


def _remove(directory: Path) -> None:
    """Rename aside, then delete: a kill mid-delete leaves a hidden .step-*.tmp folder (cleaned up by
    the next save), never a step-N folder with files missing."""
    aside = directory.with_name(f".{directory.name}.{os.getpid()}.old.tmp")
    os.rename(directory, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _prune(root: Path, keep: int) -> None:
    for old in list_checkpoints(root)[:-keep]:
        _remove(old)
    for leftover in root.glob(f".{PREFIX}*.tmp"):  # from a run killed mid-save
        shutil.rmtree(leftover, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def verify_checkpoint(directory: Path) -> dict:
    """Check every file against the manifest; return the manifest or raise naming the bad file."""
    manifest_path = directory / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"{manifest_path}: missing (incomplete checkpoint)") from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{manifest_path}: unreadable ({err})") from None
    for name, facts in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in the manifest but missing")
        if path.stat().st_size != facts["bytes"]:
            raise CheckpointError(f"{path}: size {path.stat().st_size} bytes, manifest says {facts['bytes']} "
                                  "(truncated or altered)")
        if sha256_file(path) != facts["sha256"]:
            raise CheckpointError(f"{path}: SHA-256 differs from the manifest (altered or corrupt)")
    return manifest


def load_checkpoint(directory: Path, model: Transformer, optimizer: torch.optim.Optimizer) -> TrainerState:
    """Restore model weights, optimizer, selection biases and RNG from a verified checkpoint."""
    from behemoth.checkpoint import load as load_model  # the model directory inside the checkpoint

    verify_checkpoint(directory)
    saved = load_model(directory, device=model.device, dtype=model.dtype)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(saved.state_dict()[name])
    tensors = load_file(str(directory / TRAINER_TENSORS))
    trainer = json.loads((directory / TRAINER_STATE).read_text())
    for i, layer in enumerate(model.model.layers):
        if layer.is_moe:
            layer.feed_forward.selection_bias.copy_(tensors[f"selection_bias.{i}"])
    optimizer.load_state_dict(_optimizer_state(tensors, trainer["optimizer"]))
    torch.set_rng_state(tensors["rng.cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    return TrainerState(step=trainer["step"], tokens_seen=trainer["tokens_seen"], loader=trainer["loader"])


def _optimizer_state(tensors: dict[str, torch.Tensor], saved: dict) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in saved["param_groups"]]
    return {"state": state, "param_groups": groups}
