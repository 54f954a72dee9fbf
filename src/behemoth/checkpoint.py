"""Model directories in the Hugging Face layout, our native format: config.json, safetensors
weights (or shards and their index), generation_config.json and the tokenizer if any.

`transformers` loads what `save` writes; `load` reads `Llama4ForCausalLM` and the text weights of
`Llama4ForConditionalGeneration`. Only safetensors are read, never a pickle, and every tensor's
name, shape and dtype is checked against the config before any weight is used.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from behemoth.config import ModelConfig
from behemoth.durable import fsync_tree, staging_folder
from behemoth.errors import CheckpointError, ConfigError
from behemoth.model import Transformer

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# Prefixes of a Llama4ForConditionalGeneration checkpoint: text weights are kept, vision dropped.
TEXT_PREFIX = "language_model."
IGNORED_PREFIXES = ("vision_model.", "multi_modal_projector.")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


# -- loading --------------------------------------------------------------------------------------

def empty_model(config: ModelConfig, dtype: torch.dtype, device: str | torch.device = "cpu") -> Transformer:
    """A model of `config` with uninitialised weights of `dtype` on `device`, to be loaded into
    (built on the meta device: no time spent initialising what is overwritten)."""
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device=device)
    model.tie_weights()
    model.to(dtype)
    # After the cast: RoPE frequencies stay float32, as in transformers (rounded to bfloat16 they
    # are off by a radian at a few thousand positions).
    model.reset_buffers()
    return model


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Transformer:
    """Load a model directory (config.json + safetensors) into a `Transformer`; dtype None keeps
    the dtype the weights are stored in."""
    config, files, entries = _checked_directory(path)
    model = empty_model(config, dtype or _SAFETENSORS_FLOAT_DTYPES[next(iter(entries.values())).dtype], device)
    params = model.state_dict()
    with torch.no_grad():
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as reader:
                    for name, entry in entries.items():
                        if entry.file == file:
                            params[name].copy_(reader.get_tensor(entry.key))
            except (SafetensorError, OSError) as err:  # e.g. the file changed since its header was checked
                raise CheckpointError(f"{file}: cannot be read ({err})") from None
    return model


def check_model_dir(path: str | Path) -> ModelConfig:
    """Check a model directory without loading its weights: config, and every tensor's name, shape and dtype."""
    return _checked_directory(path)[0]


def _checked_directory(path: str | Path) -> tuple[ModelConfig, list[Path], dict[str, "_Entry"]]:
    directory = model_directory(path)
    config = ModelConfig.load(directory / CONFIG_NAME)
    files = weight_files(directory)
    entries = _index_tensors(files)
    _check_entries(entries, expected_shapes(config), config, files)
    return config, files, entries


@dataclass
class _Entry:
    """Where a tensor lives and what its header says."""

    file: Path
    key: str
    shape: tuple[int, ...]
    dtype: str


def _index_tensors(files: list[Path]) -> dict[str, _Entry]:
    """Text-model tensors by our name (multimodal prefixes stripped, vision tensors skipped)."""
    entries: dict[str, _Entry] = {}
    for file in files:
        for key, info in read_safetensors_header(file).items():
            if key.startswith(IGNORED_PREFIXES):
                continue
            name = key[len(TEXT_PREFIX):] if key.startswith(TEXT_PREFIX) else key
            entries[name] = _Entry(file, key, info.shape, info.dtype)
    if not entries:
        raise CheckpointError(f"{files[0]}: holds no text-model tensors")
    return entries


# -- the safetensors header, read and checked by us before the library maps the file --------------

SAFETENSORS_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2,
                           "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8,
                           "F64": 8, "C64": 8}
# The reference implementation's cap: a header larger than this is refused before it is read.
MAX_HEADER_BYTES = 100_000_000
MAX_RANK = 16


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its safetensors header describes it (offsets relative to the data section)."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """The tensors a safetensors file holds, once its header is checked: its length against the file
    size before reading it (a lying length never makes us allocate what it claims), then every
    tensor's dtype, shape and byte range, and that the ranges tile the data section exactly."""
    try:
        with open(file, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{file}: not a valid safetensors file ({size} bytes, shorter than "
                                      "its 8-byte header length)")
            length = int.from_bytes(prefix, "little")
            if length > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(f"{file}: not a valid safetensors file (header length {length} exceeds "
                                      f"the file's {size} bytes or the {MAX_HEADER_BYTES}-byte cap)")
            raw = handle.read(length)
    except OSError as err:
        raise CheckpointError(f"{file}: cannot be read ({err.strerror or err})") from None
    if len(raw) != length:
        raise CheckpointError(f"{file}: not a valid safetensors file (the file shrank while being read)")
    tensors = _parse_header(file, raw)
    _check_layout(file, tensors, size - 8 - length)
    return tensors


def _parse_header(file: Path, raw: bytes) -> dict[str, TensorInfo]:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise CheckpointError(f"{file}: not a valid safetensors file (header is not JSON: "
                              f"{str(err)[:200]})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: not a valid safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{file}: not a valid safetensors file (__metadata__ must map names to strings)")
    return {key: _tensor_info(file, key, value) for key, value in header.items()}


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key[:100]!r}")
        result[key] = value
    return result


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_info(file: Path, key: str, value: Any) -> TensorInfo:
    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"{file}: tensor {key[:200]!r}: {problem} (not a valid safetensors file)")

    if not isinstance(value, dict):
        raise bad("its entry is not an object")
    dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_BYTES:
        raise bad(f"unknown dtype {str(dtype)[:32]!r}")
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(_is_count(d) for d in shape):
        raise bad(f"shape must be a list of at most {MAX_RANK} non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)
            or offsets[0] > offsets[1]):
        raise bad("data_offsets must be [begin, end] with 0 <= begin <= end")
    count = math.prod(shape)
    if (offsets[1] - offsets[0]) != count * SAFETENSORS_DTYPE_BYTES[dtype]:
        raise bad(f"shape {shape} of {dtype} needs {count * SAFETENSORS_DTYPE_BYTES[dtype]} bytes, "
                  f"its range holds {offsets[1] - offsets[0]}")
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])


def _check_layout(file: Path, tensors: dict[str, TensorInfo], data_bytes: int) -> None:
    """The byte ranges must tile the data section: sorted, each starting where the last ended."""
    position = 0
    for key, info in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin != position:
            problem = "overlaps another tensor" if info.begin < position else f"leaves a gap before byte {info.begin}"
            raise CheckpointError(f"{file}: tensor {key[:200]!r}: its byte range {problem} "
                                  "(not a valid safetensors file)")
        position = info.end
    if position != data_bytes:
        raise CheckpointError(f"{file}: not a valid safetensors file (tensors end at byte {position} of a "
                              f"{data_bytes}-byte data section)")


_SAFETENSORS_FLOAT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def model_name(folder: str | Path) -> str:
    """The name a model goes by: its folder's, or its run's where the folder is the trainer's own
    (runs/mine/model -> "mine", runs/mine/checkpoints/step-000100 -> "mine-step-000100"), so that
    models of different runs do not all release as "model"."""
    folder = Path(folder).resolve()
    if folder.name == "model" and folder.parent.name:
        return folder.parent.name
    if folder.parent.name == "checkpoints" and folder.parent.parent.name:
        return f"{folder.parent.parent.name}-{folder.name}"
    return folder.name


def model_directory(path: str | Path) -> Path:
    """`path`, checked to be a model directory (a run folder is refused, naming its model)."""
    directory = Path(path)
    if not directory.exists():
        raise CheckpointError(f"{directory}: no such directory")
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory (expected a model directory with config.json)")
    if (directory / "model" / CONFIG_NAME).is_file() and not (directory / CONFIG_NAME).is_file():
        raise CheckpointError(f"{directory}: a run folder, not a model directory; its model is {directory / 'model'}")
    if not (directory / CONFIG_NAME).is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_NAME} (not a model directory)")
    return directory


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a model directory, single or sharded; refuse pickle formats."""
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from None
        files = []
        for name in names:
            file = (directory / name)
            if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
                raise CheckpointError(f"{index}: shard name {name!r} is not a safetensors file in this directory")
            if not file.is_file():
                raise CheckpointError(f"{index}: names shard {name}, which is missing")
            files.append(file)
        return files
    single = directory / WEIGHTS_NAME
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(f"{directory / pickles[0]}: pickle-based weights are never loaded "
                              "(unsafe); convert the checkpoint to safetensors")
    raise CheckpointError(f"{directory}: no {WEIGHTS_NAME} or {INDEX_NAME}")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name the model needs, with its shape, computed without allocating weights."""
    with torch.device("meta"):
        model = Transformer(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _check_entries(entries: dict[str, _Entry], expected: dict[str, tuple[int, ...]],
                   config: ModelConfig, files: list[Path]) -> None:
    for name, entry in entries.items():
        if name not in expected:
            raise CheckpointError(f"{entry.file}: unexpected tensor {entry.key!r} "
                                  "(not part of this Llama 4 text model)")
        if entry.shape != expected[name]:
            raise CheckpointError(f"{entry.file}: tensor {entry.key!r} has shape {list(entry.shape)}, "
                                  f"expected {list(expected[name])} from config.json")
        if entry.dtype not in _SAFETENSORS_FLOAT_DTYPES:
            raise CheckpointError(f"{entry.file}: tensor {entry.key!r} has dtype {entry.dtype}, "
                                  f"expected one of {', '.join(_SAFETENSORS_FLOAT_DTYPES)}")
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(set(expected) - set(entries) - optional)
    if missing:
        where = files[0] if len(files) == 1 else files[0].parent / INDEX_NAME
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: missing tensor {missing[0]!r}{more}")


# -- saving ---------------------------------------------------------------------------------------

def save(model: Transformer, path: str | Path, tokenizer: Any = None, *, config_form: str = "5",
         max_shard_bytes: int = 5 * 2**30, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `model` (and the tokenizer, if given) as a model directory, assembled in a temporary
    sibling and renamed into place: readers see the old directory or the new one. `state`: the
    weights to write instead of the model's own (a LoRA model's merged weights)."""
    target = Path(path)
    with staging_folder(target) as staging:
        write_model_files(model, staging, config_form=config_form, max_shard_bytes=max_shard_bytes, state=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        fsync_tree(staging)
        replace_directory(staging, target)
    return target


def write_model_files(model: Transformer, directory: Path, *, config_form: str = "5",
                      max_shard_bytes: int = 5 * 2**30, state: dict[str, torch.Tensor] | None = None) -> None:
    """config.json, generation_config.json and safetensors weights (`state`, default the model's
    state dict) into an existing directory."""
    write_config_files(model.config, model.dtype, directory, config_form)
    state = model.state_dict() if state is None else state
    state = {name: t.detach().to("cpu").contiguous() for name, t in state.items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the tie is in config.json; safetensors refuses shared storage
    shards = _split_into_shards(state, max_shard_bytes)
    names = [WEIGHTS_NAME] if len(shards) == 1 else [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                                     for i in range(1, len(shards) + 1)]
    for name, shard in zip(names, shards):
        save_safetensors(shard, directory / name, metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def write_config_files(config: ModelConfig, dtype: torch.dtype, directory: Path, config_form: str = "5") -> None:
    """config.json (naming the weights' `dtype`) and generation_config.json of a model directory."""
    dtype_name = next((k for k, v in DTYPES.items() if v == dtype), None)
    if dtype_name is None:
        raise ConfigError(f"cannot save weights of dtype {dtype}")
    hf_config = config.to_hf_dict(config_form)
    hf_config["torch_dtype" if config_form == "4" else "dtype"] = dtype_name
    (directory / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2) + "\n")
    generation = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                  if getattr(config, k) is not None}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, its I/O failures (a full disk) raised as the OSError they are."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as err:
        code = _os_error_code(err)
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(path)) from None


# What a failed write raises: OSError, or safetensors' own error wrapping one (its writer is Rust).
WRITE_ERRORS = (OSError, SafetensorError)


def write_failure(err: BaseException) -> str | None:
    """The system's reason a write failed ("No space left on device"), or None if `err` is no I/O error."""
    if isinstance(err, OSError):
        return err.strerror or str(err)
    code = _os_error_code(err) if isinstance(err, SafetensorError) else None
    return os.strerror(code) if code is not None else None


def _os_error_code(err: BaseException) -> int | None:
    found = re.search(r"os error (\d+)", str(err))
    return int(found.group(1)) if found else None


def _split_into_shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def replace_directory(staging: Path, target: Path) -> None:
    """Move `staging` to `target`; an existing target is swapped out, then removed."""
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target}: exists and is not a directory")
    if not target.exists():
        os.rename(staging, target)
        return
    retired = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.rename(target, retired)
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(retired, target)  # put the old model back rather than leave nothing
        raise
    shutil.rmtree(retired, ignore_errors=True)
