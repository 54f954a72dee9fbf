"""`behemoth merge`: a base model directory plus a LoRA adapter directory -> a plain model directory
holding the merged weights, which loads wherever the base does (eval, gate, serve, export).

Everything is checked before anything is written: the adapter directory, the base, that the
adapter's tensors fit the base's shapes, and that the base is the one the adapter was trained on
(`checkpoint.base_sha256`); the output is assembled beside its destination and renamed into place.
"""

from __future__ import annotations

from pathlib import Path

from behemoth.errors import CheckpointError


def merge_adapter(model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path,
                  overwrite: bool = False) -> Path:
    """Write base `model_dir` with the adapters of `adapter_dir` merged in as the model directory `out_dir`."""
    from behemoth.checkpoint import load, model_directory, save
    from behemoth.lora_files import base_sha256, load_adapter_into
    from behemoth.model.lora import merge_lora
    from behemoth.tokenizer import Tokenizer

    model_dir, adapter_dir, out_dir = Path(model_dir), Path(adapter_dir), Path(out_dir)
    if not adapter_dir.is_dir():
        raise CheckpointError(f"{adapter_dir}: no such adapter directory")
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"{out_dir}: already exists; choose another --out, or pass --overwrite")
    if out_dir.exists() and out_dir.resolve() in (model_dir.resolve(), adapter_dir.resolve()):
        raise CheckpointError(f"{out_dir}: is an input of the merge; choose another --out")
    model = load(model_directory(model_dir))
    base = base_sha256(model)
    info = load_adapter_into(model, adapter_dir, attach=True)
    if info.base_sha256 not in (None, base):
        raise CheckpointError(f"{adapter_dir}: was trained on another base ({info.base_model}, sha256 "
                              f"{info.base_sha256[:12]}...); {model_dir} has sha256 {base[:12]}...")
    tokenizer = Tokenizer.load(model_dir) if (model_dir / "tokenizer.json").is_file() else None
    return save(merge_lora(model).eval(), out_dir, tokenizer=tokenizer)
