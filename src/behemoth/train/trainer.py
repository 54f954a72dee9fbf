"""Pretraining: tokenizer -> token shards -> a freshly initialised model -> the training loop.

    out/tokenizer/   trained here unless data.tokenizer names one
    out/data/        token shards + manifest (unless a source is already a prepared data dir)
    (and everything train.loop writes: metrics.jsonl, checkpoints/, model/)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from behemoth.distributed.mesh import local_device
from behemoth.errors import ConfigError
from behemoth.model import RouterOutput, Transformer, init_weights
from behemoth.train.config import RunConfig
from behemoth.train.loop import (TrainingError, TrainResult, device_of, parameter_dtype, start_run,
                                 train_loop)
from behemoth.train.objectives import next_token_loss, wide

__all__ = ["pretrain", "LanguageModeling", "evaluate_lm", "TrainResult", "TrainingError"]


class LanguageModeling:
    """Next-token prediction on packed token windows; validation loss and bits per byte."""

    def __init__(self, loader, val_batches: Callable[[], Iterator], bytes_per_token: torch.Tensor, eval_batches: int):
        self.loader = loader
        self.val_batches = val_batches
        self.bytes_per_token = bytes_per_token
        self.eval_batches = eval_batches

    def start_step(self, step: int) -> None:
        pass

    def loss(self, model, batch, routers: list[RouterOutput]) -> tuple[torch.Tensor, dict[str, float], int]:
        device = device_of(model)
        inputs, targets = (t.to(device) for t in batch)
        loss = next_token_loss(model(inputs, router_outputs=routers), targets)
        return loss, {}, targets.numel()

    def evaluate(self, model: Transformer) -> dict[str, float]:
        loss, bpb = evaluate_lm(model, self.val_batches(), self.bytes_per_token, self.eval_batches)
        return {"val_loss": loss, "val_bpb": bpb}


def pretrain(run: RunConfig, out_dir: Path, resume: bool = False, progress: bool | None = None) -> TrainResult:
    """Train a model as `run` describes, from random initialisation, writing under `out_dir`."""
    from behemoth.train.data_setup import prepare_run_data  # tokenizer + shards (heavier imports)

    if run.lora.rank:
        raise ConfigError(f"lora.rank = {run.lora.rank}: pretraining trains every weight of a fresh model; "
                          "LoRA adapters are for sft, dpo, rl and distill")
    out_dir = Path(out_dir)
    start_run(out_dir, run, resume)
    torch.manual_seed(run.run.seed)
    tokenizer, _, (train_loader, val_batches, bytes_per_token) = prepare_run_data(run, out_dir)
    objective = LanguageModeling(train_loader, val_batches, bytes_per_token, run.run.eval_batches)
    return train_loop(run, out_dir, fresh_model(run, tokenizer), tokenizer, objective, resume=resume,
                      progress=progress)


def fresh_model(run: RunConfig, tokenizer: Any) -> Transformer:
    """A model of run.model initialised from run.seed, on the run's device in its parameter dtype."""
    model = Transformer(run.model_config(tokenizer))
    init_weights(model, seed=run.run.seed, zero_outputs=run.run.zero_init_outputs)
    return model.to(local_device(run.run.device), parameter_dtype(run))


@torch.no_grad()
def evaluate_lm(model: Transformer, batches, bytes_per_token: torch.Tensor, max_batches: int) -> tuple[float, float]:
    """Mean loss (nats/token) and bits per UTF-8 byte over up to `max_batches`, in eval mode."""
    model.eval()
    device = model.device
    nats, tokens, text_bytes = 0.0, 0, 0
    for i, (inputs, targets) in enumerate(batches):
        if i >= max_batches:
            break
        inputs, targets = inputs.to(device), targets.to(device)
        losses = F.cross_entropy(wide(model(inputs).flatten(0, 1)), targets.flatten(), reduction="none")
        nats += losses.sum().item()
        tokens += targets.numel()
        text_bytes += int(bytes_per_token.to(device)[targets].sum().item())
    if tokens == 0:
        raise TrainingError("the validation split holds no complete sequence; lower data.seq_len or add data")
    return nats / tokens, nats / math.log(2) / max(text_bytes, 1)
