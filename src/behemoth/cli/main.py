"""The `behemoth` command: parses arguments and calls library functions, nothing more. The other
commands live in the modules beside this one; this one holds `info`, `speedrun` and the entry point.
A user's mistake (bad file, bad value) is a BehemothError: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

from behemoth import __version__
from behemoth.cli.evaluation import add_eval_commands
from behemoth.cli.parsing import add_command
from behemoth.cli.plan import add_plan_command
from behemoth.cli.release import add_release_commands
from behemoth.cli.serving import add_serving_commands
from behemoth.cli.training import add_training_commands
from behemoth.config import PRESETS, ModelConfig, preset
from behemoth.data.synthetic_chat import SAFETY_SHARE
from behemoth.errors import BehemothError, ConfigError
from behemoth.info import describe, model_size


def resolve_model_config(name_or_path: str) -> tuple[str, ModelConfig]:
    """A preset name, a model directory or a config.json file -> (label, config)."""
    path = Path(name_or_path)
    if path.exists():
        return str(path), ModelConfig.load(path)
    if name_or_path in PRESETS:
        return f"{name_or_path} (preset)", preset(name_or_path)
    raise ConfigError(f"{name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a model directory")


def cmd_info(args: argparse.Namespace) -> int:
    if args.machine:
        from behemoth.hardware import choose_paths, describe_machine, detect_cpu

        cpu = detect_cpu()
        print(json.dumps({"cpu": cpu.as_dict(), "paths": choose_paths(cpu).as_dict()}, indent=2) if args.json
              else describe_machine(cpu))
        return 0
    if args.model is None:
        raise ConfigError("info needs a preset or model directory (or --machine)")
    label, config = resolve_model_config(args.model)
    size = model_size(config, args.seq_len)
    info = {"name": args.model, **size.as_dict(), "config": config.to_hf_dict()}
    print(json.dumps(info, indent=2) if args.json else describe(label, config, size))
    return 0


def cmd_speedrun(args: argparse.Namespace) -> int:
    from behemoth.speedrun import speedrun

    report = speedrun(args.out, minutes=args.minutes, seed=args.seed, overrides=args.set, resume=args.resume,
                      previous=args.previous, approve_as=args.approve_as, fit_to_machine=args.fit_to_machine,
                      safety_share=args.safety_share)
    print(f"report: {report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="behemoth", description="Train, evaluate, gate and release Llama 4 style MoE models.")
    parser.add_argument("--version", action="version", version=f"behemoth {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = add_command(
        commands, "info", cmd_info,
        help="parameter counts and FLOPs of a preset or model directory; --machine: this CPU's fast paths",
        description="Total and active parameters and forward FLOPs per token, computed from the config "
                    "alone (no weights are allocated). With --machine: what this CPU offers (AVX2, AVX-512, "
                    "AVX-512 BF16, AMX) and which kernels serving and training choose from it.")
    info.add_argument("model", metavar="PRESET_OR_DIR", nargs="?",
                      help=f"a preset ({', '.join(PRESETS)}) or a model directory")
    info.add_argument("--machine", action="store_true",
                      help="print this machine's CPU features and the fast paths chosen from them")
    info.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    info.add_argument("--seq-len", type=int, default=None,
                      help="sequence length for attention FLOPs (default 2048, capped at the model's context)")

    speedrun = add_command(
        commands, "speedrun", cmd_speedrun,
        help="the main job: teacher, distilled student, SFT, RL, DPO and a report, on the embedded corpus",
        description="Pretrain cpu-small on the embedded corpus (the World English Bible), distil it into "
                    "cpu-mini, post-train that as Llama 4 is (SFT on generated chat data, online RL with "
                    "verifiable rewards, DPO) into the chat model OUT/dpo/model, evaluate every stage (the chat "
                    "model on held-out chat tasks), run the release gate on teacher, student and chat model "
                    "under the default policy, and write OUT/report.md. The stages share the --minutes budget.")
    speedrun.add_argument("--out", type=Path, default=Path("runs/speedrun"), help="output folder (default runs/speedrun)")
    speedrun.add_argument("--minutes", type=float, default=10.0,
                          help="time budget the stages share, at the reference 2-core machine's speed (default 10)")
    speedrun.add_argument("--fit-to-machine", action="store_true",
                          help="plan steps from this machine's measured speed (fits the budget here; results "
                               "then vary with the machine) instead of the reference speed (same results everywhere)")
    speedrun.add_argument("--seed", type=int, default=0)
    speedrun.add_argument("--resume", action="store_true", help="continue a killed speedrun where it stopped")
    speedrun.add_argument("--previous", type=Path, metavar="DIR",
                          help="an earlier speedrun's folder: the report gives a verdict against its teacher, and "
                               "the release gate treats its models as the last release")
    speedrun.add_argument("--approve-as", metavar="NAME",
                          help="sign the release decisions off as NAME and publish them (an open bundle or a "
                               "closed registration each, as the policy decided); without it they wait for approval")
    speedrun.add_argument("--safety-share", type=float, default=SAFETY_SHARE, metavar="F",
                          help=f"share of the chat data that teaches refusing harmful requests and answering benign "
                               f"look-alikes (default {SAFETY_SHARE}; 0 leaves it out, to see what the gate makes "
                               f"of a chat model trained without it)")
    speedrun.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="override a run setting in every stage, e.g. --set optim.grad_clip=0.5 (repeatable)")
    for add_commands in (add_training_commands, add_serving_commands, add_eval_commands, add_release_commands,
                         add_plan_command):
        add_commands(commands)
    return parser


def entry(argv: list[str] | None = None) -> NoReturn:
    """`behemoth` and `python -m behemoth` (which torchrun launches): `main`, then exit; a distributed
    process ends without interpreter finalization (see `behemoth.distributed.mesh.exit_if_distributed`)."""
    code = main(argv)
    if "torch.distributed" in sys.modules:  # a command that never imported torch never joined a group
        from behemoth.distributed.mesh import exit_if_distributed
        exit_if_distributed(code)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BehemothError as err:
        print(f"behemoth: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `behemoth info ... | head`
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print("behemoth: interrupted", file=sys.stderr)
        return 130
