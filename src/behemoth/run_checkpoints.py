"""What every training checkpoint folder (`checkpoints/step-000100/`) shares, whether one process
wrote it (`train/checkpointing.py`) or many (`distributed/checkpoint.py`): `trainer.json`,
config.toml and `manifest.json`, and a `step-N` name only once complete (renamed into place).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from behemoth.errors import CheckpointError
from behemoth.hashing import sha256_file

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer.json"
PREFIX = "step-"


@dataclass
class TrainerState:
    step: int  # optimizer steps completed
    tokens_seen: int
    loader: dict[str, Any]


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def trainer_json(state: TrainerState, param_groups: list[dict], **head: Any) -> str:
    """trainer.json's text: `head` (its format), `state` and the optimizer's param groups."""
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()}
              for group in param_groups]
    trainer = {**head, "step": state.step, "tokens_seen": state.tokens_seen, "loader": state.loader,
               "optimizer": {"param_groups": groups}}
    return json.dumps(trainer, indent=1) + "\n"


def read_trainer_state(trainer: dict) -> TrainerState:
    return TrainerState(step=trainer["step"], tokens_seen=trainer["tokens_seen"], loader=trainer["loader"])


def saved_param_groups(trainer: dict) -> list[dict]:
    """The optimizer's param groups as trainer.json holds them, with betas a tuple again."""
    return [{k: (tuple(v) if k == "betas" else v) for k, v in group.items()}
            for group in trainer["optimizer"]["param_groups"]]


def write_manifest(directory: Path, step: int) -> None:
    """SHA-256 and size of every file, subfolders included (a distributed checkpoint keeps its
    shards in `dcp/`), named by their path relative to `directory`."""
    files = {p.relative_to(directory).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in sorted(directory.rglob("*")) if p.is_file()}
    (directory / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1) + "\n")


def remove_checkpoint(directory: Path) -> None:
    """Rename aside, then delete: a kill mid-delete leaves a hidden .step-*.tmp folder (cleaned up by
    the next save), never a step-N folder with files missing."""
    aside = directory.with_name(f".{directory.name}.{os.getpid()}.old.tmp")
    os.rename(directory, aside)
    shutil.rmtree(aside, ignore_errors=True)


def prune_checkpoints(root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints under `root`; remove temporary folders of killed saves."""
    for old in list_checkpoints(root)[:-keep]:
        remove_checkpoint(old)
    for leftover in root.glob(f".{PREFIX}*.tmp"):  # from a run killed mid-save
        shutil.rmtree(leftover, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def last_checkpoint(root: Path, found: str) -> str:
    """`found` formatted with the newest complete checkpoint under `root`, for error messages."""
    kept = list_checkpoints(root)
    return found.format(kept[-1]) if kept else "no checkpoint was written yet"


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
