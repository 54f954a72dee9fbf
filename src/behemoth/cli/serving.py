"""Serving commands: `serve`, `keys create|revoke|list`, `chat`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from behemoth.cli.parsing import add_command, add_group
from behemoth.errors import ConfigError


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
    guard = None
    if args.guard:
        from behemoth.safety import load_guard

        guard = load_guard(args.guard, args.guard_model, os.environ.get(args.guard_key_env))
    elif args.guard_replies:
        raise ConfigError("--guard-replies needs --guard")
    serve(specs, host=args.host, port=args.port, api_keys=args.api_keys, audit_log=args.audit_log,
          settings=settings, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
          max_context=args.max_context, log_prompts=args.log_prompts, weights=args.weights,
          compile=args.compile, announce=lambda line: print(line, file=sys.stderr, flush=True),
          guard=guard, guard_replies=args.guard_replies, lora_specs=args.lora)
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    from behemoth.serve.keys import Limits, create_key

    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    limits = Limits(requests_per_minute=args.rpm or None, tokens_per_minute=args.tpm or None,
                    token_quota=args.quota or None)  # 0 = unlimited
    key, record = create_key(args.file, args.name, limits, models)
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


def add_serving_commands(commands: argparse._SubParsersAction) -> None:
    serve = add_command(
        commands, "serve", cmd_serve, help="serve models over a keyed OpenAI-compatible API, with a chat page",
        description="Serve one or more model directories (weights + tokenizer) over an OpenAI-compatible API "
                    "(/v1/models, /v1/completions, /v1/chat/completions, SSE streaming), with a chat page at /, "
                    "/health and Prometheus /metrics. Every /v1 route needs an API key from --api-keys (create "
                    "them with `behemoth keys create`); without the file, one temporary key is printed at start.")
    serve.add_argument("--model", action="append", metavar="[NAME=]DIR",
                       help="a model directory, optionally named (repeatable; default name: the folder's)")
    serve.add_argument("--lora", action="append", default=[], metavar="NAME=DIR",
                       help="a LoRA adapter folder (ours or PEFT's) served over the one --model as model NAME, in "
                            "the same engine: requests pick it by their `model` field, rows of different adapters "
                            "share a batch, /v1/models lists it with its parent (repeatable)")
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
    serve.add_argument("--guard", metavar="SPEC",
                       help="screen every request before the model sees it: 'keywords' (harm words), a chat model "
                            "directory trained to refuse (it screens by refusing), or an OpenAI-compatible URL "
                            "asked harmful-or-benign (with --guard-model); a flagged request gets a refusal with "
                            "finish_reason content_filter, audited and counted in /metrics")
    serve.add_argument("--guard-model", metavar="NAME", help="the model name the --guard URL serves")
    serve.add_argument("--guard-key-env", default="BEHEMOTH_GUARD_KEY", metavar="VAR",
                       help="environment variable holding the --guard URL's API key (default BEHEMOTH_GUARD_KEY)")
    serve.add_argument("--guard-replies", action="store_true",
                       help="also screen each non-streamed reply with the guard (streamed ones: the request only)")
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
