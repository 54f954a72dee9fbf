"""Making writes durable: fsync of files and folders, for every atomic write-then-rename.

A rename only survives a crash once the renamed files' data and the folder entries are on disk, so
each writer fsyncs what it staged before renaming it into place, and the parent folder after.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync one file or folder (a folder's fsync makes its entries, e.g. a rename, durable)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(directory: Path) -> None:
    """fsync every file and folder under `directory`, then `directory` itself."""
    for entry in directory.iterdir():
        if entry.is_dir():
            fsync_tree(entry)
        elif entry.is_file():
            fsync_path(entry)
    fsync_path(directory)


def write_atomic(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Write `data` (str: as UTF-8) to a temporary file beside `path` with permissions `mode`, fsync
    it and rename it over `path`: readers see the old file or the new one, never a part."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(descriptor, mode)  # mkstemp's files are the owner's only
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staging_folder(target: Path) -> Iterator[Path]:
    """A new temporary folder beside `target`, for the block to fill, fsync and rename into place;
    removed when the block fails, so a failed write leaves nothing behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp's folders are the owner's only; models and bundles are for others to read
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
