"""API keys `bh-<12 hex id>-<secret of 32 random bytes>`: created once, stored hashed, checked in
constant time, revocable while serving (the server rereads the keys file when it changes). The
file (JSON, mode 0600) holds only each key's SHA-256: a 256-bit secret leaves nothing to guess.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
from collections.abc import Container
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from behemoth.durable import write_atomic
from behemoth.errors import ConfigError

KEY_PREFIX = "bh-"
ID_HEX_CHARS = 12
SECRET_BYTES = 32
FILE_VERSION = 1
_KEY_PATTERN = re.compile(rf"^{KEY_PREFIX}([0-9a-f]{{{ID_HEX_CHARS}}})-([A-Za-z0-9_-]{{16,128}})$")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@-]{0,63}$")
# Compared against when a presented key names no known id, so a miss costs what a hit costs.
_DUMMY_HASH = hashlib.sha256(b"behemoth: no such key").hexdigest()


@dataclass
class Limits:
    """Per-key limits (None: unlimited) per sliding minute, and over the key's life (token_quota,
    counted from the audit log). Tokens: prompt + completion."""

    requests_per_minute: int | None = 60
    tokens_per_minute: int | None = 100_000
    token_quota: int | None = None

    def check(self) -> None:
        for name, value in asdict(self).items():
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"limit {name} must be a positive integer or unlimited, got {value!r}")


@dataclass
class KeyRecord:
    """One key as stored: never the key itself, only its hash."""

    id: str
    name: str
    sha256: str
    created: str
    revoked: str | None = None
    limits: Limits = field(default_factory=Limits)
    models: list[str] | None = None  # model names this key may use; None = all

    @property
    def active(self) -> bool:
        return self.revoked is None

    def allows_model(self, model: str) -> bool:
        return self.models is None or model in self.models

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str) -> KeyRecord:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: a key entry must be an object")
        try:
            limits = Limits(**(data.get("limits") or {}))
            record = cls(id=data["id"], name=data["name"], sha256=data["sha256"], created=data["created"],
                         revoked=data.get("revoked"), limits=limits, models=data.get("models"))
        except (KeyError, TypeError) as err:
            raise ConfigError(f"{where}: malformed key entry ({err})") from None
        if not (isinstance(record.id, str) and re.fullmatch(rf"[0-9a-f]{{{ID_HEX_CHARS}}}", record.id)):
            raise ConfigError(f"{where}: malformed key id {record.id!r}")
        if not (isinstance(record.sha256, str) and re.fullmatch(r"[0-9a-f]{64}", record.sha256)):
            raise ConfigError(f"{where}: key {record.id}: sha256 must be 64 hex characters")
        if record.models is not None and not (
                isinstance(record.models, list) and all(isinstance(m, str) for m in record.models)):
            raise ConfigError(f"{where}: key {record.id}: models must be a list of names or null")
        limits.check()
        return record


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _new_key(name: str, limits: Limits, models: list[str] | None = None,
             taken: Container[str] = ()) -> tuple[str, KeyRecord]:
    """A fresh key and its record, with an id not in `taken`."""
    key_id = secrets.token_hex(ID_HEX_CHARS // 2)
    while key_id in taken:
        key_id = secrets.token_hex(ID_HEX_CHARS // 2)
    key = f"{KEY_PREFIX}{key_id}-{secrets.token_urlsafe(SECRET_BYTES)}"
    return key, KeyRecord(id=key_id, name=name, sha256=hash_key(key), created=_now(), limits=limits, models=models)


def read_keys(path: str | Path) -> list[KeyRecord]:
    """All records in a keys file; a missing file holds no keys."""
    file = Path(path)
    if not file.exists():
        return []
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{file}: not a keys file ({err})") from None
    if not isinstance(data, dict) or data.get("version") != FILE_VERSION or not isinstance(data.get("keys"), list):
        raise ConfigError(f"{file}: not a keys file (expected {{\"version\": {FILE_VERSION}, \"keys\": [...]}})")
    records = [KeyRecord.from_json(entry, str(file)) for entry in data["keys"]]
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{file}: duplicate key ids")
    return records


def write_keys(path: str | Path, records: list[KeyRecord]) -> None:
    """Write the file atomically (temporary sibling + rename), readable by its owner only."""
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"version": FILE_VERSION, "keys": [r.to_json() for r in records]}, indent=2) + "\n"
    write_atomic(file, text, mode=0o600)


def create_key(path: str | Path, name: str, limits: Limits | None = None,
               models: list[str] | None = None) -> tuple[str, KeyRecord]:
    """Add a new key to the file; returns (the key, its record). The key is not kept anywhere."""
    if not isinstance(name, str) or not _NAME_PATTERN.match(name):
        raise ConfigError(f"key name must be 1-64 letters, digits, spaces or ._@- (starting with a letter "
                          f"or digit), got {name!r}")
    limits = limits or Limits()
    limits.check()
    records = read_keys(path)
    taken = next((r for r in records if r.name == name and r.revoked is None), None)
    if taken is not None:
        raise ConfigError(f"{path}: a key named {name!r} exists (id {taken.id}); choose another name, or "
                          f"revoke it first with `behemoth keys revoke --file {path} {taken.id}`")
    key, record = _new_key(name, limits, list(models) if models else None, {r.id for r in records})
    write_keys(path, records + [record])
    return key, record


def revoke_key(path: str | Path, id_or_name: str) -> KeyRecord:
    """Mark one key revoked (by id, or by name: the one key of that name not yet revoked)."""
    records = read_keys(path)
    matches = [r for r in records if r.id == id_or_name] or \
        [r for r in records if r.name == id_or_name and r.revoked is None]
    if not matches:
        raise ConfigError(f"{path}: no key with id or name {id_or_name!r}")
    if len(matches) > 1:
        raise ConfigError(f"{path}: {len(matches)} keys are named {id_or_name!r}; revoke by id")
    record = matches[0]
    if record.revoked is None:
        record.revoked = _now()
        write_keys(path, records)
    return record


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class AuthError(Exception):
    """A request's key is missing, unknown or revoked; `status` is 401 or 403."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.code = status, code


class KeyStore:
    """The keys a server accepts: a keys file (reread when it changes) and/or in-memory keys."""

    def __init__(self, path: str | Path | None = None, extra: list[KeyRecord] | None = None):
        self._path = Path(path) if path is not None else None
        self._extra = list(extra or [])
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._by_id: dict[str, KeyRecord] = {}
        self._load()

    @classmethod
    def ephemeral(cls, name: str = "ephemeral", limits: Limits | None = None) -> tuple[str, KeyStore]:
        """A store holding one new key that lives only in memory; returns (key, store)."""
        key, record = _new_key(name, limits or Limits())
        return key, cls(None, [record])

    def records(self) -> list[KeyRecord]:
        self._refresh()
        return list(self._by_id.values())

    def authenticate(self, authorization: str | None) -> KeyRecord:
        """The record of the key in an `Authorization: Bearer KEY` header, or AuthError."""
        if not authorization:
            raise AuthError(401, "Missing API key: send it as 'Authorization: Bearer KEY'.", "missing_api_key")
        scheme, _, key = authorization.strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise AuthError(401, "Malformed Authorization header: expected 'Bearer KEY'.", "invalid_api_key")
        self._refresh()
        well_formed = _KEY_PATTERN.match(key)
        record = self._by_id.get(well_formed.group(1)) if well_formed else None
        if not hmac.compare_digest(hash_key(key), record.sha256 if record else _DUMMY_HASH) or record is None:
            raise AuthError(401, "Incorrect API key provided.", "invalid_api_key")
        if not record.active:
            raise AuthError(403, f"API key {record.id} has been revoked.", "revoked_api_key")
        return record

    def _load(self) -> None:
        records = list(self._extra)
        if self._path is not None:
            self._stamp = self._file_stamp()
            records += read_keys(self._path)
        self._by_id = {r.id: r for r in records}

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._path)  # type: ignore[arg-type]
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _refresh(self) -> None:
        """Reread the file if it changed; one that no longer parses fails closed (in-memory keys only)."""
        if self._path is None or self._file_stamp() == self._stamp:
            return
        with self._lock:
            if self._file_stamp() == self._stamp:
                return
            try:
                self._load()
            except ConfigError as err:
                self._stamp = self._file_stamp()
                self._by_id = {r.id: r for r in self._extra}
                logging.getLogger("behemoth.serve").error("keys file unreadable, its keys are refused: %s", err)
