"""Decode throughput of our serving engine against transformers' `generate` and llama.cpp, same weights.

`cpu-small` with random weights (seed 0), float32, greedy, end of text ignored, prompts of 32
random tokens. Two settings, every side measured within one run, alternating:
- batch 1: one request, 96 new tokens -> tokens/s; ours, transformers, and llama.cpp (through
  llama-cpp-python) running our own f32 GGUF export of the same weights with an f32 KV cache and
  as many threads as torch;
- 16 streams: ours = 16 requests submitted together to one Engine(max_batch_size=16)
  (continuous batching); transformers = `generate` on a batch of the same 16 prompts -> aggregate
  new tokens/s. llama.cpp is compared here through its single stream: our aggregate against
  4 x llama.cpp's batch-1 rate.
Time includes the prompt (submit to last token), as a client sees it. Also reported: time to
first token, and whether the sides produced the same tokens (greedy on the same weights should).

    .venv/bin/python bench/serve_decode.py [--repeats 5] [--quick] [--no-write]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import Figure, bench_arguments, finish, paired_ratio, start, summary  # noqa: E402
from llama_cpp_side import export_f32, open_llama, run_llama  # noqa: E402
from model_step import transformers_twin  # noqa: E402

from behemoth.config import preset  # noqa: E402
from behemoth.model import Transformer, init_weights  # noqa: E402
from behemoth.serve.engine import Engine, SamplingParams  # noqa: E402

SECTION = "Decode: engine vs transformers and llama.cpp"
OLD_SECTION = "Decode: engine vs transformers"  # the section's earlier name, replaced when written
TARGETS = {"batch 1": 3.0, "streams": 8.0}  # engine / transformers, at least
LLAMA_TARGETS = {"batch 1": 0.5, "streams": 1.0}  # engine / llama.cpp (streams: / 4 x its batch 1), at least
LLAMA_STREAMS = 4  # the aggregate is compared with this many llama.cpp single streams


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


def build_models():
    """Our model (seed 0) and transformers' twin with the same weights, set up for greedy decoding."""
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
    return ours, theirs


def measure(sides: dict, settings: dict, repeats: int, new_tokens: int) -> dict[tuple[str, str], list[dict]]:
    """Every (setting, side) pair once per repeat; the order of the sides rotates every repeat."""
    for setting, batch in settings.items():  # warm-up, short
        for side in sides[setting].values():
            side(batch, 4)
    results: dict[tuple[str, str], list[dict]] = {(s, side): [] for s in settings for side in sides[s]}
    for repeat in range(repeats):
        for setting, batch in settings.items():
            names = list(sides[setting])
            for side in names[repeat % len(names):] + names[:repeat % len(names)]:
                results[setting, side].append(sides[setting][side](batch, new_tokens))
                r = results[setting, side][-1]
                print(f"  repeat {repeat + 1} {setting:>10} {side:>12}: {r['time']:.2f} s", file=sys.stderr)
    return results


def rates(results: list[dict], new_tokens: int) -> list[float]:
    return [len(r["tokens"]) * new_tokens / r["time"] for r in results]


def comparison_row(label: str, ours: list[float], base: list[float], target: float) -> tuple[str, Figure]:
    """A table row and a Figure for ours / base (per-repeat rate lists), against `target`."""
    ratio, spread = paired_ratio(ours, base)
    met = ratio >= target
    row = (f"| {label} | {statistics.median(ours):,.0f} ({summary(ours)[1]:.0%}) | "
           f"{statistics.median(base):,.0f} ({summary(base)[1]:.0%}) | **{ratio:.2f}x** ({spread:.0%}) | "
           f">= {target:g}x | {'yes' if met else '**no**'} |")
    return row, Figure(f"decode {label}", ratio, "x", spread, f">= {target:g}x", met, runs=len(ours))


def rate_figure(name: str, values: list[float]) -> Figure:
    median, spread = summary(values)
    return Figure(name, median, "tokens/s", spread, runs=len(values))


def token_warnings(results: dict, pairs: list[tuple[str, str, str]]) -> list[str]:
    """Greedy on the same weights should give the same tokens; say where it does not."""
    warnings = []
    for setting, side, other in pairs:
        for a, b in zip(results[setting, side], results[setting, other]):
            diff = mismatch(a["tokens"], b["tokens"])
            if diff is not None:
                warnings.append(f"- {setting}: {side} and {other} tokens differ: {diff}. With random weights "
                                f"near-tied logits can tip either way; the timing is unaffected.")
                break
    return warnings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench_arguments(parser, repeats=5)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--streams", type=int, default=16)
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.repeats = 16, 1
    start(args)

    ours, theirs = build_models()
    vocab = ours.config.vocab_size
    prompts = torch.randint(0, vocab, (args.streams, args.prompt), generator=torch.Generator().manual_seed(0))
    one, many = "batch 1", f"{args.streams} streams"
    settings = {one: prompts[:1], many: prompts}

    with tempfile.TemporaryDirectory(prefix="behemoth-decode-") as tmp, \
            Engine(ours, IdText(), max_batch_size=args.streams) as engine:
        llm = open_llama(export_f32(ours, Path(tmp)), n_ctx=args.prompt + args.new_tokens + 8)
        try:
            def llama_side(batch: torch.Tensor, new_tokens: int) -> dict:  # one stream only
                return run_llama(llm, batch[0].tolist(), new_tokens)

            engine_side, hf_side = partial(run_engine, engine), partial(run_transformers, theirs)
            sides = {one: {"engine": engine_side, "transformers": hf_side, "llama.cpp": llama_side},
                     many: {"engine": engine_side, "transformers": hf_side}}
            results = measure(sides, settings, args.repeats, args.new_tokens)
        finally:
            llm.close()
    report(args, results, one, many)


def report(args: argparse.Namespace, results: dict, one: str, many: str) -> None:
    rate = {key: rates(r, args.new_tokens) for key, r in results.items()}
    rows = ["| comparison | engine tokens/s (spread) | baseline tokens/s (spread) | ratio (spread) | target | met |",
            "|---|---|---|---|---|---|"]
    figures = [rate_figure(f"decode {one} tokens/s, engine", rate[one, "engine"]),
               rate_figure(f"decode {many} aggregate tokens/s, engine", rate[many, "engine"]),
               rate_figure(f"decode {one} tokens/s, llama.cpp", rate[one, "llama.cpp"])]
    four_llamas = [LLAMA_STREAMS * r for r in rate[one, "llama.cpp"]]
    for label, ours, base, target in [
            (f"{one}: engine / transformers", rate[one, "engine"], rate[one, "transformers"], TARGETS["batch 1"]),
            (f"{many}: engine / transformers", rate[many, "engine"], rate[many, "transformers"], TARGETS["streams"]),
            (f"{one}: engine / llama.cpp", rate[one, "engine"], rate[one, "llama.cpp"], LLAMA_TARGETS["batch 1"]),
            (f"{many}: engine aggregate / ({LLAMA_STREAMS} x llama.cpp {one})", rate[many, "engine"], four_llamas,
             LLAMA_TARGETS["streams"])]:
        row, figure = comparison_row(label, ours, base, target)
        rows.append(row)
        figures.append(figure)

    ttft = {side: statistics.median(r["ttft"][0] for r in results[one, side]) for side in ("engine", "llama.cpp")}
    ttft_n = statistics.median(statistics.median(r["ttft"]) for r in results[many, "engine"])
    ttft_n_max = statistics.median(max(r["ttft"]) for r in results[many, "engine"])
    warnings = token_warnings(results, [(one, "engine", "transformers"), (many, "engine", "transformers"),
                                        (one, "engine", "llama.cpp")])
    body = "\n".join([
        f"Greedy decoding, `cpu-small` (random weights, seed 0, the same weights on every side), float32, "
        f"{torch.get_num_threads()} thread(s) on every side, prompts of {args.prompt} random tokens, "
        f"{args.new_tokens} new tokens per stream, end of text ignored. Engine: the serving `Engine` (continuous "
        f"batching, max_batch_size {args.streams}), all requests submitted together. Transformers: "
        f"`Llama4ForCausalLM` (sdpa attention, KV cache) `generate(do_sample=False)` on the same prompts as one "
        f"batch. llama.cpp: llama-cpp-python {llama_cpp_version()} on our own f32 GGUF export (`behemoth export "
        f"--format gguf`) of the same weights, f32 KV cache, `Llama.generate(temp=0)` (llama-cpp-python's Python loop included), one stream. Tokens/s = new "
        f"tokens / wall time from submit to the last token (prompt included), median of {args.repeats} repeats "
        f"with the order of the sides rotating; spread = (max - min) / median, for a ratio over the per-repeat "
        f"ratios. Command: `.venv/bin/python bench/serve_decode.py`.",
        "", *rows, "",
        f"- Time to first token: engine {ttft['engine'] * 1000:.0f} ms, llama.cpp {ttft['llama.cpp'] * 1000:.0f} ms "
        f"at batch 1; engine {ttft_n * 1000:.0f} ms median (slowest {ttft_n_max * 1000:.0f} ms) with "
        f"{args.streams} streams submitted together.",
        "- Tokens: " + ("identical on every side in every run." if not warnings else "differ, see below."),
        *warnings,
    ])
    finish(args, SECTION, body, figures, replaces=OLD_SECTION)


def llama_cpp_version() -> str:
    import llama_cpp
    return llama_cpp.__version__


if __name__ == "__main__":
    main()
