"""The matrix products of one decode step, kernel by kernel: how fast decoding could be here.

A decode step of `cpu-small` is a fixed list of matrix products (q/k/v, o, the MLPs, the shared and
routed experts, the LM head) plus small operations. This benchmark times each product of a step
alone, at the row counts a step of 1 and of 16 streams gives it, and a prompt of 512 tokens, with
every kernel torch offers on this CPU:
- float32: `F.linear` on the weights as trained (`behemoth serve`);
- int8: torch's int8 weight-only kernel, bfloat16 activations (`--weights int8`, decode steps);
- int8 cast to bfloat16: the int8 matrix cast to bfloat16 at each call, then one bfloat16
  product (`--weights int8`, prompts from `weights.DEQUANTIZED_ROWS` rows on, on a CPU with native
  bfloat16);
- int8 cast to float32: the same in float32 (the prompts of `--weights int8` on an AVX2-only CPU);
- int8 x int8: `torch._int_mm` on inputs quantised to int8 beforehand (the quantisation is not
  timed: a compiled step would fuse it); not served, as its error is larger (it rounds the
  activations too) and it made a compiled 16-row step at most 1.13x faster (RESULTS.md);
- bfloat16: `F.linear` in bfloat16;
- bfloat16 packed: oneDNN's linear on weights reordered once into its blocked layout (what
  inductor's freezing pass produces; the packed weight is an opaque tensor, so it cannot be an
  input of a compiled program). Only where this CPU's oneDNN runs bfloat16 (not on AVX2-only
  CPUs): elsewhere the column is left out and the report says so.

Summing a step's products gives the time a step spends in products with each kernel, and with the
fastest kernel for each product: a ceiling on decode speed that no scheduling can beat without
faster kernels. The routed experts of a 16-row step are taken as spread evenly (two rows for
each of the eight experts), q, k and v as one product, gate and up as one.

    .venv/bin/python bench/decode_kernels.py [--repeats 7] [--quick] [--no-write]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import Figure, bench_arguments, finish, start, summary  # noqa: E402

from behemoth.config import ModelConfig, preset  # noqa: E402
from behemoth.hardware import choose_paths, detect_cpu  # noqa: E402
from behemoth.inference.weights import DEQUANTIZED_ROWS  # noqa: E402

SECTION = "Decode matrix products: kernel by kernel"
STREAMS = 16
PROMPT = 512


@dataclass(frozen=True)
class Product:
    """`count` products per step of [rows, inputs] by a weight [outputs, inputs]."""

    name: str
    inputs: int
    outputs: int
    rows: int
    count: int


def step_products(config: ModelConfig, rows: int) -> list[Product]:
    """The matrix products of one decode step of `rows` sequences."""
    hidden, head_dim = config.hidden_size, config.head_dim
    layers, moe = config.num_hidden_layers, len(config.moe_layers)
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim
    experts = config.num_local_experts
    picks = rows * config.num_experts_per_tok
    groups = min(picks, experts)  # routed picks spread evenly over the experts
    per_expert = -(-picks // groups)
    return [
        Product("q/k/v", hidden, qkv, rows, layers),
        Product("o", config.num_attention_heads * head_dim, hidden, rows, layers),
        Product("dense MLP gate/up", hidden, 2 * config.intermediate_size_mlp, rows, layers - moe),
        Product("dense MLP down", config.intermediate_size_mlp, hidden, rows, layers - moe),
        Product("shared expert gate/up", hidden, 2 * config.intermediate_size, rows, moe),
        Product("shared expert down", config.intermediate_size, hidden, rows, moe),
        Product(f"routed expert gate/up ({per_expert} row(s) each)", hidden, 2 * config.intermediate_size,
                per_expert, moe * groups),
        Product(f"routed expert down ({per_expert} row(s) each)", config.intermediate_size, hidden,
                per_expert, moe * groups),
        Product("LM head", hidden, config.vocab_size, rows, 1),
    ]


def kernels(product: Product) -> dict[str, Callable[[], torch.Tensor]]:
    """One call of `product` with each kernel, on random data of its shape."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(product.outputs, product.inputs, generator=generator) * product.inputs ** -0.5
    x = torch.randn(product.rows, product.inputs, generator=generator)
    x16, weight16 = x.bfloat16(), weight.bfloat16()
    int8 = (weight / (weight.abs().amax(1, keepdim=True) / 127)).round().to(torch.int8)
    scales = (weight.abs().amax(1) / 127).bfloat16()
    x_int8 = (x / (x.abs().amax(1, keepdim=True) / 127)).round().to(torch.int8)
    calls = {
        "float32": lambda: F.linear(x, weight),
        "int8": lambda: torch.ops.aten._weight_int8pack_mm(x16, int8, scales),
        "int8 cast to bfloat16": lambda: F.linear(x16, int8.to(torch.bfloat16)) * scales,
        "int8 cast to float32": lambda: (F.linear(x16.float(), int8.float()) * scales).bfloat16(),
        "int8 x int8": lambda: torch._int_mm(x_int8, int8.t()),
        "bfloat16": lambda: F.linear(x16, weight16),
    }
    if detect_cpu().onednn_bf16:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight16, product.rows)
        calls["bfloat16 packed"] = lambda: torch.ops.mkldnn._linear_pointwise(x16, packed, None, "none", [], "")
    return calls


def time_call(call: Callable[[], torch.Tensor], seconds: float = 0.02) -> float:
    """Seconds per call: as many calls as fit in about `seconds`, after a warm-up."""
    for _ in range(3):
        call()
    calls = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        call()
        calls += 1
    return elapsed / calls


def measure(products: list[Product], repeats: int) -> dict[tuple[str, str], list[float]]:
    """(product name, kernel) -> seconds per call, one value per repeat; kernels alternate."""
    times: dict[tuple[str, str], list[float]] = {}
    with torch.inference_mode():
        for product in products:
            calls = kernels(product)
            for _ in range(repeats):
                for kernel, call in calls.items():
                    times.setdefault((product.name, kernel), []).append(time_call(call))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench_arguments(parser, repeats=7)
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1
    start(args)
    config = preset("cpu-small")
    sections, figures = [], []
    for rows in (1, STREAMS, PROMPT):
        products = step_products(config, rows)
        times = measure(products, args.repeats)
        body, step_figures = report(products, times, rows)
        sections.append(body)
        figures += step_figures
    intro = (f"`cpu-small`, every matrix product of one decode step (1 and {STREAMS} rows) and of a prompt of "
             f"{PROMPT} tokens timed alone (median of {args.repeats} repeats, kernels alternating; spread = "
             f"(max - min) / median). Per step = time per call x calls per step. int8 x int8 excludes quantising "
             f"the input. Command: `.venv/bin/python bench/decode_kernels.py`.")
    if not detect_cpu().onednn_bf16:
        intro += (" bfloat16 packed: not available, this CPU's oneDNN has no bfloat16 products (it needs "
                  "AVX-512 or AVX-NE-CONVERT).")
    finish(args, SECTION, "\n\n".join([intro, *sections]), figures)


def report(products: list[Product], times: dict[tuple[str, str], list[float]], rows: int
           ) -> tuple[str, list[Figure]]:
    names = list(dict.fromkeys(kernel for _, kernel in times))
    median = {key: statistics.median(values) for key, values in times.items()}
    lines = [f"**{rows} row(s) per step** (microseconds per call; the fastest in bold)", "",
             "| product | shape | calls/step | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    totals = dict.fromkeys(names, 0.0)
    best_total = 0.0
    for product in products:
        cells = [median[product.name, kernel] for kernel in names]
        fastest = min(cells)
        best_total += fastest * product.count
        for kernel, cell in zip(names, cells):
            totals[kernel] += cell * product.count
        lines.append(f"| {product.name} | {product.rows} x {product.inputs} x {product.outputs} | {product.count} | "
                     + " | ".join(f"**{c * 1e6:.1f}**" if c == fastest else f"{c * 1e6:.1f}" for c in cells) + " |")
    lines.append("| **per step** | | | " + " | ".join(f"{totals[k] * 1e3:.2f} ms" for k in names) + " |")
    served = served_int8(products, median, names)
    spread = max(summary(values)[1] for values in times.values())
    lines += ["", f"As `--weights int8` serves ({served[2]}, the LM head in {served[1]}): {served[0] * 1e3:.2f} ms "
                  f"of products per step. Fastest kernel for each product: {best_total * 1e3:.2f} ms, a ceiling of "
                  f"{rows / best_total:,.0f} tokens/s at {rows} row(s) with nothing else in the step (largest "
                  f"spread of any cell: {spread:.0%})."]
    figures = [Figure(f"decode products per step, {rows} row(s), {kernel}", totals[kernel] * 1e3, "ms")
               for kernel in ("float32", "int8")]
    figures.append(Figure(f"decode products per step, {rows} row(s), int8 as served", served[0] * 1e3, "ms"))
    figures.append(Figure(f"decode products per step, {rows} row(s), fastest kernel each", best_total * 1e3, "ms"))
    return "\n".join(lines), figures


def served_int8(products: list[Product], median: dict[tuple[str, str], float], names: list[str]
                ) -> tuple[float, str, str]:
    """Seconds of products per step with the kernels `--weights int8` chooses on this CPU
    (weights.py, hardware.choose_paths): int8 (cast to bfloat16 or float32 from DEQUANTIZED_ROWS
    rows on), the LM head in packed bfloat16 or float32. Also names the kernels."""
    paths = choose_paths(detect_cpu())
    head = paths.lm_head
    cast = f"int8 cast to {str(paths.int8_prompt_dtype).removeprefix('torch.')}"

    def kernel(product: Product) -> str:
        if product.name == "LM head":
            return head
        return cast if product.rows >= DEQUANTIZED_ROWS else "int8"

    seconds = sum(median[p.name, kernel(p)] * p.count for p in products)
    return seconds, head, " and ".join(dict.fromkeys(kernel(p) for p in products if p.name != "LM head"))


if __name__ == "__main__":
    main()
