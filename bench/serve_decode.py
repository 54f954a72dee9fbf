"""Decode throughput of our serving engine against transformers' `generate`, same weights.

`cpu-small` with random weights (seed 0), float32, greedy, end of text ignored, prompts of 32
random tokens. Two settings, each measured for both sides within one run, alternating:
- batch 1: one request, 96 new tokens -> tokens/s;
- 16 streams: ours = 16 requests submitted together to one Engine(max_batch_size=16)
  (continuous batching); theirs = `generate` on a batch of the same 16 prompts -> aggregate
  new tokens/s.
Time includes the prompt (submit to last token), as a client sees it. Also reported: the
engine's time to first token (batch 1, and the median of the 16 streams), and whether both sides
produced the same tokens (greedy on the same weights should).

    .venv/bin/python bench/serve_decode.py [--repeats 3] [--quick] [--no-write]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import summary, write_section  # noqa: E402
from model_step import transformers_twin  # noqa: E402

from behemoth.config import preset  # noqa: E402
from behemoth.model import Transformer, init_weights  # noqa: E402
from behemoth.serve.engine import Engine, SamplingParams  # noqa: E402

SECTION = "Decode: engine vs transformers"
TARGETS = {"batch 1": 3.0, "16 streams": 8.0}


class IdText:
    """A stand-in tokenizer for random token ids: the engine decodes every token to text as it
    would for a client (one word per id); there are no end-of-text ids (EOS is ignored anyway)."""

    eos_id = None
    eot_id = None

    @staticmethod
    def decode(ids) -> str:
        return "".join(f" t{i}" for i in ids)


def run_engine(engine: Engine, prompts: torch.Tensor, new_tokens: int) -> dict:
    """Submit every prompt at once; wait for all. Returns wall time, TTFTs and the tokens."""
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_new_tokens=new_tokens)
    rows = prompts.tolist()
    start = time.monotonic()
    requests = [engine.submit(row, params) for row in rows]
    tokens = [[event.token_id for event in request] for request in requests]
    for request in requests:
        if request.finish_reason != "length":
            raise RuntimeError(f"engine request ended with {request.finish_reason!r}")
    end = max(request.finished_at for request in requests)
    return dict(time=end - start, tokens=tokens,
                ttft=[request.first_token_at - start for request in requests])


def run_transformers(twin, prompts: torch.Tensor, new_tokens: int) -> dict:
    start = time.monotonic()
    with torch.inference_mode():
        out = twin.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False, use_cache=True,
                            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    elapsed = time.monotonic() - start
    new = out[:, prompts.shape[1]:]
    if new.shape[1] != new_tokens:
        raise RuntimeError(f"transformers generated {new.shape[1]} tokens, expected {new_tokens}")
    return dict(time=elapsed, tokens=new.tolist())


def mismatch(ours: list[list[int]], theirs: list[list[int]]) -> str | None:
    """None if identical, else which rows differ and where the first one diverges."""
    bad = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    if not bad:
        return None
    a, b = ours[bad[0]], theirs[bad[0]]
    first = next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)
    return f"{len(bad)} of {len(ours)} rows differ (row {bad[0]} from new token {first} of {len(a)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--quick", action="store_true",
                        help="smoke check: 16 new tokens, 1 repeat; never written to RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.repeats = 16, 1

    import transformers
    transformers.logging.set_verbosity_error()

    torch.manual_seed(0)
    ours = Transformer(preset("cpu-small"))
    init_weights(ours, seed=0)
    ours.eval()
    theirs = transformers_twin(ours).eval()
    theirs.config.use_cache = True
    # No end of text: every row runs to max_new_tokens, and greedy picks are never masked (with an
    # eos id set, min_new_tokens would forbid it and could change the argmax).
    theirs.generation_config.eos_token_id = None
    theirs.config.eos_token_id = None

    vocab = ours.config.vocab_size
    prompts = torch.randint(0, vocab, (args.streams, args.prompt), generator=torch.Generator().manual_seed(0))
    settings = {"batch 1": prompts[:1], f"{args.streams} streams": prompts}
    names = list(settings)
    targets = {names[0]: TARGETS["batch 1"], names[1]: TARGETS["16 streams"]}

    results: dict[tuple[str, str], list[dict]] = {(s, side): [] for s in settings for side in ("ours", "theirs")}
    with Engine(ours, IdText(), max_batch_size=args.streams) as engine:
        sides = {"ours": lambda p, n: run_engine(engine, p, n),
                 "theirs": lambda p, n: run_transformers(theirs, p, n)}
        for batch in settings.values():  # warm-up, short
            for run in sides.values():
                run(batch, 4)
        for repeat in range(args.repeats):
            order = ["ours", "theirs"] if repeat % 2 == 0 else ["theirs", "ours"]
            for setting, batch in settings.items():
                for side in order:
                    results[setting, side].append(sides[side](batch, args.new_tokens))
                    r = results[setting, side][-1]
                    print(f"  repeat {repeat + 1} {setting:>10} {side:>6}: {r['time']:.2f} s", file=sys.stderr)

    rows = ["| setting | engine tokens/s | spread | transformers tokens/s | spread | ratio | target | met |",
            "|---|---|---|---|---|---|---|---|"]
    lines, warnings = [], []
    for setting, batch in settings.items():
        new = batch.shape[0] * args.new_tokens
        rate, spread = {}, {}
        for side in ("ours", "theirs"):
            median, spread[side] = summary([r["time"] for r in results[setting, side]])
            rate[side] = new / median
        ratio = rate["ours"] / rate["theirs"]
        met = ratio >= targets[setting]
        rows.append(f"| {setting} | {rate['ours']:,.0f} | {spread['ours']:.0%} | {rate['theirs']:,.0f} | "
                    f"{spread['theirs']:.0%} | **{ratio:.2f}x** | {targets[setting]:.0f}x | "
                    f"{'yes' if met else 'no'} |")
        lines.append(f"- {setting}: engine / transformers **{ratio:.2f}x** (target at least "
                     f"{targets[setting]:.0f}x): {'met' if met else 'NOT met'}.")
        for r_ours, r_theirs in zip(results[setting, "ours"], results[setting, "theirs"]):
            diff = mismatch(r_ours["tokens"], r_theirs["tokens"])
            if diff is not None:
                warnings.append(f"**Warning: {setting}: engine and transformers tokens differ: {diff}.**")
                break

    ttft_1 = statistics.median(r["ttft"][0] for r in results[names[0], "ours"])
    ttft_n = statistics.median(statistics.median(r["ttft"]) for r in results[names[1], "ours"])
    ttft_n_max = statistics.median(max(r["ttft"]) for r in results[names[1], "ours"])
    body = "\n".join([
        f"Greedy decoding, `cpu-small` (random weights, seed 0, same weights both sides), float32, "
        f"{torch.get_num_threads()} torch threads, prompts of {args.prompt} random tokens, {args.new_tokens} new "
        f"tokens per stream, end of text ignored. Ours: the serving `Engine` (continuous batching, "
        f"max_batch_size {args.streams}), all requests submitted together; theirs: `Llama4ForCausalLM` "
        f"(sdpa attention, KV cache) `generate(do_sample=False)` on the same prompts as one batch. "
        f"Tokens/s = new tokens / wall time from submit to the last token (prompt included); median of "
        f"{args.repeats} alternating runs, spread = (max - min) / median. "
        f"Command: `.venv/bin/python bench/serve_decode.py`.",
        "", *rows, "",
        *lines,
        f"- Engine time to first token: {ttft_1 * 1000:.0f} ms at batch 1; {ttft_n * 1000:.0f} ms median "
        f"(slowest {ttft_n_max * 1000:.0f} ms) with {args.streams} streams submitted together.",
        "- Tokens: " + ("identical on both sides in every run." if not warnings else "see warnings below."),
        *([""] + warnings if warnings else []),
    ])
    print(body)
    if not (args.no_write or args.quick):
        write_section(SECTION, body)


if __name__ == "__main__":
    main()
