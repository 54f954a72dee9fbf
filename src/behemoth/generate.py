"""Token generation: `generate(model, input_ids, max_new_tokens=..., temperature=0.0)`.

A plain sampler that recomputes the whole sequence each step: enough for report samples at toy
scale. The serving engine (KV cache, batching, top-p and friends) will replace the inside of this
function without changing its contract.
"""

from __future__ import annotations

import torch

from behemoth.model import Transformer


@torch.no_grad()
def generate(model: Transformer, input_ids: torch.Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, seed: int | None = None, stop_token_ids: set[int] | None = None
             ) -> torch.Tensor:
    """Continue each row of `input_ids` [batch, seq]; returns only the new tokens [batch, <=max_new_tokens].

    temperature 0 is greedy. A row that emits a stop token keeps emitting it (the batch stops when
    every row has stopped).
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=input_ids.device).manual_seed(seed) if seed is not None else None
    sequence = input_ids
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    new_tokens = []
    for _ in range(max_new_tokens):
        window = sequence[:, -model.config.max_position_embeddings:]
        logits = model(window)[:, -1, :].float()
        token = _pick(logits, temperature, top_k, generator)
        if new_tokens and stop_token_ids:
            token = torch.where(finished, new_tokens[-1], token)
        new_tokens.append(token)
        sequence = torch.cat([sequence, token[:, None]], dim=1)
        if stop_token_ids:
            finished |= torch.isin(token, torch.tensor(sorted(stop_token_ids), device=token.device))
            if bool(finished.all()):
                break
    model.train(was_training)
    if not new_tokens:
        return input_ids[:, :0]
    return torch.stack(new_tokens, dim=1)


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        threshold = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
