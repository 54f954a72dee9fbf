"""Does bf16 autocast train as well as float32? Loss curves of cpu-small, two seeds each.

`run.dtype = "bfloat16"` trains under bf16 autocast (matrix products in bfloat16, weights, optimizer
state and the loss in float32). Before it could become a default, it has to match float32 within
the noise of training itself. This script measures both: cpu-small on the TinyStories sample
(../shared/data), the same tokenizer, shards, steps and settings, seeds 0 and 1 in each
precision, run one after another. It reports the final and best validation bits per byte of every
run, training tokens/s, and a verdict: "within noise" when the two precisions' mean final bits per
byte differ by no more than the larger of the two seed-to-seed differences; otherwise which
precision is worse and by how much. The validation loss curves go to bf16_vs_f32.png.

    .venv/bin/python bench/bf16_vs_f32.py [--steps 300] [--seeds 0 1] [--workdir DIR] [--no-write]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import plot_validation_loss, write_section  # noqa: E402

from behemoth.data import prepare  # noqa: E402
from behemoth.tokenizer import train_tokenizer_from_files  # noqa: E402
from behemoth.train.config import load_run_config  # noqa: E402
from behemoth.train.metrics import read_metrics  # noqa: E402
from behemoth.train.trainer import pretrain  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories" / "tinystories_sample.txt"
DTYPES = ("float32", "bfloat16")
SECTION = "Training precision: bf16 autocast vs float32"


def settings(dtype: str, seed: int, data: Path, tokenizer: Path, steps: int) -> list[str]:
    return ['model.preset="cpu-small"', f"data.sources=[{str(data)!r}]", f"data.tokenizer={str(tokenizer)!r}",
            f"run.steps={steps}", f"run.eval_every={max(1, steps // 10)}", "run.eval_batches=16",
            f"run.checkpoint_every={steps}", "run.keep_checkpoints=1", "optim.warmup_steps=30",
            f"run.dtype={dtype!r}", f"run.seed={seed}"]


def verdict(final: dict[str, list[float]]) -> str:
    """Compare the precisions' mean final bits/byte with the seed-to-seed spread of each."""
    means = {dtype: statistics.mean(values) for dtype, values in final.items()}
    noise = max(max(values) - min(values) for values in final.values())
    difference = means["bfloat16"] - means["float32"]
    if abs(difference) <= noise:
        return (f"within noise: bf16 minus float32 is {difference:+.4f} bits/byte, the largest "
                f"seed-to-seed difference {noise:.4f}")
    worse = "bfloat16" if difference > 0 else "float32"
    return (f"{worse} worse by {abs(difference):.4f} bits/byte, more than the largest seed-to-seed "
            f"difference ({noise:.4f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/behemoth-bench/bf16-vs-f32"))
    parser.add_argument("--no-write", action="store_true", help="print the section, leave RESULTS.md alone")
    args = parser.parse_args()
    if not DATA.is_file():
        raise SystemExit(f"{DATA}: missing (the TinyStories sample lives in ../shared/data)")
    if len(args.seeds) < 2:
        raise SystemExit("--seeds: give at least two, the noise the verdict compares against")
    args.workdir.mkdir(parents=True, exist_ok=True)

    tokenizer_dir, data_dir = args.workdir / "tokenizer", args.workdir / "data"
    tokenizer = train_tokenizer_from_files([DATA], 8192)
    tokenizer.save_pretrained(tokenizer_dir)
    prepare([DATA], tokenizer, data_dir, val_fraction=0.05, seed=0)

    rows, curves = [], {}
    final: dict[str, list[float]] = {dtype: [] for dtype in DTYPES}
    speed: dict[str, list[float]] = {dtype: [] for dtype in DTYPES}
    for seed in args.seeds:  # seed-major, so a slow spell of the machine hits both precisions
        for dtype in DTYPES:
            out = args.workdir / f"{dtype}-seed{seed}"
            shutil.rmtree(out, ignore_errors=True)
            print(f"training {dtype}, seed {seed}, {args.steps} steps", flush=True)
            result = pretrain(load_run_config(None, settings(dtype, seed, data_dir, tokenizer_dir, args.steps)),
                              out, progress=False)
            records = read_metrics(out / "metrics.jsonl")
            curves[(dtype, seed)] = records
            tokens_per_s = statistics.median(r["tokens_per_s"] for r in records[2:] if "tokens_per_s" in r)
            best = min((r for r in records if "val_bpb" in r), key=lambda r: r["val_bpb"])
            final[dtype].append(result.val_bpb)
            speed[dtype].append(tokens_per_s)
            rows.append(f"| {dtype} | {seed} | {tokens_per_s:,.0f} | {result.val_loss:.4f} | "
                        f"**{result.val_bpb:.4f}** | {best['val_bpb']:.4f} (step {best['step']}) |")

    speedup = statistics.median(speed["bfloat16"]) / statistics.median(speed["float32"])
    plot = Path(__file__).with_name("bf16_vs_f32.png")
    styles = {"float32": "o-", "bfloat16": "s--"}
    lines = {f"{dtype}, seed {seed}": (records, styles[dtype]) for (dtype, seed), records in curves.items()}
    plot_validation_loss(lines, "cpu-small: bf16 autocast vs float32", plot)
    body = "\n".join([
        f"`cpu-small` on the TinyStories sample (../shared/data, 5% of stories held out), tokenizer of "
        f"8192, batch 8 x 256, {args.steps} steps, seeds {', '.join(map(str, args.seeds))} in each precision, "
        f"run one after another (seed by seed). bfloat16 = `run.dtype = \"bfloat16\"`: autocast, with "
        f"weights, AdamW state and the loss in float32. Command: `.venv/bin/python bench/bf16_vs_f32.py`.",
        "", "| precision | seed | training tokens/s | final val loss | final val bits/byte | best val bits/byte |",
        "|---|---|---|---|---|---|", *rows, "",
        f"**Verdict: {verdict(final)}.** Training speed bf16 / float32: {speedup:.2f}x (medians of the "
        f"runs' step speeds).", "",
        f"![validation loss]({plot.name})",
    ])
    print(body)
    if not args.no_write:
        write_section(SECTION, body)


if __name__ == "__main__":
    main()
