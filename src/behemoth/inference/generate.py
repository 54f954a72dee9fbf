"""Token generation on tensors, the tensor-in, tensor-out face of `complete` (and so of the engine)."""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace

import torch

from behemoth.inference.offline import complete
from behemoth.inference.sampling import InvalidParameter, SamplingParams
from behemoth.model import Transformer


# generate() returns ids only: a tokenizer whose text stream has nothing to decode
_NO_TEXT = SimpleNamespace(eos_id=None, eot_id=None, decode=lambda ids: "")


@torch.no_grad()
def generate(model: Transformer, input_ids: torch.Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, seed: int | None = None, stop_token_ids: Iterable[int] | None = None,
             top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Continue each row of `input_ids` [batch, seq]; returns only the new tokens [batch, <=max_new_tokens].
    temperature 0 is greedy. A row that emits a stop token keeps emitting it until every row has stopped.
    Row i samples from seed + i (None: a fresh seed). attention_mask [batch, seq] (0 = padding, on either
    side) lets rows of different lengths share a batch, each continuing exactly as it would alone.
    Raises PromptTooLong or InvalidParameter; the model's training mode is kept."""
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
    answers = [c.token_ids for c in complete(model, _NO_TEXT, prompts, params, max_batch_size=len(prompts))]
    width = max(len(answer) for answer in answers)
    padded = [answer + answer[-1:] * (width - len(answer)) for answer in answers]
    return torch.tensor(padded, dtype=input_ids.dtype, device=input_ids.device)
