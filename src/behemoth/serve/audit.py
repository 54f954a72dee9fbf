"""The audit log: one JSON line per API request (key id, never the key; text only with
`--log-prompts`), each one `write` on an O_APPEND descriptor, so concurrent writers never interleave
inside a line and a crash leaves at most a cut last line, which readers skip.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

log = logging.getLogger("behemoth.serve")

# Fields that carry user text: dropped from every line unless prompts are logged.
TEXT_FIELDS = ("prompt", "messages", "completion")


class AuditLog:
    def __init__(self, path: str | Path, log_prompts: bool = False):
        self.path = Path(path)
        self.log_prompts = log_prompts
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._lock = threading.Lock()

    def write(self, **record: Any) -> None:
        if not self.log_prompts:
            for name in TEXT_FIELDS:
                record.pop(name, None)
        now = datetime.datetime.now(datetime.timezone.utc)
        line = json.dumps({"time": now.isoformat(timespec="milliseconds"), **record},
                          ensure_ascii=False, separators=(",", ":")) + "\n"
        data = line.encode("utf-8")
        with self._lock:
            try:
                written = os.write(self._fd, data)
                if written != len(data):  # a full disk: say so, never raise into a request
                    log.error("audit log %s: short write (%d of %d bytes)", self.path, written, len(data))
            except OSError as err:
                log.error("audit log %s: %s", self.path, err)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def read_audit(path: str | Path) -> list[dict[str, Any]]:
    """Every complete line of an audit log (a cut last line is skipped)."""
    records = []
    file = Path(path)
    if not file.exists():
        return records
    with file.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def tokens_used(path: str | Path) -> dict[str, int]:
    """Prompt + completion tokens per key id over the whole log: what quotas count."""
    used: dict[str, int] = defaultdict(int)
    for record in read_audit(path):
        key_id = record.get("key_id")
        if isinstance(key_id, str):
            for name in ("prompt_tokens", "completion_tokens"):
                value = record.get(name)
                if isinstance(value, int):
                    used[key_id] += value
    return dict(used)
