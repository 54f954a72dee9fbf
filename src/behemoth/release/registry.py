"""The registry of closed releases: model names that `behemoth serve --registry FILE` offers.

    {"schema": "behemoth.release.registry/1",
     "models": {NAME: {"path", "weights_sha256", "config_sha256", "tokenizer_sha256", "record_sha256", "registered"}}}

Serving checks each folder against its checksums before loading it, so a name always serves the
weights that were gated and approved. Rewritten atomically under a lock; a name is registered once.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

from behemoth.errors import BehemothError
from behemoth.release.audit import utc_now

REGISTRY_SCHEMA = "behemoth.release.registry/1"


class RegistryError(BehemothError):
    """The registry file is unusable, or a registered model no longer matches it."""


def read_registry(path: str | Path) -> dict[str, dict[str, Any]]:
    """{name: entry}; an absent file is an empty registry."""
    from behemoth.jsonio import read_json_object

    path = Path(path)
    if not path.exists():
        return {}
    try:
        data = read_json_object(path)
    except BehemothError as err:
        raise RegistryError(str(err)) from None
    if data.get("schema") != REGISTRY_SCHEMA or not isinstance(data.get("models"), dict):
        raise RegistryError(f"{path}: not a model registry (schema {data.get('schema')!r})")
    return data["models"]


def register(path: str | Path, name: str, folder: Path, identity: dict[str, Any], record_sha256: str) -> Path:
    """Add `name` -> `folder`; RegistryError if the name is taken. Returns the registry path."""
    from behemoth.eval.cache import write_json_atomic
    from behemoth.release.gate import IDENTITY
    from behemoth.serve.models import MODEL_NAME

    path = Path(path)
    if not MODEL_NAME.match(name):
        raise RegistryError(f"model name {name!r}: use 1-64 letters, digits or ._- starting with a letter "
                            "(give one with --name)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        models = read_registry(path)
        if name in models:
            raise RegistryError(f"{path}: a model named {name!r} is already registered (give another --name)")
        models[name] = {"path": str(Path(folder).resolve()), "record_sha256": record_sha256,
                        "registered": utc_now(), **{k: identity[k] for k in IDENTITY}}
        write_json_atomic(path, {"schema": REGISTRY_SCHEMA, "models": models})
    os.chmod(path, 0o600)  # it names private folders
    return path


def registered_models(path: str | Path) -> dict[str, Path]:
    """{name: folder} for serving, each folder checked against its registered checksums."""
    from behemoth.release.gate import GateError, changed_part

    models = read_registry(path)
    if not models:
        raise RegistryError(f"{path}: no registered models (publish an approved closed decision first)")
    for name, entry in models.items():
        try:
            changed = changed_part(entry["path"], entry)
        except GateError as err:
            raise RegistryError(f"{path}: model {name!r}: {err}") from None
        if changed:
            raise RegistryError(f"{path}: model {name!r} in {entry['path']}: {changed} changed since it was released")
    return {name: Path(entry["path"]) for name, entry in models.items()}
