"""Documents from files on disk, in a fixed order (paths as given, a folder's files by name):

- `.txt`, `.text` (or `.gz` of them), and any file named explicitly: documents are separated by
  `<|endoftext|>` (or `<|end_of_text|>`) when the file holds one, else by blank lines (so
  marker-separated documents may hold paragraphs);
- `.jsonl`, `.ndjson` (or `.gz`): one JSON object per line, the document its `text_field`;
- `.parquet`, and `datasets` `save_to_disk` folders (their Arrow files): the `text_field` column,
  read with `pyarrow` alone.
Other folders are searched recursively (hidden entries skipped); empty documents are skipped and a
file named twice is read once. Unreadable input is a one-line ConfigError naming the file and line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from behemoth.jsonio import open_binary, read_json_object, read_jsonl, read_lines
from behemoth.errors import ConfigError

END_MARKERS = ("<|endoftext|>", "<|end_of_text|>")
_MARKER_RE = re.compile("|".join(re.escape(m) for m in END_MARKERS))

TEXT_SUFFIXES = (".txt", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
HF_STATE = "state.json"
HF_DATASET_DICT = "dataset_dict.json"


@dataclass(frozen=True)
class Document:
    """One training document and where it came from."""

    text: str
    source: Path
    index: int  # within its file, 0-based
    line: int  # it starts on, 1-based (the row number for Parquet and Arrow files)


@dataclass(frozen=True)
class SourceFile:
    """A file that documents are read from, and how to read it."""

    path: Path
    kind: str  # "text" | "jsonl" | "parquet" | "arrow"


def source_files(paths: Iterable[str | Path] | str | Path) -> list[SourceFile]:
    """The files `iter_documents(paths)` reads, in the order it reads them."""
    files: list[SourceFile] = []
    for path in map(Path, [paths] if isinstance(paths, (str, Path)) else paths):
        if not path.exists():
            raise ConfigError(f"{path}: no such file or folder")
        if path.is_dir():
            found = _folder_files(path)
            if not found:
                suffixes = ", ".join(TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES)
                raise ConfigError(f"{path}: no data files in this folder (looked for {suffixes}, "
                                  "or a datasets save_to_disk folder)")
            files.extend(found)
        else:
            files.append(SourceFile(path, _kind(path, explicit=True)))
    if not files:
        raise ConfigError("no data paths given")
    unique: dict[Path, SourceFile] = {}  # a file named twice (or with its folder) is read where it first appears
    for source in files:
        unique.setdefault(source.path.resolve(), source)
    return list(unique.values())


def _kind(path: Path, explicit: bool) -> str | None:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES) and not path.name.lower().endswith(".gz"):
        return "parquet"
    if name.endswith(".arrow") and explicit:
        return "arrow"
    return "text" if explicit else None


def _folder_files(folder: Path) -> list[SourceFile]:
    if (folder / HF_STATE).is_file() or (folder / HF_DATASET_DICT).is_file():
        return _hf_arrow_files(folder)
    found: list[SourceFile] = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            found.extend(_folder_files(entry))
        elif (kind := _kind(entry, explicit=False)) is not None:
            found.append(SourceFile(entry, kind))
    return found


def _hf_arrow_files(folder: Path) -> list[SourceFile]:
    """The Arrow files of a `save_to_disk` folder, in the order `datasets` would read them."""
    if (folder / HF_DATASET_DICT).is_file():
        splits = read_json_object(folder / HF_DATASET_DICT).get("splits")
        if not isinstance(splits, list) or not splits:
            raise ConfigError(f"{folder / HF_DATASET_DICT}: no 'splits' list")
        files: list[SourceFile] = []
        for split in splits:
            split_dir = folder / str(split)
            if not (split_dir / HF_STATE).is_file():
                raise ConfigError(f"{split_dir}: split {split!r} listed in {HF_DATASET_DICT} has no {HF_STATE}")
            files.extend(_hf_arrow_files(split_dir))
        return files
    state = read_json_object(folder / HF_STATE)
    entries = state.get("_data_files")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{folder / HF_STATE}: no '_data_files' list (not a datasets save_to_disk folder?)")
    files = []
    for entry in entries:
        name = entry.get("filename") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            raise ConfigError(f"{folder / HF_STATE}: a '_data_files' entry has no 'filename'")
        path = folder / name
        if not path.is_file():
            raise ConfigError(f"{path}: listed in {folder / HF_STATE} but missing")
        files.append(SourceFile(path, "arrow"))
    return files


def iter_documents(paths: Iterable[str | Path] | str | Path, text_field: str = "text") -> Iterator[Document]:
    """Every non-empty document of every file under `paths`, in a fixed order."""
    readers = {"text": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet, "arrow": _read_arrow}
    for source in source_files(paths):
        kept = ((text, line) for text, line in readers[source.kind](source.path, text_field) if text.strip())
        for index, (text, line) in enumerate(kept):
            yield Document(text, source.path, index, line)


def _contains_marker(path: Path) -> bool:
    """Whether the file holds an end-of-text marker anywhere (read in chunks, never whole)."""
    markers = [m.encode() for m in END_MARKERS]
    overlap = max(len(m) for m in markers) - 1
    tail = b""
    try:
        with open_binary(path) as handle:
            while chunk := handle.read(1 << 20):
                window = tail + chunk
                if any(m in window for m in markers):
                    return True
                tail = window[-overlap:]
    except (OSError, EOFError) as err:
        raise ConfigError(f"{path}: cannot read ({err})") from None
    return False


# Each reader yields (text, the line or row it starts on); iter_documents drops the blank ones.
def _read_text(path: Path, _text_field: str) -> Iterator[tuple[str, int]]:
    by_marker = _contains_marker(path)
    lines: list[str] = []
    start = 1
    for number, line in read_lines(path):
        if not lines:
            start = number
        if by_marker:
            *ended, rest = _MARKER_RE.split(line)
            for piece in ended:
                yield "\n".join([*lines, piece]).strip(), start
                lines, start = [], number
            lines.append(rest)
        elif line.strip():
            lines.append(line)
        else:
            yield "\n".join(lines).strip(), start
            lines = []
    yield "\n".join(lines).strip(), start


def _read_jsonl(path: Path, text_field: str) -> Iterator[tuple[str, int]]:
    for number, record in read_jsonl(path):
        if text_field not in record:
            raise ConfigError(f"{path}, line {number}: no {text_field!r} field "
                              f"(fields: {', '.join(map(str, record)) or 'none'}; choose one with --text-field)")
        text = record[text_field]
        if not isinstance(text, str):
            raise ConfigError(f"{path}, line {number}: field {text_field!r} is {type(text).__name__}, not a string")
        yield text, number


def _pyarrow(path: Path, what: str):
    try:
        import pyarrow  # noqa: F401  (optional dependency)
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ConfigError(f"{path}: reading {what} needs the optional package pyarrow: pip install pyarrow") from None
    return pyarrow


def _check_column(path: Path, names: list[str], text_field: str) -> None:
    if text_field not in names:
        raise ConfigError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}; "
                          f"choose one with --text-field)")


def _column_texts(path: Path, batches: Iterator, text_field: str) -> Iterator[tuple[str, int]]:
    row = 0
    for batch in batches:
        _check_column(path, batch.schema.names, text_field)
        column = batch.column(batch.schema.get_field_index(text_field))
        for value in column.to_pylist():
            row += 1
            if value is None:
                continue
            if not isinstance(value, str):
                raise ConfigError(f"{path}, row {row}: column {text_field!r} holds {type(value).__name__}, not text")
            yield value, row


def _read_parquet(path: Path, text_field: str) -> Iterator[tuple[str, int]]:
    pa = _pyarrow(path, "Parquet")
    try:
        reader = pa.parquet.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise ConfigError(f"{path}: not a readable Parquet file ({err})") from None
    _check_column(path, reader.schema_arrow.names, text_field)
    try:
        yield from _column_texts(path, reader.iter_batches(batch_size=1024, columns=[text_field]), text_field)
    except pa.ArrowException as err:
        raise ConfigError(f"{path}: cannot read Parquet data ({err})") from None


def _read_arrow(path: Path, text_field: str) -> Iterator[tuple[str, int]]:
    """An Arrow IPC file as `datasets` writes it (the streaming format; the file format is also accepted)."""
    pa = _pyarrow(path, "a datasets folder")
    try:
        with pa.memory_map(str(path), "r") as source:
            try:
                reader = pa.ipc.open_stream(source)
                batches = iter(reader)
            except pa.ArrowInvalid:
                source.seek(0)
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            yield from _column_texts(path, batches, text_field)
    except (OSError, pa.ArrowException) as err:
        raise ConfigError(f"{path}: not a readable Arrow file ({err})") from None
