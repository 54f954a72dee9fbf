"""Throughput of the pretraining pipeline on this machine: tokenizer training and encoding,
data preparation, and the cpu-small training step (tokens/s and MFU) inside the real training loop.

Tokenizer training, encoding and data preparation are each repeated (median and spread); the
training figures are the median over the steps of one `pretrain` run, its first 3 steps left out
as warm-up. MFU is the loop's own: model FLOPs per second against the float32 matmul peak the
loop measures when it starts (in a fresh cache, so it is this run's measurement).

    .venv/bin/python bench/pipeline_throughput.py [--repeats 5] [--steps 30] [--quick] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import Figure, bench_arguments, finish, start, summary  # noqa: E402

from behemoth.data import prepare  # noqa: E402
from behemoth.tokenizer import train_tokenizer_from_files  # noqa: E402
from behemoth.train.config import load_run_config  # noqa: E402
from behemoth.train.metrics import read_metrics  # noqa: E402
from behemoth.train.trainer import pretrain  # noqa: E402

SECTION = "Pretraining pipeline throughput"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories" / "tinystories_sample.txt"
WARMUP_STEPS = 3


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def tokenizer_figures(work: Path, repeats: int):
    """Repeated tokenizer training, encoding and data preparation: lists of seconds, and what
    each produced (the last tokenizer, token counts)."""
    lines = DATA.read_text().split("\n\n")
    train_s, encode_s, prepare_s = [], [], []
    for repeat in range(repeats):
        seconds, tokenizer = timed(lambda: train_tokenizer_from_files([DATA], 8192))
        train_s.append(seconds)
        seconds, encoded = timed(lambda: tokenizer.encode_batch(lines))
        encode_s.append(seconds)
        seconds, manifest = timed(lambda: prepare([DATA], tokenizer, work / f"data-{repeat}", val_fraction=0.02,
                                                  seed=0))
        prepare_s.append(seconds)
    tokenizer.save_pretrained(work / "tok")
    tokens = sum(len(ids) for ids in encoded)
    prepared = sum(shard.tokens for shard in manifest.shards.values())
    return train_s, encode_s, prepare_s, tokens, prepared


def training_records(work: Path, steps: int, batch: int, seq: int) -> list[dict]:
    """metrics.jsonl records of a `pretrain` run of `steps` steps, warm-up steps dropped."""
    os.environ["BEHEMOTH_CACHE"] = str(work / "cache")  # the loop measures its matmul peak afresh
    run = load_run_config(None, [f"data.sources=[{str(work / 'data-0')!r}]", f"data.tokenizer={str(work / 'tok')!r}",
                                 f"data.batch_size={batch}", f"data.seq_len={seq}",
                                 f"run.steps={steps}", f"run.eval_every={steps}", "run.eval_batches=1",
                                 f"run.checkpoint_every={steps}"])
    pretrain(run, work / "run", progress=False)
    return read_metrics(work / "run" / "metrics.jsonl")[WARMUP_STEPS:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench_arguments(parser, repeats=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.steps, args.batch, args.seq = 1, WARMUP_STEPS + 2, 2, 128
    start(args)
    if not DATA.is_file():
        raise SystemExit(f"{DATA}: missing (the TinyStories sample lives in ../shared/data)")
    work = Path(tempfile.mkdtemp(prefix="behemoth-throughput-"))
    try:
        train_s, encode_s, prepare_s, tokens, prepared = tokenizer_figures(work, args.repeats)
        records = training_records(work, args.steps, args.batch, args.seq)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    chars = len(DATA.read_text())
    step = f"training step, cpu-small, batch {args.batch} x {args.seq}, float32"
    measured = [  # (summary name, table row, values, unit)
        ("tokenizer training", "tokenizer training (byte-level BPE, 8192)",
         [chars / s / 1e6 for s in train_s], "M chars/s"),
        ("tokenizer encoding", "tokenizer encoding (`encode_batch`)", [tokens / s for s in encode_s], "tokens/s"),
        ("data prepare", "data prepare (read, split, encode, write shards + manifest)",
         [prepared / s for s in prepare_s], "tokens/s"),
        ("training loop tokens/s", step, [r["tokens_per_s"] for r in records], "tokens/s"),
        ("training loop MFU", f"{step}: MFU against the matmul peak measured at the loop's start",
         [r["mfu"] for r in records], "%"),
    ]
    rows = ["| stage | median | spread | runs |", "|---|---|---|---|"]
    figures = []
    for name, row, values, unit in measured:
        median, spread = summary(values)
        figures.append(Figure(name, median, unit, spread, runs=len(values)))
        rows.append(f"| {row} | {figures[-1].shown()} | {spread:.0%} | {len(values)} |")
    body = "\n".join([
        f"TinyStories sample ({len(DATA.read_bytes()) / 1e6:.2f} MB, {tokens:,} tokens with a vocabulary of 8192), "
        f"{torch.get_num_threads()} torch thread(s). Tokenizer and data stages: median of {args.repeats} repeats; "
        f"training: median over steps {WARMUP_STEPS + 1}-{args.steps} of one `pretrain` run (AdamW, clipping, "
        f"balance bias updates: the real loop); spread = (max - min) / median. No targets: reported figures. "
        "Command: `.venv/bin/python bench/pipeline_throughput.py`.", "",
        *rows,
    ])
    finish(args, SECTION, body, figures)


if __name__ == "__main__":
    main()
