"""Making writes durable: fsync of files and folders, for every atomic write-then-rename.

A rename only survives a crash once the renamed files' data and the folder entries are on disk, so
each writer fsyncs what it staged before renaming it into place, and the parent folder after.
"""

from __future__ import annotations

import os
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
