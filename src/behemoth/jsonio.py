"""Reading JSON files users hand us: one clear line for every way they can be wrong."""

from __future__ import annotations

import json
from pathlib import Path

from behemoth.errors import ConfigError


def read_json_object(path: Path) -> dict:
    """The JSON object in `path`, or ConfigError naming the file and what is wrong with it."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror or err})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return value
