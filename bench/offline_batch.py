"""Offline generation (`behemoth.inference.complete`) at batch 32 against one prompt at a time.

Generative evaluation and RL rollouts generate many answers from one model; this is the path
they run on. 256 prompts of 8 to 40 tokens, up to 32 new tokens each, greedy, from the
speedrun's student: `cpu-mini`, with the trained weights of `--model DIR` (default
runs/speedrun/student/model when a speedrun has run here), else random weights (seed 0) with end
of text ignored, so that every answer is 32 tokens long. Two sides, alternating, in the same
process and thread:
- batched: `complete(model, tokenizer, prompts, params, max_batch_size=32)` (continuous batching);
- one at a time: `generate(model, prompt)` per prompt, as the evaluation code generates today,
  timed on the first 64 prompts (all 256 would take minutes per repeat).
Figures: answers per second of each side and their ratio (paired per repeat); the tokens of the
64 prompts both sides answered are compared.

    .venv/bin/python bench/offline_batch.py [--repeats 3] [--model DIR] [--quick] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import Figure, bench_arguments, finish, paired_ratio, start, summary  # noqa: E402

from behemoth.config import preset  # noqa: E402
from behemoth.inference import SamplingParams, complete, generate  # noqa: E402
from behemoth.model import Transformer, init_weights  # noqa: E402

SECTION = "Offline generation: batched vs one prompt at a time"
SPEEDRUN_STUDENT = Path("runs/speedrun/student/model")
BATCH = 32
NEW_TOKENS = 32
SINGLE = 64  # prompts the one-at-a-time side answers
TARGET = 4.0  # batching must be at least this much faster: offline callers must batch


class Digits:
    """Token ids as text (random weights have no tokenizer worth the name)."""

    eos_id = eot_id = None

    @staticmethod
    def decode(ids) -> str:
        return "".join(f" {i}" for i in ids)


def student(model_dir: Path | None) -> tuple[Transformer, object, bool, str]:
    """(model, tokenizer, trained, description)."""
    if model_dir is not None:
        from behemoth.checkpoint import load
        from behemoth.tokenizer import Tokenizer

        return load(model_dir).eval(), Tokenizer.load(model_dir), True, f"the trained student in `{model_dir}`"
    model = Transformer(preset("cpu-mini"))
    init_weights(model, seed=0)
    return model.eval(), Digits(), False, "`cpu-mini` with random weights (seed 0)"


def prompts(count: int, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 41, (count,), generator=generator).tolist()
    return [torch.randint(6, vocab, (n,), generator=generator).tolist() for n in lengths]


def one_at_a_time(model: Transformer, tokenizer, batch: list[list[int]], trained: bool) -> list[list[int]]:
    stops = {t for t in (getattr(tokenizer, "eos_id", None), getattr(tokenizer, "eot_id", None)) if t is not None}
    answers = []
    for prompt in batch:
        new = generate(model, torch.tensor([prompt]), max_new_tokens=NEW_TOKENS,
                       stop_token_ids=stops if trained else None)[0].tolist()
        answers.append(new[:next((i + 1 for i, t in enumerate(new) if t in stops), len(new))])
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench_arguments(parser, repeats=3)
    parser.add_argument("--model", type=Path, help="the student's model directory (default: the speedrun's, if any)")
    args = parser.parse_args()
    count, single = 256, SINGLE
    if args.quick:
        args.repeats, count, single = 1, 64, 16
    start(args)
    model_dir = args.model or (SPEEDRUN_STUDENT if (SPEEDRUN_STUDENT / "tokenizer.json").is_file() else None)
    model, tokenizer, trained, described = student(model_dir)
    batch = prompts(count, model.config.vocab_size)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=not trained)
    answered = {"batched": count, "one at a time": single}
    seconds: dict[str, list[float]] = {"batched": [], "one at a time": []}
    same = True
    with torch.inference_mode():
        for _ in range(args.repeats):
            started = time.perf_counter()
            batched = [c.token_ids for c in complete(model, tokenizer, batch, params, max_batch_size=BATCH)]
            seconds["batched"].append(time.perf_counter() - started)
            started = time.perf_counter()
            alone = one_at_a_time(model, tokenizer, batch[:single], trained)
            seconds["one at a time"].append(time.perf_counter() - started)
            same = same and batched[:single] == alone
    rates = {side: [answered[side] / s for s in values] for side, values in seconds.items()}
    ratio, spread = paired_ratio(rates["batched"], rates["one at a time"])
    figures = [Figure(f"offline answers/s, {side}", summary(values)[0], "answers/s", summary(values)[1],
                      runs=args.repeats) for side, values in rates.items()]
    figures.append(Figure(f"offline generation: batch {BATCH} / one prompt at a time", ratio, "x", spread,
                          target=f">= {TARGET:g}x", met=ratio >= TARGET, runs=args.repeats))
    tokens_per_answer = sum(len(a) for a in batched) / count
    body = "\n".join([
        f"{count} prompts of 8-40 tokens, up to {NEW_TOKENS} new tokens each (greedy), from {described}; "
        f"batched: all {count} at batch {BATCH}; one at a time: the first {single}. {args.repeats} alternating "
        f"repeats, median. Command: `.venv/bin/python bench/offline_batch.py`.", "",
        "| side | answers/s | new tokens/s | spread |", "|---|---|---|---|",
        *(f"| {side} | {summary(r)[0]:.1f} | {summary(r)[0] * tokens_per_answer:,.0f} | {summary(r)[1]:.0%} |"
          for side, r in rates.items()),
        "",
        f"**Batch {BATCH} / one prompt at a time: {ratio:.2f}x** (target >= {TARGET:g}x; spread of the paired "
        f"ratios {spread:.0%}). Both sides gave the same tokens for the prompts both answered: "
        f"{'yes' if same else '**no**'} (greedy on the same weights; a batch of rows can round differently from "
        "one row, so an occasional difference in a late token is float arithmetic, not a bug).",
    ])
    finish(args, SECTION, body, figures)


if __name__ == "__main__":
    main()
