"""Export a model directory as a Hugging Face folder that `transformers` loads as `Llama4ForCausalLM`.

Our model directories already are that format, so exporting is a checked copy: the weights are
verified against the config first, only the files a Hugging Face folder needs are copied, and
the folder is assembled beside its destination and renamed into place.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from behemoth.durable import fsync_tree, staging_folder
from behemoth.errors import CheckpointError

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def hf_files(model_dir: Path) -> list[Path]:
    """The files of `model_dir` that make up its Hugging Face folder (weights, config, tokenizer)."""
    from behemoth.checkpoint import INDEX_NAME, weight_files

    files = [model_dir / name for name in CONFIG_FILES]
    if (model_dir / INDEX_NAME).is_file():
        files.append(model_dir / INDEX_NAME)
    files += weight_files(model_dir)
    files += [model_dir / name for name in TOKENIZER_FILES]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{model_dir}: no {missing[0]}; a release needs the weights, config and tokenizer")
    return files


def copy_hf_files(model_dir: str | Path, destination: Path) -> list[str]:
    """Check the weights load, then copy the Hugging Face files into an existing folder; their names."""
    from behemoth.checkpoint import check_model_dir

    folder = Path(model_dir)
    files = hf_files(folder)
    check_model_dir(folder)  # names, shapes and dtypes match the config, or CheckpointError
    for file in files:
        shutil.copyfile(file, destination / file.name)
    return [f.name for f in files]


def export_hf(model_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the Hugging Face folder of `model_dir` to `out_dir` (refused if it exists, unless overwrite)."""
    target = Path(out_dir)
    if target.exists() and not overwrite:
        raise CheckpointError(f"{target}: already exists; choose another --out (exports never overwrite)")
    with staging_folder(target) as staging:
        copy_hf_files(model_dir, staging)
        fsync_tree(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    return target
