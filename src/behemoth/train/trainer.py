"""Pretraining, top to bottom: tokenizer -> token shards -> model -> steps -> checkpoints.

    out/
      tokenizer/            trained here unless data.tokenizer names one
      data/                 token shards + manifest (unless a source is already a prepared dir)
      metrics.jsonl         one line per optimizer step (+ validation lines)
      config.toml           the resolved run configuration
      checkpoints/step-N/   resumable checkpoints (model directory + trainer state + manifest)
      model/                the final model directory (Hugging Face layout, with tokenizer)

One loop serves every objective; later stages (distillation, SFT, DPO) reuse it with another loss.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from behemoth.checkpoint import save as save_model
from behemoth.errors import BehemothError, ConfigError
from behemoth.info import model_size
from behemoth.model import RouterOutput, Transformer, init_weights
from behemoth.train.checkpointing import (TrainerState, list_checkpoints, load_checkpoint, save_checkpoint)
from behemoth.train.config import RunConfig
from behemoth.train.metrics import MetricsLog, Progress, measure_matmul_peak
from behemoth.train.objectives import (expert_load, next_token_loss, router_z_loss, switch_balance_loss,
                                       update_selection_bias)
from behemoth.train.optim import build_optimizer, learning_rate


class TrainingError(BehemothError):
    """The run cannot continue (e.g. the loss diverged)."""


@dataclass
class TrainResult:
    out_dir: Path
    model_dir: Path
    steps: int
    final_loss: float
    val_loss: float | None
    val_bpb: float | None


def pretrain(run: RunConfig, out_dir: Path, resume: bool = False, progress: bool | None = None) -> TrainResult:
    """Train a model as `run` describes, writing everything under `out_dir`."""
    from behemoth.train.data_setup import prepare_run_data  # tokenizer + shards (heavier imports)

    out_dir = Path(out_dir)
    checkpoints = out_dir / "checkpoints"
    existing = list_checkpoints(checkpoints)
    if existing and not resume:
        raise ConfigError(f"{out_dir}: already holds checkpoints; pass --resume to continue, or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    run.save(out_dir / "config.toml")

    device = _device(run.run.device)
    torch.manual_seed(run.run.seed)
    tokenizer, data_dir, loaders = prepare_run_data(run, out_dir)
    train_loader, make_val_loader, bytes_per_token = loaders

    model_config = run.model_config(tokenizer)
    model = Transformer(model_config)
    init_weights(model, seed=run.run.seed)
    model.to(device).train()
    optimizer = build_optimizer(model, run.optim)

    start_step, tokens_seen = 0, 0
    if resume and existing:
        state = load_checkpoint(existing[-1], model, optimizer)
        train_loader.load_state_dict(state.loader)
        start_step, tokens_seen = state.step, state.tokens_seen
    metrics = MetricsLog(out_dir / "metrics.jsonl", resume_step=start_step if resume else None)
    forward = torch.compile(model) if run.run.compile else model

    size = model_size(model_config, run.data.seq_len)
    peak = measure_matmul_peak(device=device)
    tokens_per_step = run.data.batch_size * run.data.seq_len * run.optim.grad_accum
    total = run.run.steps
    bar = Progress(total, start_step, enabled=progress)
    loss_value, val = math.nan, (None, None)
    for step in range(start_step, total):
        started = time.perf_counter()
        lr = learning_rate(step, total, run.optim)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_value, loads, extras = _optimizer_step(forward, model, optimizer, train_loader, run, device)
        if not math.isfinite(loss_value):
            raise TrainingError(f"step {step + 1}: loss is {loss_value}; last good checkpoint kept in {checkpoints}")
        if run.balance.bias_update_rate > 0 and loads:
            update_selection_bias(model, loads, run.balance.bias_update_rate)
        elapsed = time.perf_counter() - started
        tokens_seen += tokens_per_step
        done = step + 1
        record = {"step": done, "loss": loss_value, "lr": lr, "grad_norm": extras.pop("grad_norm"),
                  "tokens_per_s": tokens_per_step / elapsed,
                  "mfu": 3 * size.flops_per_token * tokens_per_step / elapsed / peak,
                  "tokens_seen": tokens_seen, **extras,
                  "expert_load": [[round(x, 4) for x in load.tolist()] for load in loads]}
        if done % run.run.eval_every == 0 or done == total:
            val = evaluate(model, make_val_loader(), bytes_per_token, run.run.eval_batches, device)
            record.update(val_loss=val[0], val_bpb=val[1])
            bar.note(f"step {done}: val loss {val[0]:.4f}, {val[1]:.4f} bits/byte")
        metrics.write(record)
        bar.update(done, total, f"loss {loss_value:.3f} lr {lr:.2e} {record['tokens_per_s']:.0f} tok/s")
        if done % run.run.checkpoint_every == 0 or done == total:
            save_checkpoint(checkpoints, model, optimizer,
                            TrainerState(step=done, tokens_seen=tokens_seen, loader=train_loader.state_dict()),
                            run, tokenizer, keep=run.run.keep_checkpoints)
    bar.close()
    model_dir = save_model(model.eval(), out_dir / "model", tokenizer=tokenizer)
    return TrainResult(out_dir, model_dir, total, loss_value, val[0], val[1])


def _optimizer_step(forward, model: Transformer, optimizer: torch.optim.Optimizer, loader, run: RunConfig,
                    device: torch.device) -> tuple[float, list[torch.Tensor], dict]:
    """One optimizer step over `grad_accum` micro-batches; returns loss, expert loads, extras."""
    accum = run.optim.grad_accum
    num_experts = model.config.num_local_experts
    loss_sum, aux_sum, z_sum = 0.0, 0.0, 0.0
    loads: list[torch.Tensor] = []
    optimizer.zero_grad(set_to_none=True)
    for _ in range(accum):
        inputs, targets = (t.to(device) for t in loader.next_batch())
        routers: list[RouterOutput] = []
        with _autocast(run.run.dtype, device):
            logits = forward(inputs, router_outputs=routers)
        loss = next_token_loss(logits, targets)
        total = loss
        if routers and run.balance.aux_loss_coef > 0:
            aux = sum(switch_balance_loss(r, num_experts) for r in routers) / len(routers)
            total = total + run.balance.aux_loss_coef * aux
            aux_sum += aux.item()
        if routers and run.balance.z_loss_coef > 0:
            z = sum(router_z_loss(r) for r in routers) / len(routers)
            total = total + run.balance.z_loss_coef * z
            z_sum += z.item()
        (total / accum).backward()
        loss_sum += loss.item()
        micro_loads = [expert_load(r, num_experts) for r in routers]
        loads = micro_loads if not loads else [a + b for a, b in zip(loads, micro_loads, strict=True)]
    clip = run.optim.grad_clip if run.optim.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
    optimizer.step()
    extras = {"grad_norm": grad_norm}
    if run.balance.aux_loss_coef > 0:
        extras["balance_loss"] = aux_sum / accum
    if run.balance.z_loss_coef > 0:
        extras["z_loss"] = z_sum / accum
    return loss_sum / accum, [load / accum for load in loads], extras


@torch.no_grad()
def evaluate(model: Transformer, batches, bytes_per_token: torch.Tensor, max_batches: int,
             device: torch.device) -> tuple[float, float]:
    """Mean validation loss (nats/token) and bits per UTF-8 byte, in eval mode (as released)."""
    was_training = model.training
    model.eval()
    nats, tokens, text_bytes = 0.0, 0, 0
    for i, (inputs, targets) in enumerate(batches):
        if i >= max_batches:
            break
        inputs, targets = inputs.to(device), targets.to(device)
        logits = model(inputs)
        losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
        nats += losses.sum().item()
        tokens += targets.numel()
        text_bytes += int(bytes_per_token.to(device)[targets].sum().item())
    model.train(was_training)
    if tokens == 0:
        raise ConfigError("the validation split holds no complete sequence; lower data.seq_len or add data")
    return nats / tokens, nats / math.log(2) / max(text_bytes, 1)


def _autocast(dtype: str, device: torch.device):
    if dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
