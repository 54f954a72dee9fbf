"""Token generation on tensors: `generate(model, input_ids, max_new_tokens=..., temperature=0.0)`.

The tensor-in, tensor-out face of the engine: the rows of `input_ids` become the prompts of one
`complete` call (the engine's continuous batching, KV cache and sampler, on the calling thread),
and the answers come back as one tensor, rows that stopped early padded with their stop token.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from behemoth.inference.offline import complete
from behemoth.inference.sampling import InvalidParameter, SamplingParams
from behemoth.model import Transformer


class _NoText:
    """generate() returns ids only, so the engine's text stream has nothing to decode."""

    eos_id = eot_id = None

    @staticmethod
    def decode(ids) -> str:
        return ""


@torch.no_grad()
def generate(model: Transformer, input_ids: torch.Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, seed: int | None = None, stop_token_ids: Iterable[int] | None = None,
             top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Continue each row of `input_ids` [batch, seq]; returns only the new tokens [batch, <=max_new_tokens].

    temperature 0 is greedy. A row that emits a stop token keeps emitting it (the batch stops when
    every row has stopped). seed: the same seed gives the same tokens (row i samples from seed + i);
    None draws a fresh one. attention_mask [batch, seq] (1 = token, 0 = padding, on either side)
    lets rows of different lengths share a batch: each row continues from its own last token at
    its own positions, exactly as it would alone. Raises PromptTooLong when a prompt plus
    max_new_tokens exceeds the model's context, and InvalidParameter (a ConfigError) for an
    out-of-range setting. The model's training mode is kept.
    """
    if max_new_tokens == 0:
        return input_ids[:, :0]
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if mask.shape != input_ids.shape or not bool(mask.any(dim=1).all()):
        raise InvalidParameter("attention_mask", "must have the shape of input_ids and mark at least one "
                                                 "token in every row")
    stops = sorted(set(stop_token_ids or ()))
    params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k or 0, top_p=top_p,
                             min_p=min_p, repetition_penalty=repetition_penalty, stop_token_ids=stops,
                             seed=None if seed is None else seed + row, ignore_eos=True)
              for row in range(input_ids.shape[0])]
    prompts = [row[keep].tolist() for row, keep in zip(input_ids.cpu(), mask.cpu())]
    answers = [c.token_ids for c in complete(model, _NoText(), prompts, params, max_batch_size=len(prompts))]
    width = max(len(answer) for answer in answers)
    padded = [answer + answer[-1:] * (width - len(answer)) for answer in answers]
    return torch.tensor(padded, dtype=input_ids.dtype, device=input_ids.device)
