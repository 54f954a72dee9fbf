"""Throughput of the pretraining pipeline on this machine: tokenizer training and encoding,
data preparation, and the cpu-small training step (tokens/s and MFU).

    .venv/bin/python bench/pipeline_throughput.py [--steps 30] [--no-write]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import write_section  # noqa: E402

from behemoth.data import prepare  # noqa: E402
from behemoth.tokenizer import train_tokenizer_from_files  # noqa: E402
from behemoth.train.config import load_run_config  # noqa: E402
from behemoth.train.metrics import read_metrics  # noqa: E402
from behemoth.train.trainer import pretrain  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories" / "tinystories_sample.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if not DATA.is_file():
        raise SystemExit(f"{DATA}: missing (the TinyStories sample lives in ../shared/data)")
    work = Path(tempfile.mkdtemp(prefix="behemoth-throughput-"))
    try:
        text = DATA.read_text()
        started = time.perf_counter()
        tokenizer = train_tokenizer_from_files([DATA], 8192)
        train_s = time.perf_counter() - started
        tokenizer.save_pretrained(work / "tok")

        lines = text.split("\n\n")
        started = time.perf_counter()
        tokens = sum(len(ids) for ids in tokenizer.encode_batch(lines))
        encode_s = time.perf_counter() - started

        started = time.perf_counter()
        manifest = prepare([DATA], tokenizer, work / "data", val_fraction=0.02, seed=0)
        prepare_s = time.perf_counter() - started
        prepared_tokens = sum(shard.tokens for shard in manifest.shards.values())

        run = load_run_config(None, [f"data.sources=[{str(work / 'data')!r}]", f"data.tokenizer={str(work / 'tok')!r}",
                                     f"run.steps={args.steps}", f"run.eval_every={args.steps}", "run.eval_batches=1",
                                     f"run.checkpoint_every={args.steps}"])
        pretrain(run, work / "run", progress=False)
        records = read_metrics(work / "run" / "metrics.jsonl")[3:]
        rate = statistics.median(r["tokens_per_s"] for r in records)
        mfu = statistics.median(r["mfu"] for r in records)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    body = "\n".join([
        f"TinyStories sample ({len(text.encode()) / 1e6:.2f} MB, {tokens:,} tokens with a vocabulary of 8192). "
        "Command: `.venv/bin/python bench/pipeline_throughput.py`.", "",
        "| stage | throughput |", "|---|---|",
        f"| tokenizer training (byte-level BPE, 8192) | {len(text) / train_s / 1e6:.2f} M chars/s ({train_s:.1f} s) |",
        f"| tokenizer encoding (`encode_batch`) | {tokens / encode_s:,.0f} tokens/s |",
        f"| data prepare (read, split, encode, write shards + manifest) | {prepared_tokens / prepare_s:,.0f} tokens/s |",
        f"| training step, cpu-small, batch 8 x 256, float32 (median of {len(records)} steps) | "
        f"{rate:,.0f} tokens/s, MFU {mfu:.0%} of the measured float32 matmul peak |",
    ])
    print(body)
    if not args.no_write:
        write_section("Pretraining pipeline throughput", body)


if __name__ == "__main__":
    main()
