"""The MoE layer alone against a dense SwiGLU MLP with the same active parameters.

`behemoth.model.moe.MoE` of cpu-small (8 experts of width 512, top-1, shared expert of width 512)
in training mode, forward + backward on a training-shaped batch (8 x 256 tokens, input gradient
included, as inside a network), against `MLP(hidden, 512 + top_k x 512)`: the same matmul FLOPs
per token except the router's (under 0.3% here). What the ratio measures is the cost of sparsity
itself: routing, sorting, one matmul per expert instead of one for all, scattering back.
The two alternate within one run.

    .venv/bin/python bench/moe_layer.py [--repeats 40] [--quick] [--no-write]
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
from behemoth.model.moe import MLP, MoE  # noqa: E402

SECTION = "MoE layer vs dense MLP"
TARGET = 1.3  # MoE time / dense time, at most


def layers(config) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    moe = MoE(config)
    active_width = config.intermediate_size * (1 + config.num_experts_per_tok)  # shared + top-k routed
    dense = MLP(config.hidden_size, active_width)
    for layer in (moe, dense):
        for param in layer.parameters():
            torch.nn.init.normal_(param, std=config.initializer_range)
    return {"MoE": moe.train(), "dense": dense.train()}


def step_fn(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor):
    def step() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(grad)
    return step


def measure(runs: dict, repeats: int, warmup: int = 3) -> dict[str, list[float]]:
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(repeats):
        for name in (list(runs) if repeat % 2 == 0 else list(reversed(runs))):
            start_time = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start_time)
    return times


def routed_counts(moe: MoE, x: torch.Tensor) -> list[int]:
    """Tokens per expert for this batch (how balanced the measured routing was)."""
    with torch.no_grad():
        logits = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]), moe.router.weight)
        picked = logits.topk(moe.top_k, dim=-1).indices.flatten()
    return torch.bincount(picked, minlength=moe.num_experts).tolist()


def statistics_ms(times: list[float]) -> float:
    return summary(times)[0] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench_arguments(parser, repeats=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    if args.quick:
        args.batch, args.seq, args.repeats = 2, 128, 5
    start(args)

    config = preset("cpu-small")
    modules = layers(config)
    x = torch.randn(args.batch, args.seq, config.hidden_size, generator=torch.Generator().manual_seed(1),
                    requires_grad=True)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    times = measure({name: step_fn(layer, x, grad) for name, layer in modules.items()}, args.repeats)

    rows = ["| layer | median | spread | tokens/s |", "|---|---|---|---|"]
    spread = {}
    for name, ts in times.items():
        median, spread[name] = summary(ts)
        tokens_per_s = x.shape[0] * x.shape[1] / median
        rows.append(f"| {name} | {median * 1000:.1f} ms | {spread[name]:.0%} | {tokens_per_s:,.0f} |")
    ratio, ratio_spread = paired_ratio(times["MoE"], times["dense"])
    met = ratio <= TARGET
    counts = routed_counts(modules["MoE"], x.detach())
    width = config.intermediate_size * (1 + config.num_experts_per_tok)
    body = "\n".join([
        f"`MoE` of `cpu-small` ({config.num_local_experts} experts of width {config.intermediate_size}, top-"
        f"{config.num_experts_per_tok}, shared expert of width {config.intermediate_size}; training mode) against "
        f"a dense SwiGLU `MLP` of width {width} (shared + top-k routed widths: the same active parameters), "
        f"hidden {config.hidden_size}, float32, {torch.get_num_threads()} torch thread(s); forward + backward "
        f"(input gradient included) on {args.batch} x {args.seq} tokens; median of {args.repeats} alternating "
        f"repeats after 3 warm-up ones. Tokens per expert in the measured batch: {counts}. "
        "Command: `.venv/bin/python bench/moe_layer.py`.",
        "", *rows, "",
        f"**Ratio MoE / dense time: {ratio:.2f}x** (spread of the per-repeat ratios {ratio_spread:.0%}; target at "
        f"most {TARGET}x: {'met' if met else 'NOT met'}).",
    ])
    n = args.repeats
    figures = [
        Figure("MoE layer fwd+bwd", statistics_ms(times["MoE"]), "ms", spread["MoE"], runs=n),
        Figure("dense MLP fwd+bwd (same active params)", statistics_ms(times["dense"]), "ms", spread["dense"], runs=n),
        Figure("MoE / dense layer time", ratio, "x", ratio_spread, f"<= {TARGET}x", met, runs=n),
    ]
    finish(args, SECTION, body, figures)


if __name__ == "__main__":
    main()
