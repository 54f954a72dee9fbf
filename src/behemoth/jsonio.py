"""Reading JSON and JSONL files users hand us: one clear line for every way they can be wrong.

Also the reading underneath, which text readers share: `open_binary` (gunzipping `.gz` files) and
`read_lines`; and `write_jsonl`, the other way.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Literal

from behemoth.durable import write_atomic
from behemoth.errors import ConfigError

# How an error names a line: "data.jsonl, line 3: ..." (data and post-training) or "data.jsonl:3: ..."
# (evaluation and the tokenizer, whose other messages name lines that way too).
LineStyle = Literal["line", "colon"]


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


def read_jsonl(path: Path, *, style: LineStyle = "line") -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for every non-blank line of a JSONL file, gunzipped if `.gz`;
    a line that is not a JSON object is a ConfigError naming the file and line (in `style`)."""
    for number, line in read_lines(path, style=style):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            problem = "invalid JSON" if style == "colon" else "not valid JSON"
            raise ConfigError(f"{_where(path, number, style)}: {problem} ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{_where(path, number, style)}: expected a JSON object, got {type(row).__name__}")
        yield number, row


def open_binary(path: Path) -> IO[bytes]:
    """`path` opened for reading bytes, gunzipped when its name ends in `.gz`."""
    try:
        return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror or err})") from None


def read_lines(path: Path, *, style: LineStyle = "line") -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its ending) of a UTF-8 text file, gunzipped if `.gz`, a
    leading byte-order mark dropped. Lines are decoded one by one, so an error names its line."""
    number = 0
    with open_binary(path) as handle:
        try:
            for number, raw in enumerate(handle, start=1):
                line = raw.decode("utf-8").rstrip("\r\n")
                yield number, (line.removeprefix("\ufeff") if number == 1 else line)
        except UnicodeDecodeError as err:
            raise ConfigError(f"{_where(path, number, style)}: not valid UTF-8 "
                              f"(at byte {err.start + 1} of the line)") from None
        except (OSError, EOFError) as err:  # gzip raises these for a truncated or non-gzip file
            raise ConfigError(f"{_where(path, number + 1, style)}: cannot read ({err})") from None


def _where(path: Path, number: int, style: LineStyle) -> str:
    return f"{path}:{number}" if style == "colon" else f"{path}, line {number}"


def write_jsonl(path: Path, rows: Iterable[dict]) -> Path:
    """`rows` as JSON lines, written atomically; returns `path`."""
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
    return path
