"""The release audit log: an append-only JSON-lines file in which each entry seals the one before.

Each line is canonical JSON: `seq`, `prev` (SHA-256 of the previous line, 64 zeros for the first),
`time`, `event` and its fields, so editing, deleting or reordering lines breaks a link. The head file
beside the log (entry count and last SHA-256) seals the last line; whoever can rewrite both can forge
the tail, so a publication copies the head into its bundle (`verify_log(expect_head=...)`). Appends
hold an exclusive `flock`. The user's view: docs/RELEASE.md, section 3.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from behemoth.durable import write_atomic
from behemoth.errors import BehemothError

GENESIS = "0" * 64
EVENTS = ("decision", "approval", "publish")


class AuditError(BehemothError):
    """The audit log is unreadable or has been tampered with, or an entry is not allowed."""


@dataclass(frozen=True)
class LogHead:
    entries: int
    sha256: str


def utc_now() -> str:
    """The time of an entry, a decision or a registration: UTC, ISO 8601, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def canonical(entry: dict[str, Any]) -> bytes:
    """The exact bytes of a log line (without its newline): canonical JSON, so hashes are stable."""
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def head_path(log: Path) -> Path:
    return log.with_name(log.name + ".head")


def read_entries(log: Path) -> list[dict[str, Any]]:
    """All entries, after checking the whole chain and the head; AuditError on the first broken link."""
    return _verified(Path(log))[0]


def verify_log(log: str | Path, expect_head: str | None = None) -> LogHead:
    """Check every link, the sequence numbers and the head file; return the head. expect_head: a head
    SHA-256 kept elsewhere (a release bundle), which the log must still contain (it may have grown)."""
    entries, head = _verified(Path(log))
    if expect_head is not None and expect_head != GENESIS:
        if not any(entry["sha256"] == expect_head for entry in entries):
            raise AuditError(f"{log}: no entry has the expected SHA-256 {expect_head}; "
                             "the log was truncated or rewritten")
    return head


def append(log: str | Path, event: str, fields: dict[str, Any]) -> dict[str, Any]:
    """Append one entry (after verifying the log as it stands) and return it, with its `sha256`."""
    if event not in EVENTS:
        raise AuditError(f"unknown audit event {event!r} (expected one of {', '.join(EVENTS)})")
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(log, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        head = _verified(log)[1]
        entry = {**fields, "seq": head.entries, "prev": head.sha256, "event": event, "time": utc_now()}
        line = canonical(entry)
        os.write(descriptor, line + b"\n")
        os.fsync(descriptor)
        digest = hashlib.sha256(line).hexdigest()
        write_atomic(head_path(log), json.dumps({"entries": head.entries + 1, "sha256": digest}) + "\n")
    finally:
        os.close(descriptor)  # releases the lock
    return {**entry, "sha256": digest}


def find(entries: list[dict[str, Any]], event: str, **match: Any) -> list[dict[str, Any]]:
    """Entries of one event whose fields equal `match`."""
    return [e for e in entries if e["event"] == event and all(e.get(k) == v for k, v in match.items())]


def _verified(log: Path) -> tuple[list[dict[str, Any]], LogHead]:
    if not log.exists():
        if head_path(log).exists():
            raise AuditError(f"{log}: the log is missing but its head file says it had entries")
        return [], LogHead(0, GENESIS)
    try:
        lines = log.read_bytes().split(b"\n")
    except OSError as err:
        raise AuditError(f"{log}: cannot read ({err.strerror or err})") from None
    if lines[-1] != b"":
        raise AuditError(f"{log}: the last line is incomplete (an interrupted or edited write)")
    entries, previous = [], GENESIS
    for number, line in enumerate(lines[:-1], start=1):
        entry = _parse(log, number, line)
        if entry.get("seq") != number - 1:
            raise AuditError(f"{log}, line {number}: sequence number {entry.get('seq')!r}, expected {number - 1} "
                             "(an entry was deleted, inserted or moved)")
        if entry.get("prev") != previous:
            raise AuditError(f"{log}, line {number}: does not seal the line before it (its prev is not that line's "
                             "SHA-256): an earlier line was edited, deleted or moved")
        previous = hashlib.sha256(line).hexdigest()
        entries.append({**entry, "sha256": previous})
    head = LogHead(len(entries), previous)
    _check_head(log, head)
    return entries, head


def _parse(log: Path, number: int, line: bytes) -> dict[str, Any]:
    try:
        entry = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AuditError(f"{log}, line {number}: not valid JSON (the line was edited or damaged)") from None
    if not isinstance(entry, dict) or entry.get("event") not in EVENTS:
        raise AuditError(f"{log}, line {number}: not an audit entry")
    if canonical(entry) != line:
        raise AuditError(f"{log}, line {number}: not in canonical form (the line was edited)")
    return entry


def _check_head(log: Path, head: LogHead) -> None:
    path = head_path(log)
    if not path.exists():
        if head.entries:
            raise AuditError(f"{path}: missing; without it the last entries of {log} cannot be checked")
        return
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        stored_head = LogHead(int(stored["entries"]), str(stored["sha256"]))
    except (OSError, ValueError, KeyError, TypeError):
        raise AuditError(f"{path}: unreadable head file") from None
    if stored_head != head:
        raise AuditError(f"{log}: the log ends at entry {head.entries} ({head.sha256[:12]}...) but its head file "
                         f"says {stored_head.entries} ({stored_head.sha256[:12]}...): entries were removed or "
                         "the last one was edited")
