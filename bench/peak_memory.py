"""Peak resident memory of a training run, of serving, and of fine-tuning (full, LoRA, LoRA over an
int8 base), each in a process of its own.

Kinds of child process, each started afresh and measured by its ru_maxrss (see common.run_measured;
this parent never imports torch, so it adds nothing to the children's peak):
- baseline: import torch and behemoth, build cpu-small (what every process below starts from);
- training run: `pretrain` of cpu-small from the raw TinyStories sample (tokenizer training, data
  preparation, steps of batch 8 x 256 with AdamW, evaluation, a checkpoint and the final model);
- serving: the serving `Engine` on cpu-small (random weights) decoding 16 streams at once
  (prompts of 32 tokens, 96 new tokens each);
- fine-tuning: `sft` of one base (cpu-small with 32 routed experts, 57M parameters, the experts
  80% of them as in Llama 4) on synthetic chat data with the sft stage's optimizer (Muon for
  matrices), every weight / LoRA rank 16 on every projection and expert over the float32 base /
  the same over the base held as int8
  (`lora.base_weights = "int8"`). Besides the whole run's peak, each child reads the peak of its
  optimizer steps alone (Linux's VmHWM, reset when the first step starts), and their median time.

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
                                 f"run.checkpoint_every={args.steps}", "run.dtype='float32'"])
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


FINETUNE_KINDS = {"full": ("every weight", []),
                  "lora": ("LoRA rank 16, float32 base", ["lora.rank=16"]),
                  "lora-int8": ("LoRA rank 16, int8 base", ["lora.rank=16", "lora.base_weights='int8'"])}
FINETUNE_EXPERTS = 32


def child_finetune_setup(args: argparse.Namespace) -> None:
    """The base model directory and the chat data every fine-tuning child starts from."""
    import behemoth
    from behemoth.config import preset
    from behemoth.data.synthetic_chat import write_chat_data
    from behemoth.model import Transformer, init_weights
    from behemoth.tokenizer import train_tokenizer

    data = write_chat_data(args.work / "chat", conversations=400, pairs=8, prompts=8, safety=0.0)
    tokenizer = train_tokenizer(data.sft.read_text().splitlines(), 2000)
    config = preset("cpu-small").replace(num_local_experts=FINETUNE_EXPERTS, vocab_size=tokenizer.vocab_size,
                                         bos_token_id=tokenizer.bos_id, pad_token_id=tokenizer.pad_id,
                                         eos_token_id=[tokenizer.eos_id, tokenizer.eot_id])
    model = Transformer(config)
    init_weights(model, seed=0)
    behemoth.save(model, args.work / "base", tokenizer=tokenizer)


def child_finetune(args: argparse.Namespace) -> None:
    """One `sft` run of args.finetune's kind; writes {"steps_peak_mib", "step_s"} to work/result.json."""
    import json
    import time

    import behemoth.train.loop as loop
    from behemoth.train.config import load_run_config
    from behemoth.train.sft import sft

    os.environ["BEHEMOTH_CACHE"] = str(args.work / "cache")
    step_times, steps_peak = [], []
    real_step = loop._optimizer_step

    def measured_step(*step_args, **kwargs):
        if not step_times:  # the steps' own peak: loading and quantising the base are behind us
            Path("/proc/self/clear_refs").write_text("5")
        started = time.perf_counter()
        out = real_step(*step_args, **kwargs)
        step_times.append(time.perf_counter() - started)
        steps_peak.append(_resident_peak_mib())
        return out

    loop._optimizer_step = measured_step  # instrumentation of this child only
    _, settings = FINETUNE_KINDS[args.finetune]
    run = load_run_config(None, [f"data.batch_size={args.finetune_batch}", f"data.seq_len={args.finetune_seq}",
                                 f"run.steps={args.finetune_steps}", f"run.eval_every={args.finetune_steps}",
                                 "run.eval_batches=1", f"run.checkpoint_every={args.finetune_steps}",
                                 "run.dtype='float32'", *settings], stage="sft")
    sft(run, args.shared / "base", args.shared / "chat" / "sft.jsonl", args.work / "run", progress=False)
    timed = sorted(step_times[1:] or step_times)  # the first step warms up
    (args.work / "result.json").write_text(json.dumps({"steps_peak_mib": max(steps_peak),
                                                       "step_s": timed[len(timed) // 2]}))


def _resident_peak_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024


CHILDREN = {"baseline": child_baseline, "train": child_train, "serve": child_serve,
            "finetune-setup": child_finetune_setup, "finetune": child_finetune}


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


def measure_finetune(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """Whole-run peak, steps' peak (MiB) and median step time (s) of each fine-tuning kind, kinds interleaved."""
    import json

    results = {kind: {"peak": [], "steps_peak": [], "step_s": []} for kind in FINETUNE_KINDS}
    sizes = ["--finetune-steps", str(args.finetune_steps), "--finetune-batch", str(args.finetune_batch),
             "--finetune-seq", str(args.finetune_seq)]
    threads = ["--threads", str(args.threads)] if args.threads else []
    with tempfile.TemporaryDirectory(prefix="behemoth-memory-finetune-") as shared:
        code, _, _ = run_measured([sys.executable, __file__, "--child", "finetune-setup", "--work", shared])
        if code != 0:
            raise SystemExit(f"the fine-tuning setup child failed with exit code {code}")
        for repeat in range(args.repeats):
            for kind in FINETUNE_KINDS:
                with tempfile.TemporaryDirectory(prefix=f"behemoth-memory-{kind}-") as work:
                    code, seconds, mib = run_measured([sys.executable, __file__, "--child", "finetune",
                                                       "--finetune", kind, "--work", work, "--shared", shared,
                                                       *sizes, *threads])
                    if code != 0:
                        raise SystemExit(f"the {kind} fine-tuning child failed with exit code {code}")
                    result = json.loads((Path(work) / "result.json").read_text())
                results[kind]["peak"].append(mib)
                results[kind]["steps_peak"].append(result["steps_peak_mib"])
                results[kind]["step_s"].append(result["step_s"])
                print(f"  repeat {repeat + 1} fine-tune {kind:>9}: {mib:.0f} MiB, steps {result['steps_peak_mib']:.0f}"
                      f" MiB, {result['step_s']:.3f} s/step", file=sys.stderr)
    return results


def finetune_table(results: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> tuple[list[str], list[Figure]]:
    rows = ["| fine-tuning | whole run peak RSS | optimizer steps' peak RSS | step time | step time vs full |",
            "|---|---|---|---|---|"]
    figures = []
    full_step = summary(results["full"]["step_s"])[0]
    for kind, (label, _) in FINETUNE_KINDS.items():
        peak, steps_peak, step = (summary(results[kind][key])[0] for key in ("peak", "steps_peak", "step_s"))
        rows.append(f"| {label} | {peak:,.0f} MiB | {steps_peak:,.0f} MiB | {step * 1000:,.0f} ms | "
                    f"{step / full_step:.2f}x |")
        figures += [Figure(f"fine-tuning peak memory, {label}", peak, "MiB", runs=args.repeats),
                    Figure(f"fine-tuning steps' peak memory, {label}", steps_peak, "MiB", runs=args.repeats),
                    Figure(f"fine-tuning step time, {label}", step * 1000, "ms", runs=args.repeats)]
    return rows, figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench_arguments(parser, repeats=3)
    parser.add_argument("--steps", type=int, default=6, help="training steps")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--finetune-steps", type=int, default=8, help="fine-tuning steps")
    parser.add_argument("--finetune-batch", type=int, default=4)
    parser.add_argument("--finetune-seq", type=int, default=128)
    parser.add_argument("--child", choices=CHILDREN, help=argparse.SUPPRESS)
    parser.add_argument("--finetune", choices=FINETUNE_KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--shared", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        CHILDREN[args.child](args)
        return
    if args.quick:
        args.repeats, args.steps, args.new_tokens, args.finetune_steps = 1, 2, 8, 3
    if not DATA.is_file():
        raise SystemExit(f"{DATA}: missing (the TinyStories sample lives in ../shared/data)")

    peaks = measure(args)
    finetune_rows, finetune_figures = finetune_table(measure_finetune(args), args)
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
        *rows, "",
        f"Fine-tuning: `sft` of `cpu-small` with {FINETUNE_EXPERTS} routed experts (57M parameters, 228 MiB in "
        f"float32) on synthetic chat data, {args.finetune_steps} steps of batch {args.finetune_batch} x "
        f"{args.finetune_seq} in float32 with the sft stage's optimizer (Muon for matrices, AdamW for the rest), one process per run (medians of {args.repeats}). The optimizer steps' "
        "peak is the resident peak from the first step to the last (VmHWM reset as the first step starts); the "
        "whole run's also covers loading the float32 base, the evaluation and writing the merged model in "
        "float32, which an int8 base does not shrink.", "",
        *finetune_rows,
    ])
    finish(args, SECTION, body, figures + finetune_figures)


if __name__ == "__main__":
    main()
