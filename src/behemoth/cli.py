"""The `behemoth` command: parses arguments and calls library functions, nothing more.

A user's mistake (bad file, bad value) is a BehemothError: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from behemoth.config import PRESETS, ModelConfig, preset
from behemoth.errors import BehemothError, ConfigError
from behemoth.info import describe, model_size
from behemoth.tokenizer import train_tokenizer_from_files


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
    from behemoth.speedrun import speedrun

    report = speedrun(args.out, steps=args.steps, seed=args.seed, overrides=args.set, resume=args.resume)
    print(f"report: {report}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from behemoth.train.config import load_run_config
    from behemoth.train.trainer import pretrain

    overrides = [f"model.preset={args.preset!r}"] if args.preset else []
    if args.data:
        overrides.append(f"data.sources={[str(p) for p in args.data]!r}")
    if args.tokenizer:
        overrides.append(f"data.tokenizer={str(args.tokenizer)!r}")
    if args.steps is not None:
        overrides.append(f"run.steps={args.steps}")
    if args.seed is not None:
        overrides.append(f"run.seed={args.seed}")
    run = load_run_config(args.config, overrides + list(args.set))
    result = pretrain(run, args.out, resume=args.resume)
    print(f"trained {result.steps} steps: loss {result.final_loss:.4f}"
          + (f", validation {result.val_loss:.4f} ({result.val_bpb:.4f} bits/byte)" if result.val_loss else ""))
    print(f"model: {result.model_dir}")
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    tokenizer = train_tokenizer_from_files(args.data, args.vocab_size)
    out = tokenizer.save_pretrained(args.out)
    short = tokenizer.vocab_size < args.vocab_size
    print(f"vocab size      {tokenizer.vocab_size}"
          + (f" (asked for {args.vocab_size}; the data ran out of merges)" if short else ""))
    print(f"trained on      {tokenizer.training_chars:,} characters")
    print(f"sha256          {tokenizer.sha256}")
    print(f"wrote           {out}")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from behemoth.data import prepare
    from behemoth.tokenizer import Tokenizer

    manifest = prepare(args.data, Tokenizer.load(args.tokenizer), args.out, val_fraction=args.val_fraction,
                       seed=args.seed, workers=args.workers, text_field=args.text_field)
    for split in ("train", "val"):
        print(f"{split:<6} {manifest.tokens[split]:>14,} tokens  {manifest.documents[split]:>10,} documents")
    print(f"dtype  {manifest.dtype}, from {len(manifest.sources)} source file(s); wrote {args.out}")
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
        "speedrun", help="the main job: tokenizer, data, pretraining and a report on the embedded corpus",
        description="Train the tokenizer, prepare the data and pretrain cpu-small on the embedded corpus "
                    "(the World English Bible), then write OUT/report.md with the loss curve, expert load and "
                    "samples. About ten minutes on two CPU cores.")
    speedrun.add_argument("--out", type=Path, default=Path("runs/speedrun"), help="output folder (default runs/speedrun)")
    speedrun.add_argument("--steps", type=int, default=400, help="optimizer steps (default 400)")
    speedrun.add_argument("--seed", type=int, default=0)
    speedrun.add_argument("--resume", action="store_true", help="continue a killed speedrun from its last checkpoint")
    speedrun.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="override a run setting, e.g. --set optim.lr=1e-3 (repeatable)")
    speedrun.set_defaults(run=cmd_speedrun)

    pretrain = commands.add_parser(
        "pretrain", help="pretrain a model on text data (resumable)",
        description="Pretrain a preset on text, JSONL or Parquet data (or a prepared data folder). Settings "
                    "come from defaults, then --config FILE (TOML), then flags and --set overrides; all are "
                    "checked before any work starts.")
    pretrain.add_argument("--preset", help="model preset (default cpu-small)")
    pretrain.add_argument("--data", nargs="+", type=Path, metavar="PATH", help="training data sources")
    pretrain.add_argument("--out", type=Path, required=True, metavar="DIR", help="run folder")
    pretrain.add_argument("--steps", type=int, help="optimizer steps in total")
    pretrain.add_argument("--tokenizer", type=Path, metavar="DIR", help="use this tokenizer instead of training one")
    pretrain.add_argument("--seed", type=int)
    pretrain.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    pretrain.add_argument("--config", type=Path, metavar="FILE", help="run configuration (TOML)")
    pretrain.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="override a setting, e.g. --set optim.lr=1e-3 (repeatable)")
    pretrain.set_defaults(run=cmd_pretrain)

    tokenizer = commands.add_parser("tokenizer", help="train the byte-level BPE tokenizer",
                                    description="Tokenizer commands.")
    tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    train = tokenizer_commands.add_parser(
        "train", help="train byte-level BPE on text files and write a Hugging Face tokenizer directory",
        description="Byte-level BPE (GPT-2 split, Llama 4 special tokens and chat template) trained on "
                    ".txt files, .jsonl files with a \"text\" field, or folders of them.")
    train.add_argument("--data", nargs="+", required=True, type=Path, metavar="PATH",
                       help=".txt or .jsonl files, or folders searched recursively for them")
    train.add_argument("--vocab-size", type=int, required=True, metavar="N",
                       help="number of token ids, the 6 special tokens included")
    train.add_argument("--out", type=Path, required=True, metavar="DIR",
                       help="directory for tokenizer.json, tokenizer_config.json, special_tokens_map.json")
    train.set_defaults(run=cmd_tokenizer_train)
    data = commands.add_parser("data", help="prepare token shards for training",
                               description="Data commands.")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    prepare = data_commands.add_parser(
        "prepare", help="tokenize documents into train/val token shards with a manifest",
        description="Read documents (text files split on blank lines or <|endoftext|>, JSONL, Parquet, "
                    "datasets save_to_disk folders), split them into train/val by document, tokenize and "
                    "write train.bin/val.bin, their .idx document offsets and manifest.json.")
    prepare.add_argument("--data", nargs="+", required=True, type=Path, metavar="PATH",
                         help="files or folders of documents")
    prepare.add_argument("--tokenizer", type=Path, required=True, metavar="DIR", help="a tokenizer directory")
    prepare.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    prepare.add_argument("--val-fraction", type=float, default=0.01, metavar="F",
                         help="expected fraction of documents for validation, at least one (default 0.01)")
    prepare.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default 0)")
    prepare.add_argument("--workers", type=int, default=2, metavar="N", help="tokenizing threads (default 2)")
    prepare.add_argument("--text-field", default="text", metavar="NAME",
                         help="JSONL field / Parquet column holding the text (default text)")
    prepare.set_defaults(run=cmd_data_prepare)
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
