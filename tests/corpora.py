"""Small synthetic text with learnable structure, for training tests (no third-party text)."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = ("the cat dog bird sat ran saw a on under big small red blue house tree river and then "
         "slowly quickly happy sad morning night").split()


def write_phrase_corpus(path: Path, documents: int, seed: int = 0) -> Path:
    """Blank-line separated documents, each one templated sentence repeated three times."""
    rng = random.Random(seed)
    docs = []
    for _ in range(documents):
        subject, verb, place = rng.choice(WORDS[:6]), rng.choice(WORDS[6:9]), rng.choice(WORDS[14:18])
        docs.append(" ".join(f"the {subject} {verb} a {place} and then the {subject} was happy." for _ in range(3)))
    path.write_text("\n\n".join(docs))
    return path
