"""Decode throughput of our serving engine against transformers' `generate` and llama.cpp, same weights.

`cpu-small` with random weights (seed 0), greedy, end of text ignored, prompts of 32 random
tokens. Two settings, every side measured within one run, in rotating order:
- batch 1: one request, 96 new tokens -> tokens/s; the engine with float32 weights (as trained),
  with int8 weight-only weights (`behemoth serve --weights int8`) and with int8 and a compiled
  decode step (`--weights int8 --compile`); transformers in float32; and llama.cpp (through
  llama-cpp-python's bindings to its C API) running our own f32 GGUF export of the same weights
  and llama.cpp's Q8_0 quantisation of it, with an f32 KV cache and as many threads as torch;
- 16 streams: the engine = 16 requests submitted together to one Engine(max_batch_size=16)
  (continuous batching), all three configurations; transformers = `generate` on a batch of the same
  16 prompts; llama.cpp = the 16 sequences decoded together, one `llama_decode` per step
  -> aggregate new tokens/s.
The engine is compared with llama.cpp at the same weight precision: float32 with f32, int8 with
Q8_0.
Time includes the prompt (submit to last token), as a client sees it. Also reported: time to
first token, whether float32 sides produced the same tokens (greedy on the same weights should),
and how closely int8 weights follow float32 ones.

Every torch side runs in a thread of its own, started for the measurement, with the same thread
count, while the main thread keeps one: two OpenMP thread teams on two cores would slow whichever
side runs beside an idle team (see `behemoth.inference.engine`).

    .venv/bin/python bench/serve_decode.py [--repeats 5] [--quick] [--no-write]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import Figure, bench_arguments, finish, in_fresh_thread, paired_ratio, start, summary  # noqa: E402
from llama_cpp_side import LlamaStreams, export_f32, quantize_q8_0  # noqa: E402
from model_step import transformers_twin  # noqa: E402

from behemoth.config import preset  # noqa: E402
from behemoth.model import Transformer, init_weights  # noqa: E402
from behemoth.inference.engine import Engine, SamplingParams, leave_cores_to_engines  # noqa: E402
from behemoth.inference.compiled import CompiledDecoder  # noqa: E402
from behemoth.inference.weights import prepare_weights  # noqa: E402

SECTION = "Decode: engine vs transformers and llama.cpp"
OLD_SECTION = "Decode: engine vs transformers"  # the section's earlier name, replaced when written
TARGETS = {"batch 1": 3.0, "streams": 8.0}  # engine / transformers, at least (both weight formats shown)
LLAMA_TARGETS = {"batch 1": 0.5, "streams": 1.0}  # engine / llama.cpp at the same setting, at least
LLAMA_PAIRS = {  # engine side -> the llama.cpp side of the same weight precision
    "engine int8 compiled": "llama.cpp q8_0",
    "engine": "llama.cpp",
}
LLAMA_NAMES = {"llama.cpp": "f32", "llama.cpp q8_0": "Q8_0"}


class IdText:
    """A stand-in tokenizer for random token ids: the engine decodes every token to text as it
    would for a client (one word per id); there are no end-of-text ids (EOS is ignored anyway)."""

    eos_id = None
    eot_id = None

    @staticmethod
    def decode(ids) -> str:
        return "".join(f" t{i}" for i in ids)


def run_engine(model: Transformer, threads: int, prompts: torch.Tensor, new_tokens: int,
               decoder: CompiledDecoder | None = None) -> dict:
    """A fresh engine (its own thread); submit every prompt at once; wait for all. Returns wall
    time, TTFTs and the tokens."""
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_new_tokens=new_tokens)
    rows = prompts.tolist()
    with Engine(model, IdText(), max_batch_size=len(rows), threads=threads, decoder=decoder) as engine:
        start = time.monotonic()
        requests = [engine.submit(row, params) for row in rows]
        tokens = [[event.token_id for event in request] for request in requests]
    for request in requests:
        if request.finish_reason != "length":
            raise RuntimeError(f"engine request ended with {request.finish_reason!r}")
    end = max(request.finished_at for request in requests)
    return dict(time=end - start, tokens=tokens,
                ttft=[request.first_token_at - start for request in requests])


def run_transformers(twin, threads: int, prompts: torch.Tensor, new_tokens: int, decoder=None) -> dict:
    def work() -> dict:
        start = time.monotonic()
        with torch.inference_mode():
            out = twin.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False, use_cache=True,
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
        return dict(time=time.monotonic() - start, out=out)

    result = in_fresh_thread(threads, work)
    elapsed, out = result["time"], result["out"]
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
    threads = args.threads_used = leave_cores_to_engines()  # every side gets a fresh thread with this many

    ours, theirs = build_models()
    int8 = prepare_weights(copy.deepcopy(ours), "int8")
    compiled = CompiledDecoder(int8, threads=threads)  # built here, before any timing
    vocab = ours.config.vocab_size
    prompts = torch.randint(0, vocab, (args.streams, args.prompt), generator=torch.Generator().manual_seed(0))
    one, many = "batch 1", f"{args.streams} streams"
    settings = {one: prompts[:1], many: prompts}

    with tempfile.TemporaryDirectory(prefix="behemoth-decode-") as tmp:
        f32 = export_f32(ours, Path(tmp))
        files = {"llama.cpp": f32, "llama.cpp q8_0": quantize_q8_0(f32, Path(tmp) / "model-q8_0.gguf")}
        n_ctx = args.prompt + args.new_tokens + 8
        llamas = {(setting, name): LlamaStreams(path, len(batch), n_ctx, args.prompt, threads)
                  for setting, batch in settings.items() for name, path in files.items()}
        try:
            def llama_side(llama: LlamaStreams):
                # A fresh thread too: llama.cpp's OpenMP team would otherwise live on in the main thread.
                return lambda batch, new_tokens: in_fresh_thread(threads, llama.run, batch.tolist(), new_tokens)

            def side(run, model, decoder=None):
                return lambda batch, new_tokens: run(model, threads, batch, new_tokens, decoder)

            engines = {name: side(run_engine, model, decoder) for name, (model, decoder) in
                       {"engine": (ours, None), "engine int8": (int8, None),
                        "engine int8 compiled": (int8, compiled)}.items()}
            hf_side = side(run_transformers, theirs)
            sides = {setting: {**engines, "transformers": hf_side,
                               **{name: llama_side(llamas[setting, name]) for name in files}}
                     for setting in settings}
            results = measure(sides, settings, args.repeats, args.new_tokens)
        finally:
            for llama in llamas.values():
                llama.close()
    quality = int8_quality(ours, int8, prompts, results[many, "engine"][0]["tokens"],
                           results[many, "engine int8"][0]["tokens"], threads)
    report(args, results, one, many, quality)


def int8_quality(ours: Transformer, int8: Transformer, prompts: torch.Tensor, tokens: list[list[int]],
                 int8_tokens: list[list[int]], threads: int) -> dict:
    """How closely int8 weights follow float32 on the float32 engine's own continuations: the
    share of positions where both pick the same next token (teacher-forced), the logit error
    relative to the logits' spread, and how many greedy tokens the two engines share before
    they first differ."""
    def work() -> dict:
        text = torch.cat([prompts, torch.tensor(tokens)], dim=1)
        with torch.inference_mode():
            exact, approx = ours(text).float(), int8(text).float()
        agree = (exact.argmax(-1) == approx.argmax(-1)).float().mean().item()
        error = ((approx - exact).pow(2).mean() / exact.var(dim=-1).mean()).sqrt().item()
        return dict(agree=agree, error=error)

    quality = in_fresh_thread(threads, work)
    shared = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(tokens, int8_tokens)]
    quality["shared_prefix"] = statistics.median(shared)
    return quality


CONFIGS = {  # engine side -> how the table names it
    "engine int8 compiled": "int8 weights, compiled",
    "engine int8": "int8 weights",
    "engine": "float32 weights",
}


def report(args: argparse.Namespace, results: dict, one: str, many: str, quality: dict) -> None:
    rate = {key: rates(r, args.new_tokens) for key, r in results.items()}
    rows = ["| comparison | engine tokens/s (spread) | baseline tokens/s (spread) | ratio (spread) | target | met |",
            "|---|---|---|---|---|---|"]
    figures = [rate_figure(f"decode {setting} tokens/s, {side}", rate[setting, side])
               for setting in (one, many) for side in [*CONFIGS, "transformers"]]
    figures += [rate_figure(f"decode {setting} tokens/s, {side}", rate[setting, side])
                for setting in (one, many) for side in LLAMA_NAMES]
    comparisons = [(f"{setting}: engine ({label}) / transformers (float32)", rate[setting, side],
                    rate[setting, "transformers"], target)
                   for setting, target in ((one, TARGETS["batch 1"]), (many, TARGETS["streams"]))
                   for side, label in CONFIGS.items()]
    comparisons += [(f"{setting}: engine ({CONFIGS[side]}) / llama.cpp ({LLAMA_NAMES[llama]})", rate[setting, side],
                     rate[setting, llama], target)
                    for setting, target in ((one, LLAMA_TARGETS["batch 1"]), (many, LLAMA_TARGETS["streams"]))
                    for side, llama in LLAMA_PAIRS.items()]
    for label, ours, base, target in comparisons:
        row, figure = comparison_row(label, ours, base, target)
        rows.append(row)
        figures.append(figure)

    ttft = {side: statistics.median(r["ttft"][0] for r in results[one, side]) for side in [*CONFIGS, *LLAMA_NAMES]}
    best = "engine int8 compiled"
    ttft_n = statistics.median(statistics.median(r["ttft"]) for r in results[many, best])
    ttft_n_max = statistics.median(max(r["ttft"]) for r in results[many, best])
    ttft_llama = statistics.median(r["ttft"][0] for r in results[many, "llama.cpp q8_0"])
    warnings = token_warnings(results, [(setting, "engine", other) for setting in (one, many)
                                        for other in ("transformers", "llama.cpp")])
    llama_vs_hf = {setting: paired_ratio(rate[setting, "llama.cpp q8_0"], rate[setting, "transformers"])[0]
                   for setting in (one, many)}
    body = "\n".join([
        f"Greedy decoding, `cpu-small` (random weights, seed 0, the same weights on every side), "
        f"{args.threads_used} thread(s) on every side, prompts of {args.prompt} random tokens, "
        f"{args.new_tokens} new tokens per stream, end of text ignored. Engine: the serving `Engine` (continuous "
        f"batching, max_batch_size {args.streams}), all requests submitted together, in three configurations: "
        f"the weights as trained (float32, `behemoth serve`); int8 weight-only (`--weights int8`: per-channel "
        f"int8 projections and experts, bfloat16 LM head; embeddings, norms, router, attention and KV cache in "
        f"float32); "
        f"and int8 with the decode step compiled (`--weights int8 --compile`, built once before timing). "
        f"Transformers: `Llama4ForCausalLM` in float32 (sdpa attention, KV cache) `generate(do_sample=False)` on "
        f"the same prompts as one batch. llama.cpp: llama-cpp-python {llama_cpp_version()} on our own f32 GGUF "
        f"export (`behemoth export --format gguf`) of the same weights, and on llama.cpp's Q8_0 quantisation of it "
        f"(int8 with a scale per 32 values, its counterpart of `--weights int8`), f32 KV cache, every sequence "
        f"decoded together: one `llama_decode` per step with a new token for each sequence (llama.cpp's batched "
        f"API, as its server runs parallel requests), greedy picks in numpy. Every side runs on a fresh thread "
        f"of its own with the same thread count. Tokens/s = new tokens / wall time from submit to the last token "
        f"(prompt included), median of {args.repeats} repeats with the order of the sides rotating; spread = "
        f"(max - min) / median, for a ratio over the per-repeat ratios. Command: "
        f"`.venv/bin/python bench/serve_decode.py`.",
        "", *rows, "",
        "- Time to first token at batch 1: " + ", ".join(
            f"{CONFIGS.get(side, side)} {ttft[side] * 1000:.0f} ms" for side in ttft) +
        f"; with {args.streams} streams submitted together ({CONFIGS[best]}): {ttft_n * 1000:.0f} ms median, "
        f"slowest {ttft_n_max * 1000:.0f} ms; llama.cpp (Q8_0) {ttft_llama * 1000:.0f} ms.",
        f"- llama.cpp itself (Q8_0) against transformers: {llama_vs_hf[one]:.2f}x at {one}, "
        f"{llama_vs_hf[many]:.2f}x with {many}.",
        "- Tokens: " + ("identical on every float32 side in every run." if not warnings else "differ, see below."),
        *warnings,
        f"- int8 against float32 weights, teacher-forced on the float32 engine's {args.streams} continuations: "
        f"the same next token at {quality['agree']:.1%} of positions; logit error {quality['error']:.1%} of the "
        f"logits' standard deviation; greedy outputs share a median of {quality['shared_prefix']:.0f} of "
        f"{args.new_tokens} tokens before they first differ. The weights are random, so the logits are nearly "
        f"tied and the top token flips easily: a trained model is the harder test, and the serving tests bound "
        f"the error on one.",
    ])
    finish(args, SECTION, body, figures, replaces=OLD_SECTION)


def llama_cpp_version() -> str:
    import llama_cpp
    return llama_cpp.__version__


if __name__ == "__main__":
    main()
