"""Distillation against training from scratch, at equal student training tokens.

The student (`cpu-mini`) trains on TinyStories text (../shared/data/tinystories/) twice with the
same tokenizer, shards, seed, steps and settings: once distilled from a `cpu-small` teacher, once
from scratch. Validation bits per byte of both, side by side.

The teacher defaults to the `cpu-small` model that bench/moe_vs_dense.py trained on the same text
(same tokenizer and shards); with --teacher-steps N a new one is trained here first.

    .venv/bin/python bench/distill_vs_scratch.py [--steps 400] [--teacher DIR] [--no-write]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import write_section  # noqa: E402

from behemoth.train.config import load_run_config  # noqa: E402
from behemoth.train.distill import distill  # noqa: E402
from behemoth.train.metrics import read_metrics  # noqa: E402
from behemoth.train.trainer import pretrain  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories" / "tinystories_sample.txt"
MOE_VS_DENSE = Path("/tmp/behemoth-bench/moe-vs-dense")


def settings(steps: int, data: Path, tokenizer: Path, preset: str = "cpu-mini") -> list[str]:
    return [f"model.preset={preset!r}", f"data.sources=[{str(data)!r}]", f"data.tokenizer={str(tokenizer)!r}",
            f"run.steps={steps}", f"run.eval_every={max(1, steps // 8)}", "run.eval_batches=16",
            f"run.checkpoint_every={steps}", "run.keep_checkpoints=1", "optim.warmup_steps=30"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="student optimizer steps (both runs)")
    parser.add_argument("--teacher", type=Path, default=MOE_VS_DENSE / "cpu-small" / "model")
    parser.add_argument("--data-dir", type=Path, default=MOE_VS_DENSE / "data", help="prepared shards of the text")
    parser.add_argument("--teacher-steps", type=int, default=0, help="train a new teacher for this many steps")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/behemoth-bench/distill"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    teacher, data = args.teacher, args.data_dir
    if args.teacher_steps:
        if not DATA.is_file():
            raise SystemExit(f"{DATA}: missing (the TinyStories sample lives in ../shared/data)")
        out = args.workdir / "teacher"
        shutil.rmtree(out, ignore_errors=True)
        run = load_run_config(None, ["model.preset='cpu-small'", f"data.sources=[{str(DATA)!r}]",
                                     f"run.steps={args.teacher_steps}", "data.val_fraction=0.05"])
        teacher, data = pretrain(run, out, progress=False).model_dir, out / "data"
    if not (teacher / "model.safetensors").is_file() or not (data / "manifest.json").is_file():
        raise SystemExit(f"no teacher at {teacher} or shards at {data}: run bench/moe_vs_dense.py first, "
                         "or pass --teacher-steps N")

    results = {}
    for name in ("scratch", "distilled"):
        out = args.workdir / name
        shutil.rmtree(out, ignore_errors=True)
        run = load_run_config(None, settings(args.steps, data, teacher))
        result = (pretrain(run, out, progress=False) if name == "scratch"
                  else distill(run, teacher, out, progress=False))
        results[name] = (result, read_metrics(out / "metrics.jsonl")[-1]["tokens_seen"])

    rows = [f"| {name} | {result.steps} | {tokens:,} | {result.val_loss:.4f} | **{result.val_bpb:.4f}** |"
            for name, (result, tokens) in results.items()]
    scratch, distilled = results["scratch"][0].val_bpb, results["distilled"][0].val_bpb
    run = load_run_config(None, settings(args.steps, data, teacher))
    body = "\n".join([
        f"Student `cpu-mini` on the TinyStories sample, batch 8 x 256, float32, seed 0; teacher `cpu-small` "
        f"({teacher}); distillation at temperature {run.distill.temperature}, soft weight "
        f"{run.distill.alpha_schedule} {run.distill.alpha_start} -> {run.distill.alpha_end}. "
        "Command: `.venv/bin/python bench/distill_vs_scratch.py` (after `bench/moe_vs_dense.py`).",
        "", "| student | steps | training tokens | val loss | val bits/byte |", "|---|---|---|---|---|", *rows, "",
        f"**Target (distillation wins at equal tokens): {'met' if distilled < scratch else 'missed'}** "
        f"(distilled {distilled:.4f} vs scratch {scratch:.4f} bits/byte).",
    ])
    print(body)
    if not args.no_write:
        write_section("Distillation vs training from scratch", body)


if __name__ == "__main__":
    main()
