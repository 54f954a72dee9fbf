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


def load_served_model(name: str, directory: str | Path, max_batch_size: int = 16, max_queue: int = 256,
                      max_context: int | None = None, threads: int | None = None,
                      weights: str = "float32", compile: bool = False) -> ServedModel:
    """A model directory in an engine (`inference.load_engine`, not started yet) served as `name`."""
    engine = load_engine(directory, max_batch_size, max_queue, max_context, threads, weights, compile)
    return ServedModel(name=name, engine=engine, tokenizer=engine.tokenizer, context=engine.max_context)
