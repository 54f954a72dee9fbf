"""Data: documents from files, the embedded corpus, token shards and the packed resumable loader.

    iter_documents(paths, text_field="text")   Documents from text / JSONL / Parquet / datasets folders
    embedded_corpus(cache_dir) -> Path          the World English Bible, extracted once (speedrun corpus)
    prepare(paths, tokenizer, out_dir, ...)     train/val token shards + manifest.json -> Manifest
    load_manifest(dir), verify(dir, tokenizer)  read / check a prepared folder
    PackedLoader(dir, split, batch_size, seq_len, seed)  next_batch(), state_dict(), iter_eval_batches()
"""

from behemoth.data.embedded import embedded_corpus
from behemoth.data.loader import PackedLoader
from behemoth.data.shards import Manifest, ShardInfo, SourceInfo, load_manifest, prepare, token_dtype, verify
from behemoth.data.sources import END_MARKERS, Document, SourceFile, iter_documents, source_files

__all__ = ["Document", "SourceFile", "END_MARKERS", "iter_documents", "source_files", "embedded_corpus",
           "prepare", "load_manifest", "verify", "token_dtype", "Manifest", "ShardInfo", "SourceInfo",
           "PackedLoader"]
