"""Content hashes of files: manifests, checkpoints, eval data and model checksums use the same one."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (weights and shards can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def unit_hash(data: str | bytes) -> float:
    """A number in [0, 1) fixed by the SHA-256 of `data` (text as UTF-8): splits by content, not position."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return int.from_bytes(hashlib.sha256(raw).digest()[:8], "big") / 2**64
