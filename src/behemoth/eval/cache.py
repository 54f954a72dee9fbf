"""Per-item results cached as JSON (never pickled): <cache_dir>/<model sha256>/<task>-<settings hash>.json

The settings hash covers everything besides the model that changes a score (task kind and version,
tokenizer, prefix token, max_length, dtype) and an item's key hashes its content, so an edited data file
or a changed setting is rescored, never served stale. A damaged cache file is ignored and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from behemoth.durable import write_atomic

CACHE_SCHEMA = "behemoth.eval.cache/1"
CACHE_ENV = "BEHEMOTH_EVAL_CACHE"


def default_cache_dir() -> Path:
    """$BEHEMOTH_EVAL_CACHE, else $XDG_CACHE_HOME/behemoth/eval, else ~/.cache/behemoth/eval."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ["XDG_CACHE_HOME"]) if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "behemoth" / "eval"


class ScoreCache:
    """Results of one task's items for one model and one set of scoring settings (root None: in memory)."""

    def __init__(self, root: Path | None, model_sha256: str, task: str, fingerprint: dict[str, Any]):
        self.model_sha256, self.task, self.fingerprint = model_sha256, task, fingerprint
        self._dirty = False
        self.path = None
        self._items: dict[str, dict[str, Any]] = {}
        if root is not None:
            digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode("utf-8")).hexdigest()[:16]
            slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", task)[:80]
            self.path = Path(root) / model_sha256 / f"{slug}-{digest}.json"
            self._items = self._read()

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}
        if (not isinstance(data, dict) or data.get("schema") != CACHE_SCHEMA
                or data.get("fingerprint") != self.fingerprint or not isinstance(data.get("items"), dict)):
            return {}
        return data["items"]

    def get(self, key: str) -> dict[str, Any] | None:
        return self._items.get(key)

    def put(self, key: str, result: dict[str, Any]) -> None:
        self._items[key] = result
        self._dirty = True

    def flush(self) -> None:
        """Write the file if anything was added (atomically; errors writing a cache are not fatal)."""
        if self.path is None or not self._dirty:
            return
        data = {"schema": CACHE_SCHEMA, "model_sha256": self.model_sha256, "task": self.task,
                "fingerprint": self.fingerprint, "items": self._items}
        try:
            write_json_atomic(self.path, data, indent=None)
            self._dirty = False
        except OSError:
            pass  # a read-only or full cache disk slows the next run down; it must not fail this one


def write_json_atomic(path: Path, data: Any, indent: int | None = 2) -> Path:
    """Strict JSON (NaN and infinities as null), written atomically (behemoth.durable.write_atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(_finite(data), indent=indent, ensure_ascii=False, allow_nan=False) + "\n")
    return path


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
