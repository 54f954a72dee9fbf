"""Profile one model decode step (the numbers behind RESULTS.md's "Missed targets" section).

`cpu-small`, random weights, a 32-token prompt in the serving KV cache, then decode steps of the
model alone (no engine bookkeeping; LM head included): time per step and, with --profile,
torch.profiler's table of the ops that take the time. With --compile the steps are the compiled
ones `behemoth serve --compile` runs (built first, about half a minute). The profiler inflates
small operations; compare versions by time per step, in one process.

    .venv/bin/python bench/profile_decode.py --batch 1 --weights float32 --threads 1 --profile
    .venv/bin/python bench/profile_decode.py --batch 16 --weights int8 --threads 2 --compile
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import in_fresh_thread  # noqa: E402

from behemoth.config import preset  # noqa: E402
from behemoth.model import Transformer, init_weights  # noqa: E402
from behemoth.inference.compiled import CompiledDecoder  # noqa: E402
from behemoth.inference.kv_cache import ModelCache  # noqa: E402
from behemoth.inference.weights import WEIGHT_FORMATS, prepare_weights  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    parser.add_argument("--weights", choices=WEIGHT_FORMATS, default="float32", help="serving weight format")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--compile", action="store_true", help="the compiled decode step (behemoth serve --compile)")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's op table")
    args = parser.parse_args()
    # As `behemoth serve` does: the main thread only builds, with one thread, and the steps run on
    # a thread of their own; an idle OpenMP team in the main thread would slow every kernel.
    torch.set_num_threads(1)
    model = Transformer(preset("cpu-small"))
    init_weights(model, seed=0)
    prepare_weights(model, args.weights)
    decoder = CompiledDecoder(model, threads=args.threads) if args.compile else None
    in_fresh_thread(args.threads, measure, model, decoder, args)


@torch.inference_mode()
def measure(model: Transformer, decoder: CompiledDecoder | None, args: argparse.Namespace) -> None:
    cache = ModelCache.for_model(model, args.batch, 512)
    prompt = torch.randint(0, model.config.vocab_size, (args.batch, 32))
    token = torch.randint(0, model.config.vocab_size, (args.batch, 1))
    position = 32

    def step() -> None:
        nonlocal position
        positions = torch.full((args.batch, 1), position)
        if decoder is not None:
            decoder(token, positions, cache, position)
        else:
            model(token, positions, kv_caches=cache.layers)
        position += 1

    model(prompt, torch.arange(32).expand(args.batch, 32), kv_caches=cache.layers)
    for _ in range(5):
        step()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - started) / args.steps
    kind = "compiled" if decoder is not None else "eager"
    print(f"batch {args.batch}, {args.weights}, {kind}, {args.threads} thread(s): {seconds * 1000:.2f} ms per "
          f"step, {args.batch / seconds:,.0f} tokens/s")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
