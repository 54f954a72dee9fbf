"""The `behemoth` command: parses arguments and calls library functions, nothing more.

A user's mistake (bad file, bad value) is a BehemothError: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from behemoth.config import PRESETS, ModelConfig, preset, preset_doc
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
    label, config = resolve_model_config(args.model)
    size = model_size(config, args.seq_len)
    if args.json:
        print(json.dumps({"name": args.model, **size.as_dict(), "config": config.to_hf_dict()}, indent=2))
    else:
        print(describe(label, config, size))
    return 0


def cmd_speedrun(args: argparse.Namespace) -> int:
    # Until the training pipeline lands, the main job shows what each preset costs.
    for name in PRESETS:
        config = preset(name)
        print(describe(f"{name} (preset)", config, model_size(config)))
        print(f"  about                {preset_doc(name)}\n")
    print("Training stages (tokenizer, data, pretraining, report) are not built yet; see the issues.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="behemoth", description="Train, evaluate, gate and release Llama 4 style MoE models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser(
        "info", help="parameter counts and FLOPs of a preset or model directory",
        description="Total and active parameters and forward FLOPs per token, computed from the config "
                    "alone (no weights are allocated).")
    info.add_argument("model", metavar="PRESET_OR_DIR", help=f"a preset ({', '.join(PRESETS)}) or a model directory")
    info.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    info.add_argument("--seq-len", type=int, default=None,
                      help="sequence length for attention FLOPs (default 2048, capped at the model's context)")
    info.set_defaults(run=cmd_info)

    speedrun = commands.add_parser(
        "speedrun", help="the main job: end-to-end run on the embedded corpus",
        description="For now: a summary of every preset. The training pipeline will run here.")
    speedrun.set_defaults(run=cmd_speedrun)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BehemothError as err:
        print(f"behemoth: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("behemoth: interrupted", file=sys.stderr)
        return 130
