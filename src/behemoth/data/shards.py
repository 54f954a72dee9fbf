"""Token shards: documents -> flat token files + document index + manifest.

`prepare` writes `train.bin` and `val.bin` (each document's tokens then eos, back to back, headerless
little-endian uint16 or uint32 so numpy can memory-map them), `train.idx` and `val.idx` (.npy int64
offsets: document i is bin[idx[i]:idx[i+1]]) and `manifest.json` (how it was made, and every file's
SHA-256 and size, so `verify` can tell what changed).

A document goes to val when a hash of (seed, text) in [0, 1) is below val_fraction (the lowest goes if
none is): adding files moves no document, and duplicates never straddle the splits. The sources are
read twice, to split, then to tokenize (in threads: the Rust tokenizer releases the GIL). The old
manifest is removed first and the new one written last: a crash leaves the previous preparation, or a
folder that refuses to load, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm import tqdm

from behemoth.durable import write_atomic
from behemoth.hashing import sha256_file, unit_hash
from behemoth.data.sources import Document, iter_documents, source_files
from behemoth.jsonio import read_json_object
from behemoth.errors import BehemothError, ConfigError

FORMAT = "behemoth-token-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val")
BATCH_DOCUMENTS = 256


class TokenizerLike(Protocol):
    """What preparing data needs from a tokenizer (`behemoth.tokenizer.Tokenizer` has it)."""

    vocab_size: int
    eos_id: int
    sha256: str

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...


@dataclass(frozen=True)
class SourceInfo:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ShardInfo:
    file: str
    index: str
    tokens: int
    documents: int
    bytes: int
    sha256: str
    index_bytes: int
    index_sha256: str


@dataclass(frozen=True)
class Manifest:
    """The contents of manifest.json."""

    dtype: str
    tokenizer_sha256: str
    vocab_size: int
    eos_id: int
    seed: int
    val_fraction: float
    text_field: str
    sources: tuple[SourceInfo, ...]
    shards: dict[str, ShardInfo]
    format_version: int = FORMAT_VERSION

    @property
    def tokens(self) -> dict[str, int]:
        return {split: shard.tokens for split, shard in self.shards.items()}

    @property
    def documents(self) -> dict[str, int]:
        return {split: shard.documents for split, shard in self.shards.items()}

    @property
    def num_documents(self) -> int:
        return sum(self.documents.values())

    def to_dict(self) -> dict:
        return {"format": FORMAT, "format_version": self.format_version, "dtype": self.dtype,
                "tokenizer": {"sha256": self.tokenizer_sha256, "vocab_size": self.vocab_size, "eos_id": self.eos_id},
                "split": {"seed": self.seed, "val_fraction": self.val_fraction, "by": "document"},
                "text_field": self.text_field, "documents": {**self.documents, "total": self.num_documents},
                "tokens": {**self.tokens, "total": sum(self.tokens.values())},
                "sources": [asdict(source) for source in self.sources],
                "shards": {split: asdict(shard) for split, shard in self.shards.items()}}

    @classmethod
    def from_dict(cls, data: dict, where: str = MANIFEST_NAME) -> Manifest:
        try:
            if data.get("format") != FORMAT:
                raise ConfigError(f"{where}: not a token-shard manifest (format {data.get('format')!r})")
            if data["format_version"] != FORMAT_VERSION:
                raise ConfigError(f"{where}: format version {data['format_version']} is not supported "
                                  f"(this behemoth reads version {FORMAT_VERSION}); prepare the data again")
            tokenizer, split = data["tokenizer"], data["split"]
            return cls(dtype=str(data["dtype"]), tokenizer_sha256=str(tokenizer["sha256"]),
                       vocab_size=int(tokenizer["vocab_size"]), eos_id=int(tokenizer["eos_id"]),
                       seed=int(split["seed"]), val_fraction=float(split["val_fraction"]),
                       text_field=str(data["text_field"]), sources=tuple(SourceInfo(**s) for s in data["sources"]),
                       shards={name: ShardInfo(**shard) for name, shard in data["shards"].items()},
                       format_version=int(data["format_version"]))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ConfigError(f"{where}: malformed manifest ({type(err).__name__}: {err})") from None


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65535), else uint32."""
    if vocab_size <= 0:
        raise ConfigError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size > 2**32:
        raise ConfigError(f"vocab_size {vocab_size} does not fit in uint32 token files")
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def split_score(text: str, seed: int) -> float:
    """A number in [0, 1) fixed by the document's text and the seed; below val_fraction -> val."""
    return unit_hash(f"{seed}\n{text}")


def prepare(paths: Iterable[str | Path] | str | Path, tokenizer: TokenizerLike, out_dir: str | Path, *,
            val_fraction: float = 0.02, seed: int = 0, workers: int = 2, text_field: str = "text",
            batch_documents: int = BATCH_DOCUMENTS) -> Manifest:
    """Tokenize the documents under `paths` into train/val shards in out_dir; return the manifest."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    if batch_documents < 1:
        raise ConfigError(f"batch_documents must be at least 1, got {batch_documents}")
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    vocab_size, eos_id = int(tokenizer.vocab_size), int(tokenizer.eos_id)
    dtype = token_dtype(vocab_size)
    if not 0 <= eos_id < vocab_size:
        raise ConfigError(f"tokenizer eos_id {eos_id} is outside its vocabulary of {vocab_size}")

    sources = tuple(_source_info(f.path) for f in source_files(paths))
    in_val = _choose_val(paths, text_field, val_fraction, seed)

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{out}: cannot create the output folder ({err.strerror or err})") from None
    writers: dict[str, _ShardWriter] = {}
    try:
        for split in SPLITS:
            writers[split] = _ShardWriter(out, split, dtype)
        count = 0
        with tqdm(total=len(in_val), unit="doc", desc="tokenizing", disable=not sys.stderr.isatty()) as progress:
            for docs, token_lists in _tokenized(iter_documents(paths, text_field), tokenizer, workers,
                                                batch_documents):
                for doc, ids in zip(docs, token_lists):
                    if count >= len(in_val):
                        raise ConfigError(f"{doc.source}: changed while it was being read (more documents "
                                          f"on the second pass); prepare again")
                    writers["val" if in_val[count] else "train"].add(ids, eos_id, vocab_size, doc)
                    count += 1
                progress.update(len(docs))
        if count != len(in_val):
            raise ConfigError(f"the sources changed while they were being read ({len(in_val)} documents, "
                              f"then {count}); prepare again")
        shards = {split: writer.finish() for split, writer in writers.items()}
        manifest = Manifest(dtype=dtype.name, tokenizer_sha256=str(tokenizer.sha256), vocab_size=vocab_size,
                            eos_id=eos_id, seed=seed, val_fraction=val_fraction, text_field=text_field,
                            sources=sources, shards=shards)
        # Old manifest first: between here and the new one, the folder is visibly unprepared.
        (out / MANIFEST_NAME).unlink(missing_ok=True)
        for writer in writers.values():
            writer.commit()
        write_atomic(out / MANIFEST_NAME, json.dumps(manifest.to_dict(), indent=2) + "\n")
    except OSError as err:
        raise ConfigError(f"{out}: cannot write the shards ({err.strerror or err})") from None
    finally:
        for writer in writers.values():
            writer.discard()
    return manifest


def _source_info(path: Path) -> SourceInfo:
    try:
        return SourceInfo(str(path.resolve()), path.stat().st_size, sha256_file(path))
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror or err})") from None


def _choose_val(paths: Sequence[str | Path], text_field: str, val_fraction: float, seed: int) -> np.ndarray:
    """First pass: which documents (in reading order) go to val."""
    reading = tqdm(iter_documents(paths, text_field), unit="doc", desc="reading", disable=not sys.stderr.isatty())
    with reading as documents:
        scores = np.fromiter((split_score(doc.text, seed) for doc in documents), dtype=np.float64)
    if len(scores) == 0:
        raise ConfigError(f"no documents found in {', '.join(map(str, paths))}")
    in_val = scores < val_fraction
    if val_fraction > 0 and not in_val.any():
        in_val[int(np.argmin(scores))] = True
    if in_val.all():
        raise ConfigError(f"no documents left for training ({len(scores)} documents, val_fraction "
                          f"{val_fraction}); add documents or lower val_fraction")
    return in_val


def _tokenized(docs: Iterator[Document], tokenizer: TokenizerLike, workers: int,
               batch_documents: int) -> Iterator[tuple[list[Document], list[list[int]]]]:
    """(documents, their token ids) in reading order, with up to 2*workers batches in flight."""
    pending: deque[tuple[list[Document], Future]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tokenize") as pool:
        try:
            while batch := list(islice(docs, batch_documents)):
                pending.append((batch, pool.submit(tokenizer.encode_batch, [d.text for d in batch])))
                while len(pending) >= 2 * workers:
                    done, future = pending.popleft()
                    yield done, future.result()
            while pending:
                done, future = pending.popleft()
                yield done, future.result()
        finally:
            for _, future in pending:
                future.cancel()


class _ShardWriter:
    """Appends documents to `<split>.bin` under a temporary name, hashing as it goes."""

    def __init__(self, out: Path, split: str, dtype: np.dtype):
        self.out, self.dtype = out, dtype
        self.bin_name, self.idx_name = f"{split}.bin", f"{split}.idx"
        self.bin_tmp = out / f".{self.bin_name}.tmp"
        self.idx_tmp = out / f".{self.idx_name}.tmp"
        self.handle = open(self.bin_tmp, "wb")
        self.digest = hashlib.sha256()
        self.offsets = [0]

    def add(self, ids: Sequence[int], eos_id: int, vocab_size: int, doc: Document) -> None:
        tokens = np.array([*ids, eos_id], dtype=np.int64)
        if len(ids) and (tokens.min() < 0 or tokens.max() >= vocab_size):
            raise BehemothError(f"{doc.source}, document {doc.index + 1}: the tokenizer returned id "
                                f"{int(tokens.max())} outside its vocabulary of {vocab_size}")
        data = tokens.astype(self.dtype.newbyteorder("<")).tobytes()
        self.handle.write(data)
        self.digest.update(data)
        self.offsets.append(self.offsets[-1] + len(tokens))

    def finish(self) -> ShardInfo:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        index = np.asarray(self.offsets, dtype=np.int64)
        with open(self.idx_tmp, "wb") as handle:
            np.save(handle, index)
            handle.flush()
            os.fsync(handle.fileno())
        return ShardInfo(self.bin_name, self.idx_name, tokens=int(index[-1]), documents=len(index) - 1,
                         bytes=self.bin_tmp.stat().st_size, sha256=self.digest.hexdigest(),
                         index_bytes=self.idx_tmp.stat().st_size, index_sha256=sha256_file(self.idx_tmp))

    def commit(self) -> None:
        os.replace(self.bin_tmp, self.out / self.bin_name)
        os.replace(self.idx_tmp, self.out / self.idx_name)

    def discard(self) -> None:
        if not self.handle.closed:
            self.handle.close()
        self.bin_tmp.unlink(missing_ok=True)
        self.idx_tmp.unlink(missing_ok=True)


def load_manifest(data_dir: str | Path) -> Manifest:
    """The manifest of a prepared data folder (no file is hashed; see `verify`)."""
    path = Path(data_dir) / MANIFEST_NAME
    if not Path(data_dir).is_dir():
        raise ConfigError(f"{data_dir}: no such data folder")
    if not path.is_file():
        raise ConfigError(f"{data_dir}: no {MANIFEST_NAME} (not a prepared data folder; run behemoth data prepare)")
    manifest = Manifest.from_dict(read_json_object(path), str(path))
    if manifest.dtype != token_dtype(manifest.vocab_size).name:
        raise ConfigError(f"{path}: dtype {manifest.dtype} does not match vocab_size {manifest.vocab_size}")
    return manifest


def verify(data_dir: str | Path, tokenizer: TokenizerLike | None = None, *, check_sources: bool = True,
           sources: Iterable[str | Path] | str | Path | None = None) -> Manifest:
    """Check a prepared folder against its manifest (and `tokenizer`, the source files, `sources`: the
    paths one would pass to `prepare`) and return it; one ConfigError names every problem."""
    directory = Path(data_dir)
    manifest = load_manifest(directory)
    problems: list[str] = []
    if sources is not None:
        now = [str(f.path.resolve()) for f in source_files(sources)]
        then = [source.path for source in manifest.sources]
        added = [path for path in now if path not in then]
        removed = [path for path in then if path not in now]
        problems += [f"source {p} is new" for p in added]
        problems += [f"source {p} is no longer given" for p in removed]
        if not added and not removed and now != then:
            problems.append("the sources are given in another order")
    itemsize = np.dtype(manifest.dtype).itemsize
    for shard in manifest.shards.values():
        for name, size, digest in ((shard.file, shard.bytes, shard.sha256),
                                   (shard.index, shard.index_bytes, shard.index_sha256)):
            problems.extend(_check_file(directory / name, name, size, digest, "shard"))
        if shard.bytes != shard.tokens * itemsize:
            problems.append(f"{shard.file}: manifest says {shard.tokens} tokens but {shard.bytes} bytes")
    if tokenizer is not None:
        if str(tokenizer.sha256) != manifest.tokenizer_sha256:
            problems.append(f"tokenizer differs: the data was tokenized with sha256 {manifest.tokenizer_sha256[:12]}, "
                            f"this tokenizer is {str(tokenizer.sha256)[:12]}")
        elif int(tokenizer.vocab_size) != manifest.vocab_size:
            problems.append(f"tokenizer vocab_size {tokenizer.vocab_size} differs from the data's "
                            f"{manifest.vocab_size}")
    if check_sources:
        for source in manifest.sources:
            problems.extend(_check_file(Path(source.path), source.path, source.size, source.sha256, "source"))
    if problems:
        raise ConfigError(f"{directory}: " + "; ".join(problems))
    return manifest


def _check_file(path: Path, name: str, size: int, digest: str, what: str) -> list[str]:
    if not path.is_file():
        return [f"{what} {name} is missing"]
    actual = path.stat().st_size
    if actual != size:
        change = "truncated" if actual < size else "grew"
        return [f"{what} {name} {change}: {actual} bytes, manifest says {size}"]
    try:
        if sha256_file(path) != digest:
            return [f"{what} {name} changed: its SHA-256 differs from the manifest"]
    except OSError as err:
        return [f"{what} {name} cannot be read ({err.strerror or err})"]
    return []


def open_split(data_dir: str | Path, split: str) -> tuple[Manifest, ShardInfo, np.memmap]:
    """(manifest, the split's shard, its tokens memory-mapped); ConfigError if the file is not as listed."""
    directory = Path(data_dir)
    manifest = load_manifest(directory)
    if split not in manifest.shards:
        raise ConfigError(f"{directory}: no split {split!r} (splits: {', '.join(manifest.shards)})")
    shard = manifest.shards[split]
    path = directory / shard.file
    if not path.is_file():
        raise ConfigError(f"{path}: missing (listed in the manifest)")
    if path.stat().st_size != shard.bytes:
        raise ConfigError(f"{path}: {path.stat().st_size} bytes, manifest says {shard.bytes} "
                          f"(truncated or replaced; run verify or prepare again)")
    dtype = np.dtype(manifest.dtype).newbyteorder("<")
    return manifest, shard, np.memmap(path, dtype=dtype, mode="r", shape=(shard.tokens,))


def split_documents(data_dir: str | Path, split: str, decode) -> Iterator[str]:
    """The documents of one split, decoded back to text with `decode(ids) -> str` (eos dropped):
    byte-level BPE decodes losslessly, so this is exactly the held-out text a run never trained on."""
    manifest, shard, tokens = open_split(data_dir, split)
    offsets = np.load(Path(data_dir) / shard.index, allow_pickle=False)
    for start, end in zip(offsets[:-1], offsets[1:]):
        ids = [int(t) for t in tokens[start:end] if t != manifest.eos_id]
        yield decode(ids)
