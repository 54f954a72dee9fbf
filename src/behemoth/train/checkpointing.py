"""Single-process training checkpoints: a model directory, plus trainer.safetensors (optimizer
moments, MoE selection biases, RNG states), trainer.json (step, tokens seen, loader position,
optimizer hyper-parameters), config.toml and manifest.json (`behemoth.run_checkpoints`).

A LoRA run writes the merged model as the model directory (so a checkpoint loads anywhere a model
does) and the adapters in `adapter/`; a resume takes the base from the stage's start again and the
adapters from `adapter/`, so the frozen base is restored exactly, never by un-merging. Assembled in
a temporary folder and renamed into place; verified against the manifest before loading.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from behemoth.checkpoint import write_model_files
from behemoth.durable import fsync_path, fsync_tree, staging_folder
from behemoth.errors import CheckpointError
from behemoth.lora_files import AdapterInfo, base_sha256, load_adapter_into, write_adapter_files
from behemoth.model import Transformer
from behemoth.model.lora import adapter_modules, merged_state_dict
from behemoth.run_checkpoints import (TRAINER_STATE, TrainerState, checkpoint_name, prune_checkpoints,
                                      read_trainer_state, remove_checkpoint, saved_param_groups, trainer_json,
                                      verify_checkpoint, write_manifest)
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
        tensors, groups = _trainer_tensors(model, optimizer)
        save_file(tensors, str(staging / TRAINER_TENSORS))
        (staging / TRAINER_STATE).write_text(trainer_json(state, groups, format=1))
        run_config.save(staging / "config.toml")
        write_manifest(staging, state.step)
        fsync_tree(staging)
        if final.exists():  # re-saving the same step (a resumed run's first save): replace it
            remove_checkpoint(final)
        os.rename(staging, final)
        fsync_path(root)
    prune_checkpoints(root, keep)
    return final


def _trainer_tensors(model: Transformer, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor],
                                                                                     list[dict]]:
    """Optimizer moments, selection biases and RNG states as named tensors; the param groups apart."""
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
    return tensors, optim_state["param_groups"]


def load_checkpoint(directory: Path, model: Transformer, optimizer: torch.optim.Optimizer) -> TrainerState:
    """Restore model weights (or a LoRA model's adapters), optimizer, selection biases and RNG from
    a verified checkpoint."""
    verify_checkpoint(directory)
    if adapter_modules(model):
        # The base is the one the model was started from, which must be the one the adapters were
        # trained on (its weights are not re-read from the merged model directory).
        if not (directory / ADAPTER_DIR).is_dir():
            raise CheckpointError(f"{directory}: holds no {ADAPTER_DIR}/ (written by a run without lora), "
                                  "so it cannot resume a run training LoRA adapters")
        load_adapter_into(model, directory / ADAPTER_DIR, expected_base=base_sha256(model))
    else:
        from behemoth.checkpoint import load as load_model  # the model directory inside the checkpoint

        saved = load_model(directory, device=model.device, dtype=model.dtype).state_dict()
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                tensor.copy_(saved[name])
    tensors = load_file(str(directory / TRAINER_TENSORS))
    trainer = json.loads((directory / TRAINER_STATE).read_text())
    for i, layer in enumerate(model.model.layers):
        if layer.is_moe:
            layer.feed_forward.selection_bias.copy_(tensors[f"selection_bias.{i}"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": saved_param_groups(trainer)})
    torch.set_rng_state(tensors["rng.cpu"])
    if torch.cuda.is_available():
        # by device number: sorted as strings, rng.cuda.10 would come before rng.cuda.2
        cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                           key=lambda k: int(k.rsplit(".", 1)[1]))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    return read_trainer_state(trainer)
