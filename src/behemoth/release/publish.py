"""Sign-off and publication: `behemoth release approve | publish` (the checks: docs/RELEASE.md).

A decision takes effect only once a named person approves it; both go to the audit log. `open` makes a
bundle (Hugging Face files, GGUF, model card, the record under `release/`, `manifest.json`); `closed`
copies the model's files to a private folder registered for `behemoth serve --registry`. Either folder
is built beside its destination and renamed into place: a failed publish leaves nothing behind.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from behemoth.durable import fsync_tree, staging_folder
from behemoth.errors import BehemothError
from behemoth.hashing import sha256_file
from behemoth.release import audit
from behemoth.release.gate import GateError, adapter_identity, changed_part, load_record
from behemoth.release.registry import register

MANIFEST_FILE = "manifest.json"
MANIFEST_SCHEMA = "behemoth.release.manifest/1"
OPERATOR = re.compile(r"^[^\x00-\x1f\x7f]{1,128}$")


class ReleaseError(BehemothError):
    """A release step is not allowed (no approval, a hold, an existing release, a changed model)."""


def approve(record_path: str | Path, by: str, log: str | Path | None = None) -> dict[str, Any]:
    """Sign off a decision record as `by`; returns the approval entry appended to the audit log."""
    if not OPERATOR.match(by or "") or not by.strip():
        raise ReleaseError(f"--by {by!r}: give the approver's name (1-128 printable characters)")
    record, file, log, entries, decision = _sealed(record_path, log)
    earlier = audit.find(entries, "approval", record_sha256=decision["record_sha256"])
    if earlier:
        raise ReleaseError(f"{file}: already approved by {earlier[0]['by']} at {earlier[0]['time']}")
    return audit.append(log, "approval", {"record_sha256": decision["record_sha256"], "record": str(file.parent),
                                          "decision": record["decision"], "by": by.strip()})


def publish(record_path: str | Path, out: str | Path | None = None, *, log: str | Path | None = None,
            registry: str | Path | None = None, name: str | None = None, gguf_dtype: str = "f16",
            training: dict[str, Any] | None = None) -> dict[str, Any]:
    """Carry out an approved decision; returns the audit log's publish entry (with `location`)."""
    record, file, log, entries, decision = _sealed(record_path, log)
    if record["decision"] == "hold":
        raise ReleaseError(f"{file}: the decision is hold; a held model is not published")
    approvals = audit.find(entries, "approval", record_sha256=decision["record_sha256"])
    if not approvals:
        raise ReleaseError(f"{file}: not approved; run `behemoth release approve {file.parent} --by NAME` first")
    done = audit.find(entries, "publish", record_sha256=decision["record_sha256"])
    if done:
        raise ReleaseError(f"{file}: already published to {done[0]['location']} at {done[0]['time']}")
    model_dir = _unchanged_model(record)
    name = name or record["model"]["name"]
    adapter = record["model"].get("adapter")
    if training is None:  # the card's Training section, from the run's own records
        from behemoth.release.cards import run_facts

        training = run_facts(Path(adapter["path"]) if adapter else model_dir)
    if record["decision"] == "open":
        if out is None:
            raise ReleaseError("an open release needs --out DIR for its bundle")
        location = _new_folder(Path(out), "choose another --out", lambda staging: _open_bundle(
            staging, model_dir, record, file, approvals[0], name, gguf_dtype, training, log))
        registered = None
    else:
        registry = Path(registry) if registry is not None else log.parent / "registry.json"
        folder = Path(out) if out is not None else log.parent / "closed" / name
        location = _new_folder(folder, "give the release another name with --name" if out is None else
                               "choose another --out", lambda staging: _closed_folder(staging, model_dir, file))
        registered = str(register(registry, name, location, record["model"], decision["record_sha256"]))
    return audit.append(log, "publish", {"record_sha256": decision["record_sha256"], "decision": record["decision"],
                                         "location": str(location.resolve()), "name": name,
                                         "registry": registered})


def _sealed(record_path: str | Path, log: str | Path | None
            ) -> tuple[dict[str, Any], Path, Path, list[dict[str, Any]], dict[str, Any]]:
    """(record, its file, the audit log, its entries, the decision entry sealing this exact file)."""
    record, file = load_record(record_path)
    log = Path(log) if log is not None else Path(record["audit_log"])
    entries = audit.read_entries(log)
    found = audit.find(entries, "decision", record_sha256=sha256_file(file))
    if not found:
        raise ReleaseError(f"{file}: no decision with this record's SHA-256 in {log}; the record was edited "
                           "after the gate wrote it, or belongs to another log")
    return record, file, log, entries, found[0]


def _unchanged_model(record: dict[str, Any]) -> Path:
    """The gated model's folder, once it (and for an adapter, the adapter and its base) is checked
    to be what the gate evaluated."""
    gated = [record["model"]]
    adapter = record["model"].get("adapter")
    if adapter is not None:
        gated.append(adapter["base"])
        try:
            now = adapter_identity(adapter["path"])  # the base is checked below, with the model
        except GateError as err:
            raise ReleaseError(f"the gated adapter is gone or unreadable: {err}") from None
        if (now["weights_sha256"], now["config_sha256"]) != (adapter["weights_sha256"], adapter["config_sha256"]):
            raise ReleaseError(f"{adapter['path']}: the adapter changed since the gate evaluated it; run the "
                               "gate again")
    for identity in gated:
        folder = Path(identity["path"])
        try:
            changed = changed_part(folder, identity)
        except GateError as err:
            raise ReleaseError(f"the gated model is gone or unreadable: {err}") from None
        if changed:
            raise ReleaseError(f"{folder}: {changed} changed since the gate evaluated it; run the gate again")
    return Path(record["model"]["path"])


def _new_folder(target: Path, hint: str, build: Callable[[Path], None]) -> Path:
    """Build a folder beside `target` and rename it into place; never replace an existing one."""
    if target.exists():
        raise ReleaseError(f"{target}: already exists; a release never overwrites another ({hint})")
    with staging_folder(target) as staging:
        build(staging)
        fsync_tree(staging)
        os.rename(staging, target)  # fails rather than replaces if target appeared meanwhile
    return target


def _open_bundle(staging: Path, model_dir: Path, record: dict[str, Any], record_file: Path,
                 approval: dict[str, Any], name: str, gguf_dtype: str, training: dict[str, Any] | None,
                 log: Path) -> None:
    from behemoth.export.gguf import export_gguf, export_gguf_lora
    from behemoth.export.hf import copy_hf_files
    from behemoth.lora_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS
    from behemoth.release.cards import model_card

    adapter = record["model"].get("adapter")
    if adapter is None:
        files = copy_hf_files(model_dir, staging)
        gguf_name = f"{name}-{gguf_dtype}.gguf"
        export_gguf(model_dir, staging / gguf_name, dtype=gguf_dtype)
    else:  # the adapter alone, as PEFT and llama.cpp load it beside the base the card names
        files = [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
        for file in files:
            shutil.copyfile(Path(adapter["path"]) / file, staging / file)
        gguf_name = f"{name}-lora.gguf"
        export_gguf_lora(adapter["base"]["path"], adapter["path"], staging / gguf_name)
    files.append(gguf_name)
    (staging / "release").mkdir()
    shutil.copyfile(record_file, staging / "release" / "decision.json")
    markdown = record_file.with_suffix(".md")
    if markdown.is_file():
        shutil.copyfile(markdown, staging / "release" / "decision.md")
    files += ["release/decision.json", "release/decision.md"]
    card = model_card(record, approval, name=name, files=files, training=training)
    (staging / "README.md").write_text(card, encoding="utf-8")
    write_manifest(staging, audit_head=audit.verify_log(log))


def _closed_folder(staging: Path, model_dir: Path, record_file: Path) -> None:
    from behemoth.export.hf import copy_hf_files

    copy_hf_files(model_dir, staging)
    shutil.copyfile(record_file, staging / "decision.json")
    write_manifest(staging)


def write_manifest(folder: Path, audit_head: audit.LogHead | None = None) -> Path:
    """manifest.json: SHA-256 and size of every file in `folder` (itself excluded)."""
    from behemoth.eval.cache import write_json_atomic

    files = {str(p.relative_to(folder)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE}
    manifest: dict[str, Any] = {"schema": MANIFEST_SCHEMA, "files": files}
    if audit_head is not None:
        manifest["audit_log_head"] = {"entries": audit_head.entries, "sha256": audit_head.sha256}
    return write_json_atomic(folder / MANIFEST_FILE, manifest)


def verify_manifest(folder: str | Path) -> list[str]:
    """Problems with a published folder against its manifest (empty when every file matches)."""
    from behemoth.jsonio import read_json_object

    folder = Path(folder)
    manifest = read_json_object(folder / MANIFEST_FILE)
    problems = []
    for relative, entry in manifest.get("files", {}).items():
        path = folder / relative
        if not path.is_file():
            problems.append(f"{relative}: missing")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{relative}: SHA-256 differs from the manifest")
    listed = set(manifest.get("files", {}))
    for path in folder.rglob("*"):
        if path.is_file() and path.name != MANIFEST_FILE and str(path.relative_to(folder)) not in listed:
            problems.append(f"{path.relative_to(folder)}: not in the manifest")
    return problems
