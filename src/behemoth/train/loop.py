"""The one training loop. Pretraining, distillation, SFT, RL and DPO differ only in their Objective.

    out/
      metrics.jsonl         one line per optimizer step (+ validation numbers every eval_every)
      config.toml           the resolved run configuration
      checkpoints/step-N/   resumable checkpoints (model directory + trainer state + manifest)
      model/                the final model directory (Hugging Face layout, with tokenizer)
      adapter/              with lora.rank > 0: the LoRA adapters alone (model/ is then base + adapters merged)

The loop owns what the stages share (schedule, accumulation, clipping, MoE balance, metrics,
checkpoints, exact resume); an objective owns its data and its loss.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from behemoth.checkpoint import WRITE_ERRORS, write_failure
from behemoth.checkpoint import save as save_model
from behemoth.distributed.mesh import is_main_process
from behemoth.errors import BehemothError, ConfigError
from behemoth.hardware import detect_cpu
from behemoth.info import model_size
from behemoth.lora_files import AdapterInfo, base_sha256, save_adapter
from behemoth.model import RouterOutput, Transformer
from behemoth.model.int8 import quantize_frozen_base
from behemoth.model.lora import LoraCoverage, apply_lora, merged_state_dict
from behemoth.run_checkpoints import TrainerState, last_checkpoint, list_checkpoints
from behemoth.train.checkpointing import save_checkpoint
from behemoth.train.checks import generation_check
from behemoth.train.config import RunConfig
from behemoth.train.metrics import MetricsLog, Progress, machine_matmul_peak, read_metrics
from behemoth.train.objectives import router_z_loss, switch_balance_loss, update_selection_bias
from behemoth.train.optim import lr_factor
from behemoth.train.parallelism import Parallelism, join, process_share


class TrainingError(BehemothError):
    """The run cannot continue (e.g. the loss diverged)."""


class Objective(Protocol):
    """What a training stage trains for. `loader`: a resumable batch source (next_batch, state_dict,
    load_state_dict). Optional: `loss_weight(batch) -> float`, the units (tokens, pairs) a
    micro-batch's loss averages over, so that with several processes each rank's loss counts by its
    share of the global batch (without it, ranks count equally)."""

    loader: Any

    def start_step(self, step: int) -> None: ...  # before each optimizer step (0-based), also on resume

    def loss(self, model: Any, batch: Any, routers: list[RouterOutput]) -> tuple[torch.Tensor, dict[str, float], int]:
        """(loss, scalar metrics, tokens processed) for one micro-batch; `model` may be compiled."""
        ...

    def evaluate(self, model: Transformer) -> dict[str, float]: ...  # validation metrics, in eval mode


@dataclass
class TrainResult:
    out_dir: Path
    model_dir: Path
    steps: int
    final_loss: float
    validation: dict[str, float]
    adapter_dir: Path | None = None  # a LoRA run's adapters (model_dir holds them merged)

    @property
    def val_loss(self) -> float | None:
        return self.validation.get("val_loss")

    @property
    def val_bpb(self) -> float | None:
        return self.validation.get("val_bpb")


def start_run(out_dir: Path, run: RunConfig, resume: bool) -> list[Path]:
    """Create the run folder (refusing to overwrite a run unless resuming); returns its checkpoints.
    Under torchrun, joins the processes: rank 0 goes first through the stage's setup."""
    existing = list_checkpoints(out_dir / "checkpoints")
    if existing and not resume:
        raise ConfigError(f"{out_dir}: already holds checkpoints; pass --resume to continue, or choose another --out")
    join(run)
    if is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
        run.save(out_dir / "config.toml")
    return existing


def train_loop(run: RunConfig, out_dir: Path, model: Transformer, tokenizer: Any, objective: Objective,
               resume: bool = False, progress: bool | None = None, base_model: str = "") -> TrainResult:
    """Train `model` for run.run.steps optimizer steps of `objective`; resumable at any checkpoint.
    With lora.rank > 0 only LoRA adapters train (`base_model`: where the frozen base came from).
    Under torchrun every rank runs this on its share of the same batches; rank 0 alone reports."""
    run = resolve_dtype(run, model.device)
    adapters = attach_adapters(run, model, base_model)  # before the optimizer: it sees the adapters only
    parallel = Parallelism.start(run, model)
    with parallel.failures(Path(out_dir) / "checkpoints"):
        return _train_loop(run, Path(out_dir), model, tokenizer, objective, resume, progress, parallel, adapters)


@dataclass
class Adapters:
    """A LoRA run's adapters: what they cover (the start line) and their config (every save)."""

    coverage: LoraCoverage
    info: AdapterInfo


def attach_adapters(run: RunConfig, model: Transformer, base_model: str) -> Adapters | None:
    """Freeze `model` and give it the [lora] adapters; None when lora.rank is 0 (all weights train)."""
    lora = run.lora
    if lora.rank == 0:
        return None
    if process_share()[1] > 1:
        raise ConfigError("lora.rank > 0 with several processes is not supported yet (expert parallelism and "
                          "FSDP do not carry the adapters); run LoRA in one process")
    base = base_sha256(model)
    coverage = apply_lora(model, lora, seed=run.run.seed)
    info = AdapterInfo(lora.rank, lora.alpha, lora.use_rslora, lora.dropout, list(lora.targets),
                       coverage.sites, base_model, base, lora.base_weights)
    return Adapters(coverage, info)


def _hold_base(run: RunConfig, model: Transformer) -> str | None:
    """With lora.base_weights = "int8", the frozen base as int8 from here on (after a resume has
    checked the adapters against the float base it was started from); the note that says so."""
    if run.lora.base_weights != "int8":
        return None
    before, after = quantize_frozen_base(model)
    return (f"lora: the frozen base's projections and experts held as int8, {before / 2**20:,.1f} MiB -> "
            f"{after / 2**20:,.1f} MiB (model/ will be the dequantised base + adapters)")


def frozen_copy(run: RunConfig, model: Transformer) -> Transformer:
    """A frozen copy of `model` as training starts, for a reference policy; with lora.base_weights =
    "int8" held as int8 too, since that is what the policy computes before its first update."""
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    if run.lora.base_weights == "int8":
        quantize_frozen_base(reference)
    return reference


def resolve_dtype(run: RunConfig, device: torch.device) -> RunConfig:
    """run.dtype "auto" made concrete: bfloat16 autocast where the device computes it natively (a
    CUDA GPU with bfloat16, a CPU with AVX-512 BF16 or AMX: 1.35x faster training at equal loss here,
    bench/RESULTS.md), float32 elsewhere (emulated bfloat16 is slower than float32)."""
    if run.run.dtype != "auto":
        return run
    cuda = device.type == "cuda"
    native = torch.cuda.is_bf16_supported() if cuda else device.type == "cpu" and cpu_has_native_bf16()
    return replace(run, run=replace(run.run, dtype="bfloat16" if native else "float32"))


def cpu_has_native_bf16() -> bool:
    return detect_cpu().native_bf16


def _train_loop(run: RunConfig, out_dir: Path, model: Transformer, tokenizer: Any, objective: Objective,
                resume: bool, progress: bool | None, parallel: Parallelism,
                adapters: Adapters | None = None) -> TrainResult:
    checkpoints = out_dir / "checkpoints"
    existing = list_checkpoints(checkpoints)
    device = model.device
    model, optimizer, state = parallel.prepare(model, existing[-1] if resume and existing else None)
    base_note = _hold_base(run, model) if adapters is not None else None
    first_step, tokens_seen = 0, 0
    if state is not None:
        objective.loader.load_state_dict(state.loader)
        first_step, tokens_seen = state.step, state.tokens_seen
    forward = torch.compile(model) if run.run.compile else model

    flops_per_token = 3 * model_size(model.config, run.data.seq_len).flops_per_token
    total = run.run.steps
    if parallel.is_main:
        metrics = MetricsLog(out_dir / "metrics.jsonl", resume_step=first_step if resume else None)
        bar = Progress(total, first_step, enabled=progress)
        compute_dtype = {"bfloat16": torch.bfloat16, "float64": torch.float64}.get(run.run.dtype, torch.float32)
        peak = machine_matmul_peak(device, compute_dtype) * parallel.world_size  # MFU of the whole job
    else:
        metrics, bar, peak = _Silent(), _Silent(), math.inf
    if adapters is not None:
        bar.note(adapters.coverage.line())
    if base_note:
        bar.note(base_note)
    if state is not None:
        bar.note(f"resuming from step {first_step} of {total} (checkpoint {existing[-1]})")
    bar.note(f"computing in {run.run.dtype} on {device.type}" + (" (run.dtype = float32 to change)"
                                                                 if run.run.dtype == "bfloat16" else ""))
    if run.run.dtype == "bfloat16" and device.type == "cpu" and not detect_cpu().native_bf16:
        bar.note("note: run.dtype = bfloat16 on a CPU without native bfloat16 (no AVX-512 BF16 or AMX): "
                 "each product converts to float32 and back, slower than run.dtype = float32 here")
    check = generation_check(run, tokenizer, parallel.distributed)
    loss_value, validation = math.nan, {}
    bad_steps = BadSteps(run.run.max_bad_steps)
    for step in range(first_step, total):
        started = time.perf_counter()
        factor = lr_factor(step, total, run.optim)
        for group in optimizer.param_groups:  # (a checkpoint from before groups had peaks: optim.lr)
            group["lr"] = group.get("peak_lr", run.optim.lr) * factor
        lr = run.optim.lr * factor
        objective.start_step(step)
        loss_value, loads, logged, tokens = _optimizer_step(forward, model, optimizer, objective, run, parallel)
        skipped = bad_steps.check(step, loss_value, logged["grad_norm"], checkpoints)
        if run.balance.bias_update_rate > 0 and loads and not skipped:
            update_selection_bias(model, loads, run.balance.bias_update_rate)
        elapsed = time.perf_counter() - started
        tokens_seen += tokens
        done = step + 1
        record = {"step": done, "loss": loss_value, "lr": lr, **logged, "skipped": int(skipped),
                  "tokens_per_s": tokens / elapsed,
                  "mfu": flops_per_token * tokens / elapsed / peak, "tokens_seen": tokens_seen,
                  "expert_load": [[round(x, 4) for x in load.tolist()] for load in loads]}
        if "rollout_s" in logged:  # RL: the step's time went to generating (rollout_s), then to learning
            record["update_tokens_per_s"] = tokens / max(elapsed - logged["rollout_s"], 1e-9)
        if done % run.run.eval_every == 0 or done == total:
            validation = parallel.evaluate(objective, model)
            if check is not None:
                validation.update(check(model))
            model.train()
            record.update(validation)
            bar.note(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in validation.items()))
        metrics.write(record)
        bar.update(done, total, f"loss {loss_value:.3f} lr {lr:.2e} {record['tokens_per_s']:.0f} tok/s")
        if done % run.run.checkpoint_every == 0 or done == total:
            trainer_state = TrainerState(step=done, tokens_seen=tokens_seen, loader=objective.loader.state_dict())
            with _disk_errors(f"checkpoint of step {done}", checkpoints):
                if parallel.distributed:  # every rank writes its shards
                    parallel.save_checkpoint(checkpoints, model, optimizer, trainer_state, tokenizer,
                                             keep=run.run.keep_checkpoints)
                else:
                    save_checkpoint(checkpoints, model, optimizer, trainer_state, run, tokenizer,
                                    keep=run.run.keep_checkpoints, adapter=adapters.info if adapters else None)
    bar.close()
    if first_step >= total and (out_dir / "metrics.jsonl").is_file():
        # A finished run resumed: nothing left to train, so report the numbers it ended with.
        last = read_metrics(out_dir / "metrics.jsonl")[-1]
        loss_value = last["loss"]
        validation = {k: v for k, v in last.items() if k.startswith("val_")}
    adapter_dir = None
    with _disk_errors("final model", checkpoints):
        if parallel.distributed:  # weights gathered to rank 0, which writes the directory
            model_dir = parallel.save_model(model, out_dir / "model", tokenizer=tokenizer)
        else:  # with adapters: the merged model, loadable everywhere, and the adapters beside it
            model_dir = save_model(model.eval(), out_dir / "model", tokenizer=tokenizer,
                                   state=merged_state_dict(model) if adapters else None)
            if adapters is not None:
                adapter_dir = save_adapter(model, out_dir / "adapter", adapters.info)
    return TrainResult(out_dir, model_dir, total, loss_value, validation, adapter_dir)


@contextlib.contextmanager
def _disk_errors(what: str, checkpoints: Path) -> Iterator[None]:
    """A full disk (or any write error) while saving: one line, not a traceback. The savers write
    into a temporary folder and rename it, so what was saved before is still whole."""
    try:
        yield
    except WRITE_ERRORS as err:
        reason = write_failure(err)
        if reason is None:
            raise
        where = last_checkpoint(checkpoints, "last complete checkpoint: {}")
        raise TrainingError(f"cannot write the {what} under {checkpoints.parent} ({reason}); {where}") from None


@dataclass
class BadSteps:
    """Steps whose loss or gradient norm is NaN or Inf: skipped (weights and optimizer untouched), and
    `limit` of them in a row stop the run (one bad batch is survivable; many mean divergence)."""

    limit: int
    in_row: int = 0

    def check(self, step: int, loss: float, grad_norm: float, checkpoints: Path) -> bool:
        """True when step `step` (0-based) was bad and so skipped; raise at the limit."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_row = 0
            return False
        self.in_row += 1
        if self.in_row >= self.limit:
            where = last_checkpoint(checkpoints, "last good checkpoint kept: {}")
            raise TrainingError(f"step {step + 1}: loss {loss}, gradient norm {grad_norm}; {self.in_row} bad steps "
                                f"in a row (run.max_bad_steps = {self.limit}), stopping; {where}")
        return True


def _optimizer_step(forward, model: Transformer, optimizer: torch.optim.Optimizer, objective: Objective,
                    run: RunConfig, parallel: Parallelism) -> tuple[float, list[torch.Tensor], dict[str, float], int]:
    """One optimizer step over `grad_accum` micro-batches: loss, expert loads, logged values, tokens;
    with several processes, global numbers (the same on every rank)."""
    accum = run.optim.grad_accum
    num_experts = model.config.num_local_experts
    totals: dict[str, float] = {}
    loss_sum, tokens = 0.0, 0
    counts: list[torch.Tensor] = []
    optimizer.zero_grad(set_to_none=True)
    for micro in range(accum):
        routers = RouterLog()
        parallel.gradient_sync(model, micro == accum - 1)
        with autocast(run.run.dtype, model.device):
            batch = parallel.shard(objective.loader.next_batch())
            loss, logged, batch_tokens = objective.loss(forward, batch, routers)
        if parallel.distributed and hasattr(objective, "loss_weight"):
            loss = loss * parallel.loss_share(objective.loss_weight(batch))
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
        micro_counts = [torch.bincount(r.expert_ids.flatten(), minlength=num_experts).double() for r in routers]
        counts = micro_counts if not counts else [a + b for a, b in zip(counts, micro_counts, strict=True)]
    loss_sum, tokens, totals, counts = _global_numbers(parallel, loss_sum, tokens, totals, counts)
    # Load = share of the step's routed slots: from counts summed over micro-batches and ranks, so
    # every rank moves its expert biases identically.
    loads = [c / c.sum().clamp(min=1) for c in counts]
    clip = run.optim.grad_clip if run.optim.grad_clip > 0 else math.inf
    totals["grad_norm"] = parallel.clip_grad_norm(model, clip)
    if math.isfinite(loss_sum) and math.isfinite(totals["grad_norm"]):  # else BadSteps skips this step
        optimizer.step()
    return loss_sum / accum, [load.float() for load in loads], totals, tokens


class RouterLog:
    """Where MoE layers append their RouterOutput (the model only calls `append`); iterates like a
    list. Not a list on purpose: FSDP's hooks rebuild the lists, tuples, dicts and dataclasses they
    find in a layer's arguments as new objects, so appends to a list would land in a copy."""

    def __init__(self) -> None:
        self._items: list[RouterOutput] = []

    def append(self, item: RouterOutput) -> None:
        self._items.append(item)

    def __iter__(self) -> Iterator[RouterOutput]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


def _global_numbers(parallel: Parallelism, loss_sum: float, tokens: int, totals: dict[str, float],
                    counts: list[torch.Tensor]) -> tuple[float, int, dict[str, float], list[torch.Tensor]]:
    """Loss and logged values averaged over ranks, tokens and expert counts summed (one all-reduce)."""
    if parallel.world_size == 1:
        return loss_sum, tokens, totals, counts
    keys = sorted(totals)
    flat = [loss_sum, float(tokens), *(totals[k] for k in keys), *(x for c in counts for x in c.tolist())]
    summed = parallel.all_reduce(flat)
    world = parallel.world_size
    width = len(counts[0]) if counts else 0
    start = 2 + len(keys)
    reduced = [torch.tensor(summed[start + i * width:start + (i + 1) * width], dtype=torch.float64,
                            device=counts[i].device) for i in range(len(counts))]
    return summed[0] / world, int(summed[1]), {k: summed[2 + i] / world for i, k in enumerate(keys)}, reduced


class _Silent:
    """Metrics and progress on ranks other than 0, which say nothing."""

    def write(self, record: dict) -> None: ...
    def update(self, *args: Any) -> None: ...
    def note(self, text: str) -> None: ...
    def close(self) -> None: ...


def autocast(dtype: str, device: torch.device):
    """bf16 autocast when asked for; float32 otherwise."""
    if dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def parameter_dtype(run: RunConfig) -> torch.dtype:
    """float64 when asked, else float32 (bfloat16 autocast also keeps float32 weights)."""
    return torch.float64 if run.run.dtype == "float64" else torch.float32


def device_of(model) -> torch.device:
    """The device of a model or of the model inside a torch.compile wrapper."""
    return next(model.parameters()).device
