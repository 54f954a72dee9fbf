"""The data side of a run: find or train the tokenizer, find or prepare the token shards.

A prepared data directory (one with a manifest.json) is verified and used as it is; other sources
are tokenized into `out/data/`, again only when the sources or the tokenizer no longer match.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from behemoth.data import PackedLoader, prepare, verify
from behemoth.errors import BehemothError, ConfigError
from behemoth.tokenizer import Tokenizer, train_tokenizer_from_files
from behemoth.train.config import RunConfig


def prepare_run_data(run: RunConfig, out_dir: Path
                     ) -> tuple[Tokenizer, Path, tuple[PackedLoader, Callable[[], Iterator], torch.Tensor]]:
    """(tokenizer, data dir, (train loader, fresh-val-batches factory, bytes per token id))."""
    sources = [Path(s) for s in run.data.sources]
    if not sources:
        raise ConfigError("data.sources is empty: pass --data PATH (text, JSONL, Parquet or a prepared data dir)")
    for source in sources:
        if not source.exists():
            raise ConfigError(f"{source}: no such file or directory")
    tokenizer = _tokenizer(run, out_dir, sources)
    data_dir = _data_dir(run, out_dir, sources, tokenizer)
    seq, batch, seed = run.data.seq_len, run.data.batch_size, run.run.seed
    train = PackedLoader(data_dir, "train", batch, seq, seed)
    try:  # opened now, not at the first evaluation: a split too small for one window must cost no training
        PackedLoader(data_dir, "val", batch, seq, seed)
    except ConfigError as err:
        raise ConfigError(f"{err}; give validation more text (data.val_fraction, --val-fraction of `data "
                          "prepare`) or shorten data.seq_len") from None

    def val_batches() -> Iterator:
        return PackedLoader(data_dir, "val", batch, seq, seed).iter_eval_batches()

    return tokenizer, data_dir, (train, val_batches, token_byte_lengths(tokenizer))


def _tokenizer(run: RunConfig, out_dir: Path, sources: list[Path]) -> Tokenizer:
    if run.data.tokenizer:
        return Tokenizer.load(run.data.tokenizer)
    own = out_dir / "tokenizer"
    if (own / "tokenizer.json").is_file():
        return Tokenizer.load(own)
    prepared = [s for s in sources if (s / "manifest.json").is_file()]
    if prepared:
        raise ConfigError(f"{prepared[0]}: a prepared data directory needs the tokenizer it was made with "
                          "(data.tokenizer / --tokenizer)")
    tokenizer = train_tokenizer_from_files(sources, run.data.vocab_size)
    tokenizer.save_pretrained(own)
    return tokenizer


def _data_dir(run: RunConfig, out_dir: Path, sources: list[Path], tokenizer: Tokenizer) -> Path:
    prepared = [s for s in sources if (s / "manifest.json").is_file()]
    if prepared:
        if len(sources) > 1:
            raise ConfigError(f"{prepared[0]}: a prepared data directory must be the only data source")
        verify(prepared[0], tokenizer=tokenizer)
        return prepared[0]
    target = out_dir / "data"
    if (target / "manifest.json").is_file():
        try:
            manifest = verify(target, tokenizer=tokenizer, sources=sources)
            same_split = (manifest.seed, manifest.val_fraction, manifest.text_field) == (
                run.run.seed, run.data.val_fraction, run.data.text_field)
            if same_split:
                return target
        except BehemothError:
            pass  # sources or tokenizer changed since: prepare again
    prepare(sources, tokenizer, target, val_fraction=run.data.val_fraction, seed=run.run.seed,
            text_field=run.data.text_field)
    return target


def token_byte_lengths(tokenizer: Tokenizer) -> torch.Tensor:
    """UTF-8 bytes each token id stands for (0 for special tokens), for bits per byte: in byte-level
    BPE every character of a token's string stands for one byte."""
    backend = tokenizer.backend
    special = set(backend.get_added_tokens_decoder())
    lengths = [0 if i in special else len(backend.id_to_token(i) or "") for i in range(tokenizer.vocab_size)]
    return torch.tensor(lengths, dtype=torch.long)
