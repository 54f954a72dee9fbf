"""Release commands: `gate`, `release approve|publish|verify-log`, `export` (behemoth.release, .export)."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from behemoth.cli.parsing import add_command, add_group
from behemoth.errors import ConfigError

GGUF_DTYPES = ("f32", "f16", "q8_0")  # export.gguf's, named here so that --help imports no torch


def cmd_gate(args: argparse.Namespace) -> int:
    from behemoth.release.gate import RECORD_FILE, run_gate

    variables = {}
    for item in args.var:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--var {item!r}: expected NAME=VALUE")
        variables[name] = value
    record = run_gate(args.model, args.policy, args.out, baseline=args.baseline, variables=variables, log=args.log,
                      kind=args.kind, adapter=args.adapter)
    print(f"decision: {record['decision']} (rule {record['rule']}: {record['reason']})")
    print(f"record: {Path(args.out) / RECORD_FILE} (takes effect after `behemoth release approve {args.out} --by NAME`)")
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    from behemoth.release.publish import approve

    entry = approve(args.record, args.by, log=args.log)
    print(f"approved: {entry['decision']} decision {entry['record_sha256'][:16]}... by {entry['by']} "
          f"(audit log entry {entry['seq']})")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from behemoth.release.publish import publish

    entry = publish(args.record, args.out, log=args.log, registry=args.registry, name=args.name,
                    gguf_dtype=args.gguf_dtype)
    if entry["decision"] == "open":
        print(f"published openly: {entry['location']}")
    else:
        print(f"released closed: {entry['name']} in {entry['location']}, registered in {entry['registry']} "
              f"(serve it with `behemoth serve --registry {entry['registry']} --api-keys FILE`)")
    return 0


def cmd_verify_log(args: argparse.Namespace) -> int:
    from behemoth.release.audit import read_entries, verify_log

    head = verify_log(args.log, expect_head=args.expect_head)
    counts = Counter(entry["event"] for entry in read_entries(args.log))
    plural = {"publish": "publishes"}
    summary = ", ".join(f"{n} {event if n == 1 else plural.get(event, event + 's')}"
                        for event, n in counts.items()) or "empty"
    print(f"{args.log}: intact, {head.entries} entries ({summary}); head {head.sha256}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if (args.adapter is None) != (args.format != "gguf-lora"):
        raise ConfigError("--adapter goes with --format gguf-lora (the adapter's GGUF; --model is its base)")
    if args.format == "gguf-lora":
        from behemoth.export.gguf import export_gguf_lora

        path = export_gguf_lora(args.model, args.adapter, args.out, overwrite=args.overwrite)
    elif args.format == "hf":
        from behemoth.export.hf import export_hf

        path = export_hf(args.model, args.out, overwrite=args.overwrite)
    else:
        from behemoth.export.gguf import export_gguf

        path = export_gguf(args.model, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


def add_release_commands(commands: argparse._SubParsersAction) -> None:
    from behemoth.release.gate import DEFAULT_LOG

    gate = add_command(
        commands, "gate", cmd_gate, help="decide open, closed or hold for a model under a release policy",
        description="Run the policy's evaluations on the model (and on --baseline, the last release), apply its "
                    "rules in order, and write a decision record (decision.json, decision.md, evals/) to --out. "
                    "The decision is appended to the audit log and takes effect only after "
                    "`behemoth release approve`. Policy format: docs/RELEASE.md.")
    gate.add_argument("--model", type=Path, required=True, metavar="DIR", help="the candidate model directory")
    gate.add_argument("--policy", type=Path, metavar="FILE", help="release policy (TOML; default: the shipped one)")
    gate.add_argument("--adapter", type=Path, metavar="DIR",
                      help="gate this LoRA adapter over --model (its base): the merged model is evaluated, the record "
                           "names both, and the base is the baseline unless --baseline says otherwise")
    gate.add_argument("--baseline", type=Path, metavar="DIR", help="the last released model, for the regression verdict")
    gate.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                      help="a value for ${NAME} in the policy's task lists, e.g. --var heldout=val.txt (repeatable)")
    gate.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the decision record (new)")
    gate.add_argument("--log", type=Path, default=DEFAULT_LOG, metavar="FILE",
                      help=f"the audit log (default {DEFAULT_LOG})")
    gate.add_argument("--kind", choices=("chat", "base"), default="chat",
                      help="what the model is (default chat): the policy's chat-only evaluations (refusals of "
                           "harmful requests, in the default policy) are not run on a base model")

    release_commands = add_group(commands, "release",
                                 help="approve and publish gate decisions; check the audit log",
                                 description="Sign-off, publication and the audit log of release decisions.")
    approve = add_command(
        release_commands, "approve", cmd_approve, help="sign off a decision record (appended to the audit log)",
        description="Record that NAME approved the decision in RECORD. Refused if the record was edited after "
                    "the gate wrote it, is already approved, or the audit log is damaged.")
    approve.add_argument("record", type=Path, metavar="RECORD", help="the gate's --out folder (or its decision.json)")
    approve.add_argument("--by", required=True, metavar="NAME", help="who approves")
    approve.add_argument("--log", type=Path, metavar="FILE", help="the audit log (default: the one the record names)")

    publish = add_command(
        release_commands, "publish", cmd_publish,
        help="carry out an approved decision: an open bundle, or a closed served model",
        description="open: write a bundle to --out (Hugging Face files, GGUF, model card, the record, a SHA-256 "
                    "manifest). closed: copy the model into a private release folder and register it for "
                    "`behemoth serve --registry`. Refused without approval, for hold, and over an existing release.")
    publish.add_argument("record", type=Path, metavar="RECORD", help="the gate's --out folder (or its decision.json)")
    publish.add_argument("--out", type=Path, metavar="DIR",
                         help="open: the bundle folder (required, new); closed: the release folder "
                              "(default: closed/NAME beside the audit log)")
    publish.add_argument("--registry", type=Path, metavar="FILE",
                         help="closed: the registry file (default: registry.json beside the audit log)")
    publish.add_argument("--name", metavar="NAME",
                         help="release name (default: the model's run folder, e.g. mine for runs/mine/model)")
    publish.add_argument("--gguf-dtype", choices=GGUF_DTYPES, default="f16",
                         help="open: precision of the GGUF file (default f16; q8_0 for llama.cpp's 8-bit)")
    publish.add_argument("--log", type=Path, metavar="FILE", help="the audit log (default: the one the record names)")

    verify = add_command(
        release_commands, "verify-log", cmd_verify_log,
        help="check the audit log's hash chain (edits, deletions, reordering)",
        description="Check that every entry seals the one before it, that sequence numbers run 0, 1, 2, ... and "
                    "that the head file matches the last entry. Exit status 2 names the first broken entry.")
    verify.add_argument("--log", type=Path, default=DEFAULT_LOG, metavar="FILE", help=f"default {DEFAULT_LOG}")
    verify.add_argument("--expect-head", metavar="SHA256",
                        help="a head hash kept elsewhere (e.g. a bundle's manifest.json) that must be in the log")

    export = add_command(
        commands, "export", cmd_export,
        help="write a model as a Hugging Face folder or a GGUF file (no gate involved)",
        description="hf: the folder transformers loads (config, safetensors, tokenizer, generation config). "
                    "gguf: one file of architecture llama4 for llama.cpp, tokenizer and chat template included; "
                    "configs llama.cpp would run differently are refused by field. gguf-lora: a LoRA adapter "
                    "folder (ours or PEFT's) as a llama.cpp adapter file, loaded beside the base's GGUF "
                    "(llama-cli -m base.gguf --lora adapter.gguf).")
    export.add_argument("--model", type=Path, required=True, metavar="DIR", help="model directory (gguf-lora: the base)")
    export.add_argument("--format", choices=("hf", "gguf", "gguf-lora"), required=True)
    export.add_argument("--adapter", type=Path, metavar="DIR", help="gguf-lora: the adapter folder")
    export.add_argument("--out", type=Path, required=True, metavar="PATH", help="folder (hf) or file (gguf, gguf-lora)")
    export.add_argument("--dtype", choices=GGUF_DTYPES, default="f32",
                        help="gguf: f32 keeps the weights exact; f16 halves the file, q8_0 (8-bit blocks) quarters it "
                             "(norms and router stay f32)")
    export.add_argument("--overwrite", action="store_true", help="replace PATH if it exists (refused otherwise)")
