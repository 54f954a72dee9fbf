"""Batched generation for programs rather than users (evaluation, RL rollouts, report samples), and
`load_engine`, which loads a model directory for `behemoth serve` and `behemoth chat`.

`complete` runs the server's `Engine` (not a second decoder) on the calling thread until every
prompt is answered. With one seed per prompt the results do not depend on which prompts share a
batch. The model is only borrowed: its training mode is restored, so RL can generate between steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from behemoth.checkpoint import load
from behemoth.errors import ConfigError
from behemoth.inference import compiled
from behemoth.inference.engine import Engine, Request
from behemoth.inference.sampling import SamplingParams
from behemoth.inference.weights import prepare_weights
from behemoth.model import Transformer
from behemoth.tokenizer import Tokenizer


@dataclass
class Completion:
    """What one prompt produced."""

    prompt_ids: list[int]
    token_ids: list[int]  # the generated tokens, a stop token included
    text: str  # their text, without a stop string or stop token
    logprobs: list[float]  # of each generated token under the model's raw distribution
    finish_reason: str  # "stop" or "length"


def complete(model: Transformer, tokenizer, prompts: Sequence[str | list[int]],
             params: SamplingParams | Sequence[SamplingParams] | None = None, max_batch_size: int = 32,
             progress: Callable[[int, int], None] | None = None) -> list[Completion]:
    """A completion for every prompt (text or token ids), in order; `params`: one for all or one per
    prompt; `progress(done, total)` as they finish. A bad prompt or setting raises before anything runs."""
    per_prompt = _params_per_prompt(params, len(prompts))
    ids = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    was_training = model.training
    engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_queue=max(len(ids), 1))
    try:
        requests = [engine.submit(prompt, p) for prompt, p in zip(ids, per_prompt)]  # all checked first
        done = 0

        def report() -> None:
            nonlocal done
            finished = sum(r.done for r in requests)
            if finished != done:
                done = finished
                progress(done, len(requests))

        engine.run_until_idle(report if progress is not None else None)
        return [_completion(request) for request in requests]
    finally:
        engine.close()
        model.train(was_training)


def _completion(request: Request) -> Completion:
    events = list(request)  # all delivered already; raises the error of a failed step
    return Completion(prompt_ids=request.prompt_ids, token_ids=[e.token_id for e in events],
                      text="".join(e.text for e in events), logprobs=[e.logprob for e in events],
                      finish_reason=request.finish_reason)


def _params_per_prompt(params: SamplingParams | Sequence[SamplingParams] | None, count: int
                       ) -> list[SamplingParams]:
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * count
    params = list(params)
    if len(params) != count:
        raise ConfigError(f"params: {len(params)} SamplingParams for {count} prompts; give one, or one per prompt")
    return params


def load_engine(directory: str | Path, max_batch_size: int = 16, max_queue: int = 256,
                max_context: int | None = None, threads: int | None = None, weights: str = "float32",
                compile: bool = False, adapters: dict[str, str | Path] | None = None) -> Engine:
    """A model directory (weights + tokenizer) in an engine, not started yet, with the weight format
    `weights` (inference.weights), compiled first if `compile`, its context capped at `max_context`;
    `adapters` {name: adapter folder} go over it side by side (a request's `params.adapter` picks
    one by its place in that order, from 1)."""
    folder = Path(directory)
    if not (folder / "tokenizer.json").is_file():
        raise ConfigError(f"{folder}: no tokenizer.json; use a model directory written with its tokenizer")
    if adapters and compile:
        raise ConfigError("LoRA adapters run on the eager decode step; --compile with adapters is not supported yet")
    tokenizer = Tokenizer.load(folder)
    model = load(folder)
    rows = None
    if adapters:
        from behemoth.lora_files import attach_adapter_dirs

        rows = attach_adapter_dirs(model, adapters)
    model = prepare_weights(model, weights)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(f"{folder}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                          f"{model.config.vocab_size}")
    context = model.config.max_position_embeddings
    if max_context is not None:
        if max_context < 2:
            raise ConfigError(f"--max-context must be at least 2, got {max_context}")
        context = min(context, max_context)
    decoder = compiled.CompiledDecoder(model, threads=threads) if compile else None
    return Engine(model, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue, max_context=context,
                  threads=threads, decoder=decoder, adapters=rows)
