"""Batched generation for programs rather than users: evaluation, RL rollouts, report samples.

    completions = complete(model, tokenizer, ["In the beginning", "And God said"],
                           SamplingParams(max_new_tokens=32, temperature=0.0))
    completions[0].text, completions[0].token_ids, completions[0].logprobs, completions[0].finish_reason

`complete` submits every prompt to an `Engine` (the server's continuous-batching engine, KV cache
and sampler: not a second decoder), runs its loop on the calling thread until every prompt is
answered, and returns the results in prompt order. Each prompt can
have its own `SamplingParams` (seed, temperature, top-p, stop strings and tokens, max tokens);
with one seed per prompt the results do not depend on which prompts share a batch. The model is
only borrowed: its training mode is restored afterwards, so an RL loop can generate between
optimizer steps.

`load_engine` loads a model directory (weights + tokenizer) into an engine in a serving weight
format, as `behemoth serve` and `behemoth chat` do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from behemoth.errors import ConfigError
from behemoth.inference.engine import Engine, Request
from behemoth.inference.sampling import SamplingParams
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
    """Generate a completion for every prompt (text, encoded with `tokenizer`, or token ids), at
    most `max_batch_size` at a time, on the calling thread; `params` is one SamplingParams for
    all or one per prompt. `progress(done, total)` is called as completions finish. Raises
    InvalidParameter or PromptTooLong (both ConfigErrors) for a bad prompt or setting before
    anything runs, and whatever a failed step raised."""
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
                compile: bool = False) -> Engine:
    """Load a model directory (weights + tokenizer) into an engine (not started yet) decoding with
    the weight format `weights` (see behemoth.inference.weights), with a compiled decode step if
    `compile` (behemoth.inference.compiled; compiles before returning). The engine's context is
    the model's, capped at `max_context`."""
    from behemoth.checkpoint import load
    from behemoth.inference.weights import prepare_weights

    folder = Path(directory)
    if not (folder / "tokenizer.json").is_file():
        raise ConfigError(f"{folder}: no tokenizer.json; use a model directory written with its tokenizer")
    tokenizer = Tokenizer.load(folder)
    model = prepare_weights(load(folder), weights)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(f"{folder}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                          f"{model.config.vocab_size}")
    context = model.config.max_position_embeddings
    if max_context is not None:
        if max_context < 2:
            raise ConfigError(f"--max-context must be at least 2, got {max_context}")
        context = min(context, max_context)
    decoder = None
    if compile:
        from behemoth.inference.compiled import CompiledDecoder

        decoder = CompiledDecoder(model, threads=threads)
    return Engine(model, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue, max_context=context,
                  threads=threads, decoder=decoder)
