"""Peak resident memory of a training run and of serving, each in a process of its own.

Three kinds of child process, each started afresh and measured by its ru_maxrss (see
common.run_measured; this parent never imports torch, so it adds nothing to the children's peak):
- baseline: import torch and behemoth, build cpu-small (what every process below starts from);
- training run: `pretrain` of cpu-small from the raw TinyStories sample (tokenizer training, data
  preparation, steps of batch 8 x 256 with AdamW, evaluation, a checkpoint and the final model);
- serving: the serving `Engine` on cpu-small (random weights) decoding 16 streams at once
  (prompts of 32 tokens, 96 new tokens each).

    .venv/bin/python bench/peak_memory.py [--repeats 3] [--quick] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import Figure, bench_arguments, finish, run_measured, summary  # noqa: E402

SECTION = "Peak memory: training and serving"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories" / "tinystories_sample.txt"
KINDS = {"baseline": "baseline (import torch + behemoth, build cpu-small)",
         "train": "training run",
         "serve": "serving"}


# ------------------------------------------------------------------------------------------------
# Children: each does one thing and exits; imports happen here, never in the parent.
# ------------------------------------------------------------------------------------------------

def child_baseline(args: argparse.Namespace) -> None:
    from behemoth.config import preset
    from behemoth.model import Transformer, init_weights

    init_weights(Transformer(preset("cpu-small")), seed=0)


def child_train(args: argparse.Namespace) -> None:
    from behemoth.train.config import load_run_config
    from behemoth.train.trainer import pretrain

    os.environ["BEHEMOTH_CACHE"] = str(args.work / "cache")  # leave the user's matmul-peak cache alone
    run = load_run_config(None, [f"data.sources=[{str(DATA)!r}]", f"data.batch_size={args.batch}",
                                 f"data.seq_len={args.seq}", f"run.steps={args.steps}",
                                 f"run.eval_every={args.steps}", "run.eval_batches=2",
                                 f"run.checkpoint_every={args.steps}"])
    pretrain(run, args.work / "run", progress=False)


def child_serve(args: argparse.Namespace) -> None:
    import torch

    from behemoth.config import preset
    from behemoth.model import Transformer, init_weights
    from behemoth.inference.engine import Engine, SamplingParams

    model = Transformer(preset("cpu-small"))
    init_weights(model, seed=0)
    prompts = torch.randint(0, model.config.vocab_size, (args.streams, 32), generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_new_tokens=args.new_tokens)
    with Engine(model, IdText(), max_batch_size=args.streams) as engine:
        requests = [engine.submit(row, params) for row in prompts.tolist()]
        for request in requests:
            for _ in request:
                pass


class IdText:
    """Token ids as words, no end-of-text ids: random prompts need no real tokenizer."""

    eos_id = None
    eot_id = None

    @staticmethod
    def decode(ids) -> str:
        return "".join(f" t{i}" for i in ids)


CHILDREN = {"baseline": child_baseline, "train": child_train, "serve": child_serve}


# ------------------------------------------------------------------------------------------------
# Parent
# ------------------------------------------------------------------------------------------------

def measure(args: argparse.Namespace) -> dict[str, list[float]]:
    """Peak MiB of each kind of child, `repeats` times, kinds interleaved."""
    peaks: dict[str, list[float]] = {kind: [] for kind in KINDS}
    sizes = ["--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq),
             "--streams", str(args.streams), "--new-tokens", str(args.new_tokens)]
    threads = ["--threads", str(args.threads)] if args.threads else []
    for repeat in range(args.repeats):
        for kind in KINDS:
            with tempfile.TemporaryDirectory(prefix=f"behemoth-memory-{kind}-") as work:
                code, seconds, mib = run_measured([sys.executable, __file__, "--child", kind, "--work", work,
                                                   *sizes, *threads])
            if code != 0:
                raise SystemExit(f"the {kind} child failed with exit code {code}")
            peaks[kind].append(mib)
            print(f"  repeat {repeat + 1} {kind:>8}: {mib:.0f} MiB in {seconds:.1f} s", file=sys.stderr)
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench_arguments(parser, repeats=3)
    parser.add_argument("--steps", type=int, default=6, help="training steps")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--child", choices=CHILDREN, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        CHILDREN[args.child](args)
        return
    if args.quick:
        args.repeats, args.steps, args.new_tokens = 1, 2, 8
    if not DATA.is_file():
        raise SystemExit(f"{DATA}: missing (the TinyStories sample lives in ../shared/data)")

    peaks = measure(args)
    rows = ["| process | peak RSS (median) | spread | runs |", "|---|---|---|---|"]
    figures = []
    for kind, label in KINDS.items():
        median, spread = summary(peaks[kind])
        figures.append(Figure(f"peak memory, {label.split(' (')[0]}", median, "MiB", spread, runs=len(peaks[kind])))
        rows.append(f"| {label} | {median:,.0f} MiB | {spread:.0%} | {len(peaks[kind])} |")
    body = "\n".join([
        f"ru_maxrss of a fresh child process per measurement (median of {args.repeats}). Training run: `pretrain` "
        f"of `cpu-small` from the raw TinyStories sample (tokenizer training, data preparation, {args.steps} steps "
        f"of batch {args.batch} x {args.seq}, float32, AdamW, evaluation, a checkpoint, the final model). Serving: "
        f"the `Engine` on `cpu-small` (random weights, float32) decoding {args.streams} streams at once, prompts of "
        f"32 tokens, {args.new_tokens} new tokens each. No targets: reported figures. "
        "Command: `.venv/bin/python bench/peak_memory.py`.", "",
        *rows,
    ])
    finish(args, SECTION, body, figures)


if __name__ == "__main__":
    main()
