"""The one training loop. Pretraining, distillation, SFT and DPO differ only in their Objective.

    out/
      metrics.jsonl         one line per optimizer step (+ validation numbers every eval_every)
      config.toml           the resolved run configuration
      checkpoints/step-N/   resumable checkpoints (model directory + trainer state + manifest)
      model/                the final model directory (Hugging Face layout, with tokenizer)

The loop owns everything the stages share: learning-rate schedule, gradient accumulation and
clipping, MoE balance (selection-bias updates, balance and z-losses), metrics, progress,
checkpoints and exact resume. An objective owns its data and its loss.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from behemoth.checkpoint import save as save_model
from behemoth.errors import BehemothError, ConfigError
from behemoth.info import model_size
from behemoth.model import RouterOutput, Transformer
from behemoth.train.checkpointing import TrainerState, list_checkpoints, load_checkpoint, save_checkpoint
from behemoth.train.config import RunConfig
from behemoth.train.metrics import MetricsLog, Progress, machine_matmul_peak, read_metrics
from behemoth.train.objectives import expert_load, router_z_loss, switch_balance_loss, update_selection_bias
from behemoth.train.optim import build_optimizer, learning_rate


class TrainingError(BehemothError):
    """The run cannot continue (e.g. the loss diverged)."""


class Loader(Protocol):
    """A resumable source of training batches."""

    def next_batch(self) -> Any: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class Objective(Protocol):
    """What a training stage trains for."""

    loader: Loader

    def start_step(self, step: int) -> None:
        """Called before each optimizer step (0-based), also after a resume."""
        ...

    def loss(self, model: Any, batch: Any, routers: list[RouterOutput]) -> tuple[torch.Tensor, dict[str, float], int]:
        """(loss to minimise, scalar metrics to log, tokens processed) for one micro-batch;
        `model` may be a compiled wrapper; MoE layers append to `routers`."""
        ...

    def evaluate(self, model: Transformer) -> dict[str, float]:
        """Validation metrics, computed in eval mode (as the model will be released)."""
        ...


@dataclass
class TrainResult:
    out_dir: Path
    model_dir: Path
    steps: int
    final_loss: float
    validation: dict[str, float]

    @property
    def val_loss(self) -> float | None:
        return self.validation.get("val_loss")

    @property
    def val_bpb(self) -> float | None:
        return self.validation.get("val_bpb")


def start_run(out_dir: Path, run: RunConfig, resume: bool) -> list[Path]:
    """Create the run folder; refuse to overwrite a run unless resuming. Returns its checkpoints."""
    existing = list_checkpoints(out_dir / "checkpoints")
    if existing and not resume:
        raise ConfigError(f"{out_dir}: already holds checkpoints; pass --resume to continue, or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    run.save(out_dir / "config.toml")
    return existing


def train_loop(run: RunConfig, out_dir: Path, model: Transformer, tokenizer: Any, objective: Objective,
               resume: bool = False, progress: bool | None = None) -> TrainResult:
    """Train `model` for run.run.steps optimizer steps of `objective`; resumable at any checkpoint."""
    out_dir = Path(out_dir)
    checkpoints = out_dir / "checkpoints"
    existing = list_checkpoints(checkpoints)
    device = model.device
    model.train()
    optimizer = build_optimizer(model, run.optim)
    first_step, tokens_seen = 0, 0
    if resume and existing:
        state = load_checkpoint(existing[-1], model, optimizer)
        objective.loader.load_state_dict(state.loader)
        first_step, tokens_seen = state.step, state.tokens_seen
    metrics = MetricsLog(out_dir / "metrics.jsonl", resume_step=first_step if resume else None)
    forward = torch.compile(model) if run.run.compile else model

    flops_per_token = 3 * model_size(model.config, run.data.seq_len).flops_per_token
    peak = machine_matmul_peak(device)
    total = run.run.steps
    bar = Progress(total, first_step, enabled=progress)
    loss_value, validation = math.nan, {}
    for step in range(first_step, total):
        started = time.perf_counter()
        lr = learning_rate(step, total, run.optim)
        for group in optimizer.param_groups:
            group["lr"] = lr
        objective.start_step(step)
        loss_value, loads, logged, tokens = _optimizer_step(forward, model, optimizer, objective, run)
        if not math.isfinite(loss_value):
            raise TrainingError(f"step {step + 1}: loss is {loss_value}; last good checkpoint kept in {checkpoints}")
        if run.balance.bias_update_rate > 0 and loads:
            update_selection_bias(model, loads, run.balance.bias_update_rate)
        elapsed = time.perf_counter() - started
        tokens_seen += tokens
        done = step + 1
        record = {"step": done, "loss": loss_value, "lr": lr, **logged, "tokens_per_s": tokens / elapsed,
                  "mfu": flops_per_token * tokens / elapsed / peak, "tokens_seen": tokens_seen,
                  "expert_load": [[round(x, 4) for x in load.tolist()] for load in loads]}
        if done % run.run.eval_every == 0 or done == total:
            validation = objective.evaluate(model)
            model.train()
            record.update(validation)
            bar.note(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in validation.items()))
        metrics.write(record)
        bar.update(done, total, f"loss {loss_value:.3f} lr {lr:.2e} {record['tokens_per_s']:.0f} tok/s")
        if done % run.run.checkpoint_every == 0 or done == total:
            save_checkpoint(checkpoints, model, optimizer,
                            TrainerState(step=done, tokens_seen=tokens_seen, loader=objective.loader.state_dict()),
                            run, tokenizer, keep=run.run.keep_checkpoints)
    bar.close()
    if first_step >= total and (out_dir / "metrics.jsonl").is_file():
        # A finished run resumed: nothing left to train, so report the numbers it ended with.
        last = read_metrics(out_dir / "metrics.jsonl")[-1]
        loss_value = last["loss"]
        validation = {k: v for k, v in last.items() if k.startswith("val_")}
    model_dir = save_model(model.eval(), out_dir / "model", tokenizer=tokenizer)
    return TrainResult(out_dir, model_dir, total, loss_value, validation)


def _optimizer_step(forward, model: Transformer, optimizer: torch.optim.Optimizer, objective: Objective,
                    run: RunConfig) -> tuple[float, list[torch.Tensor], dict[str, float], int]:
    """One optimizer step over `grad_accum` micro-batches: loss, expert loads, logged values, tokens."""
    accum = run.optim.grad_accum
    num_experts = model.config.num_local_experts
    totals: dict[str, float] = {}
    loss_sum, tokens = 0.0, 0
    loads: list[torch.Tensor] = []
    optimizer.zero_grad(set_to_none=True)
    for _ in range(accum):
        routers: list[RouterOutput] = []
        with autocast(run.run.dtype, model.device):
            loss, logged, batch_tokens = objective.loss(forward, objective.loader.next_batch(), routers)
        total = loss
        if routers and run.balance.aux_loss_coef > 0:
            aux = sum(switch_balance_loss(r, num_experts) for r in routers) / len(routers)
            total = total + run.balance.aux_loss_coef * aux
            logged = {**logged, "balance_loss": aux.item()}
        if routers and run.balance.z_loss_coef > 0:
            z = sum(router_z_loss(r) for r in routers) / len(routers)
            total = total + run.balance.z_loss_coef * z
            logged = {**logged, "z_loss": z.item()}
        (total / accum).backward()
        loss_sum += loss.item()
        tokens += batch_tokens
        for key, value in logged.items():
            totals[key] = totals.get(key, 0.0) + value / accum
        micro_loads = [expert_load(r, num_experts) for r in routers]
        loads = micro_loads if not loads else [a + b for a, b in zip(loads, micro_loads, strict=True)]
    clip = run.optim.grad_clip if run.optim.grad_clip > 0 else math.inf
    totals["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
    optimizer.step()
    return loss_sum / accum, [load / accum for load in loads], totals, tokens


def autocast(dtype: str, device: torch.device):
    """bf16 autocast when asked for; float32 otherwise."""
    if dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def device_of(model) -> torch.device:
    """The device of a model or of the model inside a torch.compile wrapper."""
    return next(model.parameters()).device


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
