"""Run every performance benchmark, one process at a time, and summarise them (`make bench`).

    .venv/bin/python bench/run_all.py                 # full run, rewrites bench/RESULTS.md (~10-12 min)
    .venv/bin/python bench/run_all.py --quick         # smoke run of everything, writes nothing
    .venv/bin/python bench/run_all.py --only moe_layer --only serve_decode
    .venv/bin/python bench/run_all.py --list

Each benchmark runs in a fresh process, sequentially, never two at once (they would share the
cores and measure each other), with the same thread count (--threads, default all cores) for
torch, BLAS and the tokenizer's thread pool. Each one measures its own comparisons side by side
and writes its own section of RESULTS.md; this driver collects their figures, each child's peak
memory (ru_maxrss) and wall time, prints a summary table, and, on a full run of every benchmark,
writes that table as the first section of RESULTS.md.

The long quality benchmarks (moe_vs_dense.py, distill_vs_scratch.py: about an hour;
bf16_vs_f32.py: about 25 minutes) are not performance benchmarks and are run by hand.

This module never imports torch before the children have run: a child's ru_maxrss counts the
parent's memory at the moment it was started (see common.run_measured).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import Figure, run_measured, write_section  # noqa: E402

HERE = Path(__file__).parent
SUMMARY = "Summary (`make bench`)"


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    what: str
    minutes: float  # expected wall time of the full run on the 2-core machine, for the plan printed first
    repeats: str  # what the full run repeats, as the summary states it

    @property
    def script(self) -> Path:
        return HERE / f"{self.name}.py"


BENCHMARKS = [
    Benchmark("model_step", "training step (fwd + bwd + AdamW) vs transformers, MFU", 2.0,
              "9 alternating repeats of batch 8 x 256, matmul peak before each"),
    Benchmark("moe_layer", "MoE layer vs dense MLP of the same active parameters", 0.5,
              "40 alternating repeats of 8 x 256 tokens"),
    Benchmark("decode_kernels",
              "every matrix product of a decode step (1 and 16 rows) and of a prompt with every kernel", 0.5,
              "7 alternating repeats of each product"),
    Benchmark("serve_decode", "decode: engine (float32, int8, int8 compiled) vs transformers and llama.cpp", 3.0,
              "5 repeats, sides in rotating order, 96 new tokens per stream"),
    Benchmark("offline_batch", "offline generation: 256 answers at batch 32 vs one prompt at a time", 1.5,
              "3 alternating repeats of 256 prompts, up to 32 new tokens each"),
    Benchmark("pipeline_throughput", "tokenizer, data prepare, training loop tokens/s and MFU", 1.5,
              "5 repeats of the tokenizer and data stages; steps 4-30 of one training run"),
    Benchmark("peak_memory", "peak RSS of a training run and of serving 16 streams", 2.0,
              "3 fresh processes of each kind"),
    Benchmark("serve_load", "load test of `behemoth serve`: 64 clients, 2,000 requests", 3.5,
              "3 runs of 2,000 requests against one server"),
]


def child_env(threads: int) -> dict[str, str]:
    """The same thread count for every pool a benchmark may use: torch (OpenMP), BLAS, and the
    tokenizers library (rayon)."""
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
        env[name] = str(threads)
    return env


def run_one(bench: Benchmark, args: argparse.Namespace, work: Path) -> dict:
    """Run one benchmark to its end; its exit code, time, peak memory and figures."""
    out = work / f"{bench.name}.json"
    argv = [sys.executable, str(bench.script), "--threads", str(args.threads), "--json", str(out)]
    argv += ["--quick"] if args.quick else []
    argv += ["--write"] if args.write else []
    argv += ["--no-write"] if not writes(args) else []
    timeout = (3 if args.quick else 4 * bench.minutes + 10) * 60
    code, seconds, peak_mib = run_measured(argv, child_env(args.threads), timeout=timeout)
    figures = [Figure(**f) for f in json.loads(out.read_text())] if code == 0 and out.exists() else []
    return dict(bench=bench, code=code, seconds=seconds, peak_mib=peak_mib, figures=figures)


def writes(args: argparse.Namespace) -> bool:
    return args.write or not (args.quick or args.no_write)


def figure_rows(results: list[dict]) -> list[str]:
    rows = ["| benchmark | figure | median | spread | runs | target | met |", "|---|---|---|---|---|---|---|"]
    for result in results:
        if result["code"] != 0:
            rows.append(f"| {result['bench'].name} | **FAILED (exit code {result['code']})** | | | | | |")
        for f in result["figures"]:
            spread = "" if f.spread is None else f"{f.spread:.0%}"
            met = "" if f.met is None else ("yes" if f.met else "**no**")
            rows.append(f"| {result['bench'].name} | {f.name} | {f.shown()} | {spread} | {f.runs or ''} | "
                        f"{f.target or ''} | {met} |")
    return rows


def process_rows(results: list[dict]) -> list[str]:
    # wait4's ru_maxrss covers the benchmark's process and the children it waited for: the peak of
    # the largest one (the server of serve_load, a training child of peak_memory).
    rows = ["| benchmark | what | full-run repeats | wall time | peak RSS (largest process) | status |",
            "|---|---|---|---|---|---|"]
    for r in results:
        status = "ok" if r["code"] == 0 else f"**failed ({r['code']})**"
        rows.append(f"| {r['bench'].name} | {r['bench'].what} | {r['bench'].repeats} | {r['seconds']:.0f} s | "
                    f"{r['peak_mib']:,.0f} MiB | {status} |")
    return rows


def summary_body(results: list[dict], args: argparse.Namespace, total_s: float) -> str:
    targets = [f for r in results for f in r["figures"] if f.met is not None]
    met = sum(f.met for f in targets)
    return "\n".join([
        f"`make bench` (`.venv/bin/python bench/run_all.py`): every performance benchmark in its own process, one "
        f"after the other, {args.threads} thread(s) each; {total_s / 60:.1f} minutes in all. Medians over the runs "
        f"shown; spread = (max - min) / median (for a ratio: over the per-repeat ratios of side-by-side "
        f"measurements). Targets met: **{met} of {len(targets)}**. Details in each benchmark's section below.",
        "", *figure_rows(results), "", *process_rows(results),
    ])


def parse_args() -> argparse.Namespace:
    names = [b.name for b in BENCHMARKS]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes; writes nothing unless --write")
    parser.add_argument("--write", action="store_true", help="write RESULTS.md even with --quick")
    parser.add_argument("--no-write", action="store_true", help="full run that leaves RESULTS.md alone")
    parser.add_argument("--only", action="append", choices=names, metavar="NAME",
                        help=f"run only this benchmark (repeatable): {', '.join(names)}")
    parser.add_argument("--threads", type=int, help="threads per benchmark (default: all cores; 1 with --quick)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args()
    args.threads = args.threads or (1 if args.quick else os.cpu_count() or 1)
    return args


def main() -> None:
    args = parse_args()
    if args.list:
        for b in BENCHMARKS:
            print(f"{b.name:<20} ~{b.minutes:>4.1f} min  {b.what}")
        return
    chosen = [b for b in BENCHMARKS if not args.only or b.name in args.only]
    if not args.quick:
        print(f"{len(chosen)} benchmark(s), about {sum(b.minutes for b in chosen):.0f} minutes", file=sys.stderr)
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="behemoth-bench-") as tmp:
        for i, bench in enumerate(chosen, 1):
            print(f"\n=== [{i}/{len(chosen)}] {bench.name}: {bench.what}", file=sys.stderr, flush=True)
            results.append(run_one(bench, args, Path(tmp)))
            r = results[-1]
            print(f"=== {bench.name}: exit {r['code']}, {r['seconds']:.0f} s, peak {r['peak_mib']:.0f} MiB",
                  file=sys.stderr, flush=True)
    body = summary_body(results, args, time.perf_counter() - started)
    print("\n" + body)
    if writes(args) and not args.only:  # a partial run would replace the summary with part of it
        write_section(SUMMARY, body, first=True, threads=args.threads)
    if any(r["code"] != 0 for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
