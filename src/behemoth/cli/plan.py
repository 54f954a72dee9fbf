"""`behemoth plan`: the capacity planner's command; all arithmetic lives in `behemoth.plan`."""

from __future__ import annotations

import argparse

from behemoth.cli.parsing import add_command
from behemoth.config import PRESETS
from behemoth.plan import PEAK_TFLOPS, PlanInput, format_plan, parse_count, plan


def add_plan_command(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands, "plan", cmd_plan, help="memory per GPU and training time of a model on a cluster (arithmetic only)",
        description="Per-GPU memory (parameters, gradients, AdamW state, FSDP working copies, "
                    "activations) under FSDP2 with expert parallelism, whether it fits, and the step "
                    "and training time from 6 x active params x tokens at the given MFU.")
    # --tokens is text (it takes suffixes) and --preset/--dtype have no `choices`, so bad values
    # reach behemoth.plan and fail there as one BehemothError line naming the flag.
    parser.add_argument("--preset", required=True, metavar="NAME", help=f"model preset ({', '.join(PRESETS)})")
    parser.add_argument("--gpus", type=int, required=True, metavar="N", help="number of GPUs")
    parser.add_argument("--gpu-mem", type=float, required=True, metavar="GB", help="memory per GPU in GiB")
    parser.add_argument("--tokens", metavar="T", help="training tokens, e.g. 30T, 1.5B, 2e12")
    parser.add_argument("--ep", type=int, default=1, metavar="E",
                        help="expert-parallel degree; divides the routed experts and the FSDP degree (default 1)")
    parser.add_argument("--fsdp", type=int, metavar="F",
                        help="FSDP sharding group size; divides --gpus (default all GPUs; fewer = HSDP)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute each decoder layer in backward (keeps only layer inputs)")
    parser.add_argument("--dtype", default="bf16", metavar="bf16|fp8", help="matmul dtype (default bf16)")
    parser.add_argument("--mfu", type=float, default=0.40, metavar="X",
                        help="fraction of peak spent on the 6N FLOPs (default 0.40)")
    parser.add_argument("--peak-tflops", type=float, metavar="X",
                        help=f"peak dense TFLOP/s per GPU (default: H100 SXM, {PEAK_TFLOPS['bf16']:g} bf16, "
                             f"{PEAK_TFLOPS['fp8']:g} fp8)")
    parser.add_argument("--seq-len", type=int, metavar="L",
                        help="tokens per sequence (default 8192, capped at the model's context)")
    parser.add_argument("--micro-batch", type=int, default=1, metavar="B",
                        help="sequences per GPU per step (default 1)")


def cmd_plan(args: argparse.Namespace) -> int:
    tokens = parse_count(args.tokens, "--tokens") if args.tokens is not None else None
    inp = PlanInput(
        model=args.preset, gpus=args.gpus, gpu_mem_gb=args.gpu_mem, tokens=tokens, fsdp=args.fsdp,
        ep=args.ep, activation_checkpointing=args.activation_checkpointing, dtype=args.dtype,
        mfu=args.mfu, peak_tflops=args.peak_tflops, seq_len=args.seq_len, micro_batch=args.micro_batch)
    print(format_plan(plan(inp)))
    return 0
