"""Quality at equal compute: cpu-small (MoE) against dense-small (same active parameters).

Both train on the same TinyStories text (../shared/data/tinystories/) with the same tokenizer,
shards, seed and settings (`behemoth pretrain`'s: Muon, bfloat16 where native), each for the number of steps that fills the same wall-clock budget
(default 20 minutes) at its own measured speed, then report validation bits per byte and samples.
Steps are calibrated from a short uncontended run of each model, so a busy machine during the
long runs changes how long they take, not the comparison.

    .venv/bin/python bench/moe_vs_dense.py [--minutes 20] [--workdir /tmp/behemoth-bench] [--no-write]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import plot_validation_loss, write_section  # noqa: E402

from behemoth.checkpoint import load  # noqa: E402
from behemoth.data import prepare  # noqa: E402
from behemoth.inference.generate import generate  # noqa: E402
from behemoth.info import human, model_size  # noqa: E402
from behemoth.tokenizer import Tokenizer, train_tokenizer_from_files  # noqa: E402
from behemoth.train.config import load_run_config  # noqa: E402
from behemoth.train.metrics import read_metrics  # noqa: E402
from behemoth.train.trainer import pretrain  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories" / "tinystories_sample.txt"
PRESETS = ("cpu-small", "dense-small")
PROMPTS = ("Once upon a time", "The little dog")
CALIBRATION_STEPS = 12


def settings(preset: str, data: Path, tokenizer: Path, steps: int) -> list[str]:
    return [f"model.preset={preset!r}", f"data.sources=[{str(data)!r}]", f"data.tokenizer={str(tokenizer)!r}",
            f"run.steps={steps}", f"run.eval_every={max(1, steps // 10)}", "run.eval_batches=16",
            f"run.checkpoint_every={steps}", "run.keep_checkpoints=1", "optim.warmup_steps=30"]


def seconds_per_step(preset: str, data: Path, tokenizer: Path, workdir: Path) -> float:
    out = workdir / f"calibrate-{preset}"
    shutil.rmtree(out, ignore_errors=True)
    pretrain(load_run_config(None, settings(preset, data, tokenizer, CALIBRATION_STEPS), stage="pretrain"), out,
             progress=False)
    records = read_metrics(out / "metrics.jsonl")[2:]  # skip warm-up steps
    tokens_per_step = 8 * 256
    return statistics.median(tokens_per_step / r["tokens_per_s"] for r in records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/behemoth-bench/moe-vs-dense"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if not DATA.is_file():
        raise SystemExit(f"{DATA}: missing (the TinyStories sample lives in ../shared/data)")
    args.workdir.mkdir(parents=True, exist_ok=True)

    tokenizer_dir, data_dir = args.workdir / "tokenizer", args.workdir / "data"
    tokenizer = train_tokenizer_from_files([DATA], 8192)
    tokenizer.save_pretrained(tokenizer_dir)
    manifest = prepare([DATA], tokenizer, data_dir, val_fraction=0.05, seed=0)
    train_tokens = manifest.tokens["train"]

    rows, curves, samples = [], {}, {}
    budget = args.minutes * 60
    # Eval every 10% of the run costs about 3% of its time; leave that out of the training budget.
    step_budget = budget * 0.97
    # Calibrate both first, back to back, so only these few minutes need a quiet machine.
    per_steps = {p: seconds_per_step(p, data_dir, tokenizer_dir, args.workdir) for p in PRESETS}
    for preset in PRESETS:
        per_step = per_steps[preset]
        steps = max(1, int(step_budget / per_step))
        out = args.workdir / preset
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        result = pretrain(load_run_config(None, settings(preset, data_dir, tokenizer_dir, steps), stage="pretrain"),
                          out, progress=False)
        wall = time.perf_counter() - started
        size = model_size(load(result.model_dir).config, 256)
        curves[preset] = read_metrics(out / "metrics.jsonl")
        best = min((r for r in curves[preset] if "val_bpb" in r), key=lambda r: r["val_bpb"])
        epochs = steps * 8 * 256 / train_tokens
        rows.append(f"| {preset} | {human(size.total_params)} | {human(size.active_params)} | {per_step:.2f} s | "
                    f"{steps} | {human(steps * 8 * 256)} ({epochs:.1f} epochs) | {wall / 60:.1f} min | "
                    f"{result.val_loss:.4f} | **{result.val_bpb:.4f}** | {best['val_bpb']:.4f} (step {best['step']}) |")
        samples[preset] = _samples(result.model_dir)

    bpb = {p: [r for r in curves[p] if "val_bpb" in r][-1]["val_bpb"] for p in PRESETS}
    verdict = "met" if bpb["cpu-small"] < bpb["dense-small"] else "missed"
    plot = Path(__file__).with_name("moe_vs_dense.png")
    plot_validation_loss({f"{p} (validation)": (records, "o-") for p, records in curves.items()},
                         "Equal wall-clock budget: MoE vs dense", plot)
    body = "\n".join([
        f"TinyStories sample (../shared/data, 794 KB, 5% of stories held out), tokenizer of 8192, "
        f"batch 8 x 256, `behemoth pretrain`'s recipe (Muon; bfloat16 where the CPU has it natively), same "
        f"seed; budget {args.minutes:g} minutes of training each, steps "
        f"calibrated from each model's measured step time. Command: `.venv/bin/python bench/moe_vs_dense.py`.",
        "", "| model | total | active | s/step | steps | tokens | wall-clock | val loss | val bits/byte | best val bits/byte |",
        "|---|---|---|---|---|---|---|---|---|---|", *rows, "",
        f"**Target (MoE lower bits/byte than dense at equal compute): {verdict}** "
        f"(MoE {bpb['cpu-small']:.4f} vs dense {bpb['dense-small']:.4f}, "
        f"ratio {bpb['cpu-small'] / bpb['dense-small']:.3f}).", "",
        f"![validation loss]({plot.name})", "",
        *[line for p in PRESETS for line in (f"Samples from {p} (temperature 0.8, seed 0):", "",
                                             *[f"> {s}" for s in samples[p]], "")],
    ])
    print(body)
    if not args.no_write:
        write_section("Quality at equal compute: MoE vs dense", body)


def _samples(model_dir: Path) -> list[str]:
    model, tokenizer = load(model_dir), Tokenizer.load(model_dir)
    out = []
    for prompt in PROMPTS:
        ids = torch.tensor([[tokenizer.eos_id, *tokenizer.encode(prompt)]])
        new = generate(model, ids, max_new_tokens=48, temperature=0.8, top_k=50, seed=0,
                       stop_token_ids={tokenizer.eos_id})
        out.append((prompt + tokenizer.decode(new[0].tolist())).replace("\n", " "))
    return out


if __name__ == "__main__":
    main()
