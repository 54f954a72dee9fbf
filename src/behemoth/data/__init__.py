"""Data: documents from files (iter_documents), the embedded corpus, train/val token shards with their
manifest (prepare, load_manifest, verify), and the packed, resumable loader (PackedLoader)."""

from behemoth.data.embedded import embedded_corpus
from behemoth.data.loader import PackedLoader
from behemoth.data.shards import Manifest, ShardInfo, SourceInfo, load_manifest, prepare, token_dtype, verify
from behemoth.data.sources import END_MARKERS, Document, SourceFile, iter_documents, source_files

__all__ = ["Document", "SourceFile", "END_MARKERS", "iter_documents", "source_files", "embedded_corpus",
           "prepare", "load_manifest", "verify", "token_dtype", "Manifest", "ShardInfo", "SourceInfo",
           "PackedLoader"]
