"""Training commands: `pretrain`, `distill`, `sft`, `rl`, `dpo`, `tokenizer train`, `data ...`,
`consolidate`, `merge`. Each parses its flags and calls one library function."""

from __future__ import annotations

import argparse
from pathlib import Path

from behemoth.cli.parsing import add_command, add_group
from behemoth.config import PRESETS
from behemoth.data.synthetic_chat import SAFETY_SHARE
from behemoth.errors import ConfigError


def cmd_pretrain(args: argparse.Namespace) -> int:
    from behemoth.train.trainer import pretrain

    extra = [f"data.sources={[str(p) for p in args.data]!r}"] if args.data else []
    if args.tokenizer:
        extra.append(f"data.tokenizer={str(args.tokenizer)!r}")
    _print_result(pretrain(_run_config(args, extra, stage="pretrain"), args.out, resume=args.resume))
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from behemoth.tokenizer import train_tokenizer_from_files

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


def cmd_data_example_chat(args: argparse.Namespace) -> int:
    from behemoth.data.synthetic_chat import write_chat_data

    for flag in ("conversations", "prompts", "pairs"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    data = write_chat_data(args.out, conversations=args.conversations, pairs=args.pairs, prompts=args.prompts,
                           seed=args.seed, safety=args.safety_share)
    for path, what in ((data.sft, "SFT conversations"), (data.rl, "RL prompts"), (data.dpo, "DPO pairs")):
        print(f"{path}  ({what})")
    return 0


def _run_config(args: argparse.Namespace, extra: list[str] | None = None, stage: str | None = None):
    """Defaults <- the stage's own defaults <- --config TOML <- common flags <- --set overrides; with
    --resume on an existing run, its saved config.toml takes the place of the defaults."""
    from behemoth.train.config import load_run_config, resume_run_config

    overrides = list(extra or [])
    if getattr(args, "preset", None):
        if args.preset not in PRESETS:  # named here: the error is about the flag the user typed
            raise ConfigError(f"--preset {args.preset!r} is unknown (known: {', '.join(PRESETS)})")
        overrides.append(f"model.preset={args.preset!r}")
    if getattr(args, "steps", None) is not None:
        if args.steps < 1:
            raise ConfigError(f"--steps must be at least 1, got {args.steps}")
        overrides.append(f"run.steps={args.steps}")
    if getattr(args, "seed", None) is not None:
        overrides.append(f"run.seed={args.seed}")
    if args.resume and (args.out / "config.toml").is_file():
        return resume_run_config(args.out, args.config, overrides + list(args.set))
    return load_run_config(args.config, overrides + list(args.set), stage=stage)


def _print_result(result) -> None:
    from behemoth.distributed.mesh import is_main_process

    if not is_main_process():  # under torchrun, one summary for the whole job
        return
    numbers = ", ".join(f"{k} {v:.4f}" for k, v in result.validation.items())
    print(f"trained {result.steps} steps: loss {result.final_loss:.4f}" + (f"; {numbers}" if numbers else ""))
    print(f"model: {result.model_dir}")
    if result.adapter_dir is not None:
        print(f"adapter: {result.adapter_dir}")


def cmd_distill(args: argparse.Namespace) -> int:
    from behemoth.train.distill import distill

    run = _run_config(args, [f"data.sources={[str(p) for p in args.data]!r}"], stage="distill")
    _print_result(distill(run, args.teacher, args.out, resume=args.resume))
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from behemoth.train.sft import sft

    _print_result(sft(_run_config(args, stage="sft"), args.model, args.data, args.out, resume=args.resume))
    return 0


def cmd_rl(args: argparse.Namespace) -> int:
    from behemoth.train.rl import rl

    run = _run_config(args, stage="rl")
    _print_result(rl(run, args.model, args.data, args.out, resume=args.resume, reward=args.reward))
    return 0


def cmd_dpo(args: argparse.Namespace) -> int:
    from behemoth.train.dpo import dpo

    _print_result(dpo(_run_config(args, stage="dpo"), args.model, args.data, args.out, resume=args.resume))
    return 0


def cmd_consolidate(args: argparse.Namespace) -> int:
    from behemoth.checkpoint import DTYPES
    from behemoth.distributed import consolidate

    print(f"model: {consolidate(args.checkpoint, args.out, dtype=DTYPES[args.dtype] if args.dtype else None)}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from behemoth.export.merge import merge_adapter

    print(f"model: {merge_adapter(args.model, args.adapter, args.out, overwrite=args.overwrite)}")
    return 0


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="run folder")
    parser.add_argument("--steps", type=int, help="optimizer steps in total")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint in --out (written by any number of "
                             "processes), with the settings saved in its config.toml: flags given again must "
                             "agree, except --steps, which may extend the run")
    parser.add_argument("--config", type=Path, metavar="FILE", help="run configuration (TOML)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set optim.lr=1e-3 (repeatable)")


def _add_post_training(commands: argparse._SubParsersAction, name: str, run, data_help: str,
                       **options) -> argparse.ArgumentParser:
    """A post-training subcommand: the model directory to start from, a data file, the run flags."""
    parser = add_command(commands, name, run, **options)
    parser.add_argument("--model", type=Path, required=True, metavar="DIR", help="model directory to start from")
    parser.add_argument("--data", type=Path, required=True, metavar="FILE", help=data_help)
    _add_run_flags(parser)
    return parser


def add_training_commands(commands: argparse._SubParsersAction) -> None:
    pretrain = add_command(
        commands, "pretrain", cmd_pretrain, help="pretrain a model on text data (resumable)",
        description="Pretrain a preset on text, JSONL or Parquet data (or a prepared data folder). Settings "
                    "come from defaults, then --config FILE (TOML), then flags and --set overrides; all are "
                    "checked before any work starts.")
    pretrain.add_argument("--preset", help="model preset (default cpu-small)")
    pretrain.add_argument("--data", nargs="+", type=Path, metavar="PATH", help="training data sources")
    pretrain.add_argument("--tokenizer", type=Path, metavar="DIR", help="use this tokenizer instead of training one")
    _add_run_flags(pretrain)

    distill = add_command(
        commands, "distill", cmd_distill, help="train a student from a teacher's soft targets and the data",
        description="loss = a(t) * KL(teacher || student at temperature T) * T^2 + (1 - a(t)) * cross-entropy; "
                    "a(t) per [distill] alpha_schedule (constant, linear, cosine, adaptive). The student uses "
                    "the teacher's tokenizer.")
    distill.add_argument("--teacher", type=Path, required=True, metavar="DIR", help="teacher model directory")
    distill.add_argument("--preset", help="student preset (default cpu-small; override fields with --set model.X=...)")
    distill.add_argument("--data", nargs="+", type=Path, required=True, metavar="PATH", help="training data sources")
    _add_run_flags(distill)

    _add_post_training(
        commands, "sft", cmd_sft, "conversations (JSONL)",
        help="supervised fine-tuning on conversations (loss on assistant tokens only)",
        description="Fine-tune a model directory on JSONL conversations: {\"messages\": [{\"role\", \"content\"}]} "
                    "rows, or Alpaca instruction/input/output rows.")
    rl = _add_post_training(
        commands, "rl", cmd_rl, "prompts with answers (JSONL)",
        help="online RL with verifiable rewards (GRPO, Dr. GRPO, DAPO; settings in [rl])",
        description="Sample rl.num_generations completions per prompt with the current weights, reward each "
                    "(the row's answer checked, or --reward), and train on reward minus its group's mean. Rows: "
                    "{\"prompt\": text or messages, \"answer\", \"match\": exact|number|contains|choice}.")
    rl.add_argument("--reward", metavar="MODULE:FUNCTION",
                    help="score completions with function(prompts=, completions=, completion_ids=, **row fields) "
                         "-> one float (or None: unscored) per completion, instead of checking answers")
    _add_post_training(
        commands, "dpo", cmd_dpo, "preference pairs (JSONL)",
        help="direct preference optimisation on prompt/chosen/rejected pairs",
        description="DPO against the starting model, whose answer log-probabilities are computed once and "
                    "kept in the run folder. Rows: {\"prompt\", \"chosen\", \"rejected\"} as text or messages.")

    tokenizer_commands = add_group(commands, "tokenizer", help="train the byte-level BPE tokenizer",
                                   description="Tokenizer commands.")
    train = add_command(
        tokenizer_commands, "train", cmd_tokenizer_train,
        help="train byte-level BPE on text files and write a Hugging Face tokenizer directory",
        description="Byte-level BPE (GPT-2 split, Llama 4 special tokens and chat template) trained on "
                    ".txt files, .jsonl files with a \"text\" field, or folders of them.")
    train.add_argument("--data", nargs="+", required=True, type=Path, metavar="PATH",
                       help=".txt or .jsonl files, or folders searched recursively for them")
    train.add_argument("--vocab-size", type=int, required=True, metavar="N",
                       help="number of token ids, the 6 special tokens included")
    train.add_argument("--out", type=Path, required=True, metavar="DIR",
                       help="directory for tokenizer.json, tokenizer_config.json, special_tokens_map.json")
    data_commands = add_group(commands, "data", help="prepare token shards for training; example chat data",
                              description="Data commands.")
    prepare = add_command(
        data_commands, "prepare", cmd_data_prepare,
        help="tokenize documents into train/val token shards with a manifest",
        description="Read documents (text files split on blank lines or <|endoftext|>, JSONL, Parquet, "
                    "datasets save_to_disk folders), split them into train/val by document, tokenize and "
                    "write train.bin/val.bin, their .idx document offsets and manifest.json.")
    prepare.add_argument("--data", nargs="+", required=True, type=Path, metavar="PATH",
                         help="files or folders of documents")
    prepare.add_argument("--tokenizer", type=Path, required=True, metavar="DIR", help="a tokenizer directory")
    prepare.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    prepare.add_argument("--val-fraction", type=float, default=0.02, metavar="F",
                         help="expected fraction of documents for validation, at least one (default 0.02, "
                              "as data.val_fraction of training runs)")
    prepare.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default 0)")
    prepare.add_argument("--workers", type=int, default=2, metavar="N", help="tokenizing threads (default 2)")
    prepare.add_argument("--text-field", default="text", metavar="NAME",
                         help="JSONL field / Parquet column holding the text (default text)")
    example = add_command(
        data_commands, "example-chat", cmd_data_example_chat,
        help="write example post-training data: sft.jsonl, rl.jsonl, dpo.jsonl",
        description="Generate the project's own chat tasks (adding numbers, the next number, repeating "
                    "and reversing words) as SFT conversations, RL prompts with answers and DPO preference "
                    "pairs, from the training half of the problems (`behemoth eval --tasks chat` scores "
                    "the held-out half), plus refusals of harmful requests and answers to benign look-alikes "
                    "(`--tasks refusal,overrefusal` measures them). The speedrun trains on the same data.")
    example.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    example.add_argument("--conversations", type=int, default=8000, metavar="N", help="SFT rows (default 8000)")
    example.add_argument("--prompts", type=int, default=2000, metavar="N", help="RL rows (default 2000)")
    example.add_argument("--pairs", type=int, default=2000, metavar="N", help="DPO rows (default 2000)")
    example.add_argument("--safety-share", type=float, default=SAFETY_SHARE, metavar="F",
                         help=f"share of SFT rows and DPO pairs that teach refusing harmful requests and answering "
                              f"benign look-alikes (default {SAFETY_SHARE}; 0 leaves them out)")
    example.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    consolidate = add_command(
        commands, "consolidate", cmd_consolidate,
        help="turn a distributed (multi-process) checkpoint into a model directory",
        description="Gather the weights of checkpoints/step-N of a multi-process run into one Hugging Face "
                    "model directory, with its tokenizer, in one process.")
    consolidate.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="a checkpoints/step-N folder")
    consolidate.add_argument("--out", type=Path, required=True, metavar="DIR", help="model directory to write")
    consolidate.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: as trained")
    merge = add_command(
        commands, "merge", cmd_merge, help="merge a LoRA adapter into its base: a plain model directory",
        description="Add the adapters of an adapter directory (a LoRA run's OUT/adapter, or a checkpoint's "
                    "adapter/) into the weights of the base model they were trained on, and write the result "
                    "as a model directory that loads wherever the base does. The adapter must fit the base's "
                    "shapes and its recorded base checksum; nothing is written otherwise.")
    merge.add_argument("--model", type=Path, required=True, metavar="DIR", help="the base model directory")
    merge.add_argument("--adapter", type=Path, required=True, metavar="DIR",
                       help="adapter directory (adapter_model.safetensors + adapter_config.json)")
    merge.add_argument("--out", type=Path, required=True, metavar="DIR", help="model directory to write")
    merge.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
