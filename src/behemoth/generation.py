"""Token generation: `generate(model, input_ids, max_new_tokens=..., temperature=0.0)`.

The batch-synchronous sibling of the serving engine (`behemoth.serve.engine`): same KV cache and
same sampler, no thread. The prompt is run once to fill the cache, then each step feeds only the
newest token of every row at its absolute position.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from behemoth.model import Transformer
from behemoth.serve.engine import check_context
from behemoth.serve.kv_cache import ModelCache
from behemoth.serve.sampling import InvalidParameter, SamplingParams, sample_tokens


@torch.no_grad()
def generate(model: Transformer, input_ids: torch.Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, seed: int | None = None, stop_token_ids: Iterable[int] | None = None,
             top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Continue each row of `input_ids` [batch, seq]; returns only the new tokens [batch, <=max_new_tokens].

    temperature 0 is greedy. A row that emits a stop token keeps emitting it (the batch stops when
    every row has stopped). seed: the same seed gives the same tokens; None draws from torch's
    global generator. attention_mask [batch, seq] (1 = token, 0 = padding, on either side) lets
    rows of different lengths share a batch: each row continues from its own last token at its
    own positions, exactly as it would alone. Raises PromptTooLong when a prompt plus
    max_new_tokens exceeds the model's context, and InvalidParameter (a ConfigError) for an
    out-of-range setting.
    """
    if max_new_tokens == 0:
        return input_ids[:, :0]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k or 0, top_p=top_p,
                            min_p=min_p, repetition_penalty=repetition_penalty, seed=seed)
    params.validate()
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if mask.shape != input_ids.shape or not bool(mask.any(dim=1).all()):
        raise InvalidParameter("attention_mask", "must have the shape of input_ids and mark at least one "
                                                 "token in every row")
    check_context(int(mask.sum(dim=1).max()), max_new_tokens, model.config.max_position_embeddings)

    was_training = model.training
    model.eval()
    try:
        return _decode(model, input_ids, mask, params, set(stop_token_ids or ()))
    finally:
        model.train(was_training)


def _decode(model: Transformer, input_ids: torch.Tensor, mask: torch.Tensor, params: SamplingParams,
            stop_ids: set[int]) -> torch.Tensor:
    batch, width = input_ids.shape
    device = input_ids.device
    rows = torch.arange(batch, device=device)
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    lengths = mask.sum(dim=1)
    cache = ModelCache.for_model(model, batch, int(lengths.max()) + params.max_new_tokens)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(batch, model.config.vocab_size, dtype=torch.bool, device=device)
        for row in range(batch):
            seen[row, input_ids[row][mask[row]]] = True
    stops = torch.tensor(sorted(stop_ids), dtype=input_ids.dtype, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)

    # Padding gets position -1: the cache stores nothing for it and no query can see it.
    tokens, positions = input_ids, torch.where(mask, mask.cumsum(dim=1) - 1, -1)
    last = width - 1 - mask.flip(dims=[1]).int().argmax(dim=1)  # each row's last real token
    new_tokens: list[torch.Tensor] = []
    for _ in range(params.max_new_tokens):
        hidden = model.hidden_states(tokens, positions, cache.layers)[rows, last]
        logits = model.lm_head(hidden).float()
        choices = sample_tokens(logits, [params] * batch, [generator] * batch, seen)
        token = torch.tensor([c.token_id for c in choices], dtype=input_ids.dtype, device=device)
        if new_tokens:
            token = torch.where(finished, new_tokens[-1], token)  # a stopped row repeats its stop token
        new_tokens.append(token)
        if seen is not None:
            seen[torch.arange(batch, device=device), token] = True
        finished |= torch.isin(token, stops)
        if bool(finished.all()):
            break
        tokens, last = token[:, None], torch.zeros_like(last)
        positions = lengths[:, None] + len(new_tokens) - 1
    return torch.stack(new_tokens, dim=1)
