"""Untrusted files: nothing is unpickled, lying safetensors headers are refused cheaply, and fuzzed
config and header bytes never raise anything but our typed errors."""

from __future__ import annotations

import ast
import json
import os
import shutil
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_reference import random_model
from reliability_support import record
from safetensors import safe_open
from safetensors.torch import save_file

import behemoth
from behemoth.checkpoint import MAX_HEADER_BYTES, read_safetensors_header
from behemoth.config import ModelConfig, preset
from behemoth.errors import BehemothError, CheckpointError
from behemoth.run_checkpoints import MANIFEST, verify_checkpoint
from behemoth.train.checkpointing import load_checkpoint
from behemoth.train.config import load_run_config

hypothesis = pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SOURCE = Path(__file__).resolve().parent.parent / "src" / "behemoth"
# BEHEMOTH_FUZZ_EXAMPLES raises the count for a longer run (scripts/reliability.py --slow does).
FUZZ = settings(max_examples=int(os.environ.get("BEHEMOTH_FUZZ_EXAMPLES", "300")), deadline=None, derandomize=True,
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# ------------------------------------------------------------------------------------------------
# Never unpickle
# ------------------------------------------------------------------------------------------------

# Modules that deserialise by running code, and calls that unpickle.
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "marshal", "cloudpickle"}
UNSAFE_CALLS = {"torch.load", "torch.jit.load", "torch.serialization.load", "pd.read_pickle", "pandas.read_pickle",
                "pickle.load", "pickle.loads", "pickle.Unpickler", "marshal.load", "marshal.loads"}
# pickle names a restricted unpickler may use: the class to subclass and its error.
RESTRICTED_PICKLE_NAMES = {"Unpickler", "UnpicklingError"}


def unsafe_uses(code: str, name: str) -> list[str]:
    """Imports of unsafe modules and unpickling calls in Python source (docstrings and comments,
    which may well say "pickle", are not code and are not looked at).

    One form is allowed: `import pickle` for a restricted unpickler, a `pickle.Unpickler` subclass
    whose `find_class` admits listed classes only, when the module uses pickle for nothing else.
    `np.load` must say allow_pickle=False; `torch.load` is never allowed.
    """
    tree = ast.parse(code, name)
    restricted = _is_restricted_unpickler_module(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"{name}:{node.lineno}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] in UNSAFE_MODULES and not (a.name == "pickle" and restricted)]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"{name}:{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            found += _unsafe_call(node, name)
    return found


def _unsafe_call(node: ast.Call, name: str) -> list[str]:
    called = ast.unparse(node.func)
    keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
    if called in UNSAFE_CALLS:
        return [f"{name}:{node.lineno}: {called}(...)"]
    if called in ("np.load", "numpy.load") and keywords.get("allow_pickle") != "False":
        return [f"{name}:{node.lineno}: {called}(...) without allow_pickle=False"]
    if keywords.get("allow_pickle", "False") != "False" or keywords.get("weights_only", "True") != "True":
        return [f"{name}:{node.lineno}: " + ", ".join(f"{k}={v}" for k, v in keywords.items()
                                                      if k in ("allow_pickle", "weights_only"))]
    return []


def _is_restricted_unpickler_module(tree: ast.Module) -> bool:
    """pickle is used only as `pickle.Unpickler` bases (each defining find_class) and its error."""
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and ast.unparse(n.value) == "pickle"}
    subclasses = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
                  and any(ast.unparse(b) == "pickle.Unpickler" for b in n.bases)]
    guarded = all(any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in c.body) for c in subclasses)
    return bool(subclasses) and guarded and used <= RESTRICTED_PICKLE_NAMES


def restricted_unpicklers() -> list[str]:
    return sorted(str(f.relative_to(SOURCE)) for f in SOURCE.rglob("*.py")
                  if "pickle" in f.read_text() and _is_restricted_unpickler_module(ast.parse(f.read_text())))


def test_the_scanner_sees_unpickling() -> None:
    code = ("import pickle\nfrom dill import loads\nimport torch\nx = torch.load('a')\n"
            "np.load('b', allow_pickle=True)\nnp.load('c')\nnp.load('d', allow_pickle=False)\n"
            "pickle.loads(b'')\nf(weights_only=False)\n'''never pickle'''  # pickle in a comment\n")
    assert [line.split(": ", 1)[1] for line in unsafe_uses(code, "x.py")] == [
        "import pickle", "from dill import ...", "torch.load(...)", "np.load(...) without allow_pickle=False",
        "np.load(...) without allow_pickle=False", "pickle.loads(...)", "weights_only=False"]
    restricted = ("import pickle\nclass R(pickle.Unpickler):\n    def find_class(self, m, n):\n"
                  "        raise pickle.UnpicklingError(m)\n")
    assert unsafe_uses(restricted, "r.py") == []
    assert unsafe_uses(restricted + "pickle.loads(b'')\n", "r.py") == ["r.py:1: import pickle", "r.py:5: pickle.loads(...)"]


def test_no_unpickling_anywhere_in_the_package() -> None:
    files = sorted(SOURCE.rglob("*.py"))
    assert len(files) > 20
    found = [use for file in files for use in unsafe_uses(file.read_text(), str(file.relative_to(SOURCE)))]
    assert found == []
    record("untrusted_files", source_files_scanned=len(files), restricted_unpicklers=len(restricted_unpicklers()))


class Canary:
    """Unpickling this creates a directory: proof that a pickle was (wrongly) executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return behemoth.save(random_model(preset("tiny"), seed=0), tmp_path_factory.mktemp("model") / "model")


def with_weights(model_dir: Path, tmp_path: Path, data: bytes, name: str = "model.safetensors") -> Path:
    directory = tmp_path / "lying"
    directory.mkdir()
    shutil.copy(model_dir / "config.json", directory / "config.json")
    (directory / name).write_bytes(data)
    return directory


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin", "model.pt", "model.ckpt"])
def test_pickle_bearing_weights_are_refused_unopened(model_dir, tmp_path, name) -> None:
    marker = tmp_path / "unpickled"
    pickled = tmp_path / "pickled"
    torch.save({"canary": Canary(marker), "w": torch.ones(2)}, pickled)
    directory = with_weights(model_dir, tmp_path, pickled.read_bytes(), name)
    with pytest.raises(CheckpointError, match="pickle|not a valid safetensors"):
        behemoth.load(directory)
    assert not marker.exists()
    record("untrusted_files", pickle_files_refused=1)


def test_pickle_in_a_training_checkpoint_with_a_forged_manifest_is_not_run(model_dir, tmp_path) -> None:
    """Even with the manifest rewritten to match, a pickled trainer.safetensors is never unpickled."""
    from behemoth.train.optim import build_optimizer
    from behemoth.train.config import RunConfig

    checkpoint = tmp_path / "step-000001"
    shutil.copytree(model_dir, checkpoint)
    marker = tmp_path / "unpickled"
    torch.save({"canary": Canary(marker)}, checkpoint / "trainer.safetensors")
    (checkpoint / "trainer.json").write_text("{}")
    files = {p.name: {"sha256": __import__("hashlib").sha256(p.read_bytes()).hexdigest(), "bytes": p.stat().st_size}
             for p in checkpoint.iterdir()}
    (checkpoint / MANIFEST).write_text(json.dumps({"step": 1, "files": files}))
    verify_checkpoint(checkpoint)
    model = random_model(preset("tiny"), seed=0)
    with pytest.raises(Exception):
        load_checkpoint(checkpoint, model, build_optimizer(model, RunConfig().optim))
    assert not marker.exists()
    record("untrusted_files", pickle_files_refused=1)


# ------------------------------------------------------------------------------------------------
# Lying safetensors headers
# ------------------------------------------------------------------------------------------------

def safetensors_bytes(header: Any, data: bytes = b"", length: int | None = None, raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


F32x4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
LIES = {
    "length-beyond-file": safetensors_bytes({"a": F32x4}, b"\0" * 16, length=10_000),
    "length-2^63": safetensors_bytes({"a": F32x4}, b"\0" * 16, length=2**63),
    "length-over-cap": safetensors_bytes({}, length=MAX_HEADER_BYTES + 1),
    "shorter-than-length-field": b"\x05\0\0",
    "empty-file": b"",
    "not-json": safetensors_bytes(None, raw=b"{not json"),
    "not-utf8": safetensors_bytes(None, raw=b'{"\xff": 1}'),
    "not-an-object": safetensors_bytes([1, 2]),
    "nested-deeply": safetensors_bytes(None, raw=b"[" * 100_000 + b"]" * 100_000),
    "duplicate-names": safetensors_bytes(None, b"\0" * 32, raw=(
        b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},'
        b' "a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}')),
    "unknown-dtype": safetensors_bytes({"a": {**F32x4, "dtype": "F128"}}, b"\0" * 16),
    "dtype-not-a-string": safetensors_bytes({"a": {**F32x4, "dtype": 4}}, b"\0" * 16),
    "negative-dim": safetensors_bytes({"a": {**F32x4, "shape": [-4]}}, b"\0" * 16),
    "bool-dim": safetensors_bytes({"a": {**F32x4, "shape": [True, 4]}}, b"\0" * 16),
    "float-dim": safetensors_bytes({"a": {**F32x4, "shape": [4.0]}}, b"\0" * 16),
    "rank-1000": safetensors_bytes({"a": {**F32x4, "shape": [1] * 1000}}, b"\0" * 16),
    "size-mismatch": safetensors_bytes({"a": {**F32x4, "shape": [5]}}, b"\0" * 16),
    "size-claims-a-terabyte": safetensors_bytes({"a": {"dtype": "F32", "shape": [2**18, 2**20],
                                                       "data_offsets": [0, 2**40]}}, b"\0" * 16),
    "offsets-reversed": safetensors_bytes({"a": {**F32x4, "data_offsets": [16, 0]}}, b"\0" * 16),
    "offsets-negative": safetensors_bytes({"a": {**F32x4, "data_offsets": [-16, 0]}}, b"\0" * 16),
    "offsets-past-the-end": safetensors_bytes({"a": {**F32x4, "data_offsets": [16, 32]}}, b"\0" * 16),
    "offsets-missing": safetensors_bytes({"a": {"dtype": "F32", "shape": [4]}}, b"\0" * 16),
    "overlapping-ranges": safetensors_bytes({"a": F32x4, "b": {**F32x4, "data_offsets": [8, 24]}}, b"\0" * 24),
    "same-range-twice": safetensors_bytes({"a": F32x4, "b": F32x4}, b"\0" * 16),
    "gap-between-ranges": safetensors_bytes({"a": F32x4, "b": {**F32x4, "data_offsets": [20, 36]}}, b"\0" * 36),
    "trailing-bytes": safetensors_bytes({"a": F32x4}, b"\0" * 20),
    "entry-not-an-object": safetensors_bytes({"a": [0, 16]}, b"\0" * 16),
    "metadata-not-strings": safetensors_bytes({"__metadata__": {"format": 1}, "a": F32x4}, b"\0" * 16),
}


@pytest.mark.parametrize("case", sorted(LIES))
def test_lying_header_is_refused_cheaply(model_dir, tmp_path, case) -> None:
    data = LIES[case]
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError) as info:
            read_safetensors_header(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert peak < 8 * len(data) + (1 << 20), f"{peak} bytes allocated to refuse a {len(data)}-byte file"
    with pytest.raises(CheckpointError, match="model.safetensors"):
        behemoth.load(with_weights(model_dir, tmp_path, data))
    record("lying_headers", cases_refused=1)


def test_truthful_headers_read_like_the_reference_library(tmp_path) -> None:
    tensors = {"a": torch.ones(3, 2), "b": torch.zeros(0, dtype=torch.bfloat16), "c": torch.arange(5),
               "d": torch.ones(2, dtype=torch.float16), "e": torch.tensor(True)}
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    ours = read_safetensors_header(path)
    with safe_open(str(path), framework="pt") as reader:
        assert set(ours) == set(reader.keys())
        for key, info in ours.items():
            view = reader.get_slice(key)
            assert (info.shape, info.dtype) == (tuple(view.get_shape()), view.get_dtype())


# ------------------------------------------------------------------------------------------------
# Fuzzing the readers
# ------------------------------------------------------------------------------------------------

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                         st.text(max_size=12))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
DTYPES = st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "C64", "F8_E4M3", "X9"])


@st.composite
def tensor_entries(draw) -> dict[str, Any]:
    """Headers that are mostly well formed, with offsets that may or may not add up."""
    entries, position = {}, 0
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(DTYPES)
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        size = draw(st.sampled_from([None, 0, 1, 7])) if draw(st.booleans()) else None
        nbytes = size if size is not None else (4 if dtype == "X9" else 1)
        for dim in shape:
            nbytes *= dim
        begin = position + draw(st.sampled_from([0, 0, 0, -1, 1]))
        entry: Any = {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + nbytes]}
        if draw(st.integers(0, 9)) == 0:
            entry = draw(JSON_VALUES)
        entries[f"t{i}" if draw(st.integers(0, 9)) else ""] = entry
        position = begin + nbytes
    if draw(st.booleans()):
        entries["__metadata__"] = draw(st.one_of(st.dictionaries(st.text(max_size=5), st.text(max_size=5)), JSON_VALUES))
    return entries


@st.composite
def safetensors_files(draw) -> bytes:
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=64))
    header = json.dumps(draw(tensor_entries())).encode()
    if draw(st.integers(0, 5)) == 0:
        header = draw(st.binary(max_size=32)) + header[draw(st.integers(0, len(header))):]
    data = draw(st.binary(max_size=48))
    length = len(header) + draw(st.sampled_from([0, 0, 0, 1, -1, 2**32, 2**64 - 1 - len(header)]))
    return struct.pack("<Q", max(length, 0)) + header + data


def test_fuzz_safetensors_header_reader(tmp_path) -> None:
    """Any bytes: our reader returns tensors or raises CheckpointError; when it accepts a file, the
    reference library reads every tensor of it with the same shape and dtype."""
    path = tmp_path / "fuzz.safetensors"
    counts = {"inputs": 0, "accepted": 0}

    @FUZZ
    @given(data=safetensors_files())
    def check(data: bytes) -> None:
        counts["inputs"] += 1
        path.write_bytes(data)
        try:
            ours = read_safetensors_header(path)
        except CheckpointError:
            return
        counts["accepted"] += 1
        with safe_open(str(path), framework="numpy") as reader:
            assert set(reader.keys()) == set(ours)
            for key, info in ours.items():
                view = reader.get_slice(key)
                assert (tuple(view.get_shape()), view.get_dtype()) == (info.shape, info.dtype)

    check()
    assert counts["accepted"] > 10  # the generator reaches valid files, not only garbage
    record("fuzz_safetensors_header", inputs=counts["inputs"])


def mutated(base: dict[str, Any], changes: dict[str, Any], dropped: list[str]) -> dict[str, Any]:
    data = {k: v for k, v in base.items() if k not in dropped}
    data.update(changes)
    return data


TINY_HF = preset("tiny").to_hf_dict()
HF_KEYS = st.sampled_from(sorted(TINY_HF) + ["rope_theta", "rope_scaling", "text_config", "vision_config"])


def test_fuzz_model_config_json() -> None:
    """config.json: any values under any known key (and any bytes as the file) give a ModelConfig or a
    ConfigError, never another exception."""
    counts = {"inputs": 0}

    changes_strategy = st.dictionaries(HF_KEYS, JSON_VALUES, max_size=4)

    @FUZZ
    @given(changes=changes_strategy, dropped=st.lists(HF_KEYS, max_size=3),
           form=st.sampled_from(["5", "4", "multimodal"]))
    def check(changes: dict[str, Any], dropped: list[str], form: str) -> None:
        counts["inputs"] += 1
        base = preset("tiny").to_hf_dict("4" if form == "4" else "5")
        data = mutated(base, changes, dropped)
        if form == "multimodal":
            data = {"architectures": ["Llama4ForConditionalGeneration"], "text_config": data}
        try:
            ModelConfig.from_hf_dict(json.loads(json.dumps(data)), "config.json")
        except BehemothError:
            pass

    check()
    record("fuzz_config_json", inputs=counts["inputs"])


@pytest.mark.parametrize("architectures", [5, 1.5, True])
def test_config_json_with_architectures_not_a_list_is_a_config_error(architectures) -> None:
    with pytest.raises(BehemothError):
        ModelConfig.from_hf_dict({**preset("tiny").to_hf_dict(), "architectures": architectures}, "config.json")


def test_fuzz_model_config_file_bytes(tmp_path) -> None:
    path = tmp_path / "config.json"
    counts = {"inputs": 0}

    @FUZZ
    @given(data=st.one_of(st.binary(max_size=64), JSON_VALUES.map(lambda v: json.dumps(v).encode())))
    def check(data: bytes) -> None:
        counts["inputs"] += 1
        path.write_bytes(data)
        try:
            ModelConfig.load(path)
        except BehemothError:
            pass

    check()
    record("fuzz_config_json", inputs=counts["inputs"])


RUN_SECTIONS = ["model", "data", "optim", "balance", "distill", "dpo", "run", "other"]
RUN_KEYS = ["preset", "lr", "steps", "seq_len", "schedule", "dtype", "sources", "max_bad_steps", "alpha", "beta",
            "hidden_size", "warmup_steps", "grad_accum", "bias_update_rate", "compile", "nonsense"]
TOML_VALUES = st.recursive(
    st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(), st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(min_size=1, max_size=6), inner,
                                                                         max_size=3)), max_leaves=8)


def test_fuzz_run_config_toml(tmp_path) -> None:
    """Run TOML files and --set overrides: a RunConfig or a ConfigError, whatever the text."""
    import tomli_w

    path = tmp_path / "run.toml"
    counts = {"inputs": 0}

    @FUZZ
    @given(tables=st.dictionaries(st.sampled_from(RUN_SECTIONS), st.dictionaries(st.sampled_from(RUN_KEYS),
                                                                                TOML_VALUES, max_size=3), max_size=3),
           garbage=st.one_of(st.none(), st.text(max_size=40)),
           overrides=st.lists(st.text(max_size=30) | st.builds("{}.{}={}".format, st.sampled_from(RUN_SECTIONS),
                                                                 st.sampled_from(RUN_KEYS), st.text(max_size=10)),
                              max_size=2))
    def check(tables: dict[str, Any], garbage: str | None, overrides: list[str]) -> None:
        counts["inputs"] += 1
        text = garbage if garbage is not None else tomli_w.dumps(tables)
        path.write_text(text, encoding="utf-8", errors="surrogatepass") if _encodable(text) else path.write_bytes(b"\xff")
        try:
            load_run_config(path, overrides)
        except BehemothError:
            pass

    check()
    record("fuzz_run_toml", inputs=counts["inputs"])


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False
