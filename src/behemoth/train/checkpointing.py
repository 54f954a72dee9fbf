"""Single-process training checkpoints: a model directory, plus trainer.safetensors (optimizer
moments, MoE selection biases, RNG states), trainer.json (step, tokens seen, loader position,
optimizer hyper-parameters), config.toml and manifest.json (`behemoth.run_checkpoints`).

A run training LoRA adapters writes the merged model as the model directory (so a checkpoint
loads anywhere a model does) and the adapters in `adapter/`; resuming takes the base from the
stage's start again (its identity checked against the adapter's config) and the adapters from
`adapter/`, so the frozen base is restored exactly, never by un-merging.

Assembled in a temporary folder and renamed into place, so a killed run leaves only complete
checkpoints; every file is checked against the manifest before loading, and only safetensors and
JSON are read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from behemoth.checkpoint import AdapterInfo, base_sha256, load_adapter_into, write_adapter_files, write_model_files
from behemoth.durable import fsync_path, fsync_tree, staging_folder
from behemoth.errors import CheckpointError
from behemoth.model import Transformer
from behemoth.model.lora import adapter_modules, merged_state_dict
from behemoth.run_checkpoints import (TRAINER_STATE, TrainerState, checkpoint_name, prune_checkpoints,
                                      remove_checkpoint, verify_checkpoint, write_manifest)
from behemoth.train.config import RunConfig

TRAINER_TENSORS = "trainer.safetensors"
ADAPTER_DIR = "adapter"


def save_checkpoint(root: Path, model: Transformer, optimizer: torch.optim.Optimizer, state: TrainerState,
                    run_config: RunConfig, tokenizer: Any = None, keep: int = 2,
                    adapter: AdapterInfo | None = None) -> Path:
    """Write checkpoint `step-N` under `root` atomically; keep only the newest `keep`. With
    `adapter` (a LoRA run), the model directory holds the merged weights and `adapter/` the adapters."""
    final = root / checkpoint_name(state.step)
    with staging_folder(final) as staging:
        write_model_files(model, staging, state=merged_state_dict(model) if adapter is not None else None)
        if adapter is not None:
            (staging / ADAPTER_DIR).mkdir()
            write_adapter_files(model, staging / ADAPTER_DIR, adapter)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        tensors, optimizer_json = _trainer_tensors(model, optimizer)
        save_file(tensors, str(staging / TRAINER_TENSORS))
        trainer = {"format": 1, "step": state.step, "tokens_seen": state.tokens_seen,
                   "loader": state.loader, "optimizer": optimizer_json}
        (staging / TRAINER_STATE).write_text(json.dumps(trainer, indent=1) + "\n")
        run_config.save(staging / "config.toml")
        write_manifest(staging, state.step)
        fsync_tree(staging)
        if final.exists():  # re-saving the same step (a resumed run's first save): replace it
            remove_checkpoint(final)
        os.rename(staging, final)
        fsync_path(root)
    prune_checkpoints(root, keep)
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


def load_checkpoint(directory: Path, model: Transformer, optimizer: torch.optim.Optimizer) -> TrainerState:
    """Restore model weights (or a LoRA model's adapters), optimizer, selection biases and RNG from
    a verified checkpoint."""
    verify_checkpoint(directory)
    if adapter_modules(model):
        _restore_adapters(directory, model)
    else:
        _restore_weights(directory, model)
    tensors = load_file(str(directory / TRAINER_TENSORS))
    trainer = json.loads((directory / TRAINER_STATE).read_text())
    for i, layer in enumerate(model.model.layers):
        if layer.is_moe:
            layer.feed_forward.selection_bias.copy_(tensors[f"selection_bias.{i}"])
    optimizer.load_state_dict(_optimizer_state(tensors, trainer["optimizer"]))
    torch.set_rng_state(tensors["rng.cpu"])
    if torch.cuda.is_available():
        # by device number: sorted as strings, rng.cuda.10 would come before rng.cuda.2
        cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                           key=lambda k: int(k.rsplit(".", 1)[1]))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    return TrainerState(step=trainer["step"], tokens_seen=trainer["tokens_seen"], loader=trainer["loader"])


def _restore_weights(directory: Path, model: Transformer) -> None:
    from behemoth.checkpoint import load as load_model  # the model directory inside the checkpoint

    saved = load_model(directory, device=model.device, dtype=model.dtype)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(saved.state_dict()[name])


def _restore_adapters(directory: Path, model: Transformer) -> None:
    """The adapters from `adapter/`; the base is the one the model was started from, which must be
    the one they were trained on (its weights are not re-read from the merged model directory)."""
    if not (directory / ADAPTER_DIR).is_dir():
        raise CheckpointError(f"{directory}: holds no {ADAPTER_DIR}/ (written by a run without lora), "
                              "so it cannot resume a run training LoRA adapters")
    load_adapter_into(model, directory / ADAPTER_DIR, expected_base=base_sha256(model))


def _optimizer_state(tensors: dict[str, torch.Tensor], saved: dict) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in saved["param_groups"]]
    return {"state": state, "param_groups": groups}
