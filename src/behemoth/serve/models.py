"""The models a server answers for: `ServedModel`, `--model` specs, and loading a model folder."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from behemoth.checkpoint import model_name
from behemoth.errors import ConfigError
from behemoth.inference.engine import Engine
from behemoth.inference.offline import load_engine
from behemoth.inference.prompts import TokenText
from behemoth.tokenizer import Tokenizer

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # behemoth.release checks release names with it


@dataclass
class ServedModel:
    """A model the server answers for: its engine (owned by the app), tokenizer and context."""

    name: str
    engine: Engine
    tokenizer: Tokenizer
    context: int
    created: int = field(default_factory=lambda: int(time.time()))
    adapter: int = 0  # a LoRA adapter over `parent`'s weights, in the same engine (0: the model itself)
    parent: str | None = None

    def __post_init__(self) -> None:
        if not MODEL_NAME.match(self.name):
            raise ConfigError(f"model name {self.name!r}: use 1-64 letters, digits or ._- starting with a letter "
                              "or digit")
        self.text = TokenText(self.tokenizer)


def parse_model_specs(specs: list[str]) -> dict[str, Path]:
    """`DIR` or `NAME=DIR` -> {name: dir}; a bare DIR is named after its folder (its run's, for
    RUN/model: `checkpoint.model_name`)."""
    named: dict[str, Path] = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if sep and MODEL_NAME.match(name) and not Path(spec).exists():
            directory = Path(rest)
        else:
            directory = Path(spec)
            name = model_name(directory)
            if not MODEL_NAME.match(name):
                raise ConfigError(f"--model {spec}: the folder name {name!r} is not a usable model name; "
                                  "give one as NAME=DIR")
        if name in named:
            raise ConfigError(f"--model: two models are named {name!r}; give names as NAME=DIR")
        named[name] = directory
    if not named:
        raise ConfigError("give at least one --model DIR")
    return named


def parse_lora_specs(specs: list[str], models: dict[str, Path]) -> dict[str, Path]:
    """`--lora NAME=DIR` -> {name: adapter folder}, served over the one `--model`."""
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not MODEL_NAME.match(name) or not folder:
            raise ConfigError(f"--lora {spec}: expected NAME=ADAPTER_DIR (NAME: 1-64 letters, digits or ._-)")
        if name in adapters or name in models:
            raise ConfigError(f"--lora {spec}: the name {name!r} is already taken")
        if not (Path(folder) / "adapter_config.json").is_file():  # before minutes of loading
            raise ConfigError(f"--lora {spec}: {folder} has no adapter_config.json (not an adapter folder)")
        adapters[name] = Path(folder)
    if adapters and len(models) != 1:
        raise ConfigError(f"--lora: adapters go over one base model; give exactly one --model (got {len(models)})")
    return adapters


def load_served_model(name: str, directory: str | Path, max_batch_size: int = 16, max_queue: int = 256,
                      max_context: int | None = None, threads: int | None = None,
                      weights: str = "float32", compile: bool = False,
                      adapters: dict[str, Path] | None = None) -> ServedModel:
    """A model directory in an engine (`inference.load_engine`, not started yet) served as `name`,
    with `adapters` {name: LoRA adapter folder} over it in the same engine (`served_adapters`)."""
    engine = load_engine(directory, max_batch_size, max_queue, max_context, threads, weights, compile, adapters)
    return ServedModel(name=name, engine=engine, tokenizer=engine.tokenizer, context=engine.max_context)


def served_adapters(base: ServedModel) -> list[ServedModel]:
    """The models a base's engine serves besides the base: one per LoRA adapter, named as it was given."""
    names = [] if base.engine.adapters is None else base.engine.adapters.names
    return [ServedModel(name=name, engine=base.engine, tokenizer=base.tokenizer, context=base.context,
                        adapter=index, parent=base.name) for index, name in enumerate(names, start=1)]
