"""Scoring text with a model: batched continuation log-likelihoods, rolling log-likelihood of whole
texts, and the per-item scores of each kind of task.

Conventions (recorded in every results file's settings):
- Every sequence starts with one prefix token, the end-of-text id by default: training documents
  each follow one, so that is where the model has learned a document begins.
- A context's trailing whitespace moves to the start of its continuation before tokenizing, so
  " word" stays one token as it was in training ("Answer: " + "B" -> "Answer:" + " B").
- Context and continuation are tokenized separately; a sequence longer than `max_length` loses
  context tokens from the left.
- Log-probabilities are natural logs, computed in float32 from the model's logits.
- Rolling log-likelihood scores each token of a text exactly once, in windows of `max_length`
  predictions, each window seeing as much earlier text as fits (lm-evaluation-harness semantics).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from behemoth.eval.errors import EvalError
from behemoth.eval.tasks import (LAST_WORD, MINIMAL_PAIRS, MULTIPLE_CHOICE, PERPLEXITY, SAMPLES, LastWordItem,
                                 MinimalPairItem, MultipleChoiceItem, PromptItem, TextItem)

Progress = Callable[[int], None]  # called with the number of sequences just scored


@dataclass(frozen=True)
class Score:
    """A continuation's log-likelihood given its context."""

    logprob: float  # natural log-probability, summed over the continuation's tokens
    greedy: bool    # every continuation token is the model's most likely next token
    tokens: int     # continuation tokens


# ------------------------------------------------------------------------------------------------
# Token level
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def score_token_pairs(model: Any, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int = 32,
                      max_length: int | None = None, progress: Progress | None = None) -> list[Score]:
    """Log-likelihood of each continuation after its context, both given as token ids.

    The context must hold at least one token (the prefix). Sequences are sorted by length and
    right-padded into batches of `batch_size`; padding comes after every real token, so with a
    causal model it changes nothing. Only the continuation positions go through the LM head.
    """
    limit = max_length or model.config.max_position_embeddings
    inputs: list[list[int]] = []
    for number, (context, continuation) in enumerate(pairs):
        if not context:
            raise EvalError(f"request {number}: empty context (it needs at least the prefix token)")
        if not continuation:
            raise EvalError(f"request {number}: empty continuation")
        if len(continuation) > limit:
            raise EvalError(f"request {number}: continuation of {len(continuation)} tokens does not fit "
                            f"max_length {limit}")
        inputs.append((list(context) + list(continuation))[:-1][-limit:])
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
    scores: list[Score | None] = [None] * len(inputs)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()  # training mode steers MoE routing with the balance bias; evaluate as released
    try:
        device = _device_of(model)
        for start in range(0, len(order), max(1, batch_size)):
            rows = order[start:start + max(1, batch_size)]
            batch_scores = _score_batch(model, [inputs[i] for i in rows], [list(pairs[i][1]) for i in rows], device)
            for i, score in zip(rows, batch_scores):
                scores[i] = score
            if progress:
                progress(len(rows))
    finally:
        if hasattr(model, "train"):
            model.train(was_training)
    return scores  # type: ignore[return-value]


def _score_batch(model: Any, inputs: list[list[int]], continuations: list[list[int]],
                 device: torch.device) -> list[Score]:
    width = max(len(x) for x in inputs)
    ids = torch.zeros((len(inputs), width), dtype=torch.long)
    rows, cols, targets = [], [], []
    for r, (x, cont) in enumerate(zip(inputs, continuations)):
        ids[r, :len(x)] = torch.tensor(x)
        # input position p predicts token p + 1: the continuation is predicted by the last len(cont) inputs
        rows.extend([r] * len(cont))
        cols.extend(range(len(x) - len(cont), len(x)))
        targets.extend(cont)
    ids = ids.to(device)
    rows_t, cols_t = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
    targets_t = torch.tensor(targets, device=device)
    logits = _logits_at(model, ids, rows_t, cols_t).float()
    logprobs = torch.log_softmax(logits, dim=-1)
    picked = logprobs.gather(1, targets_t[:, None]).squeeze(1)
    hits = logits.argmax(dim=-1) == targets_t
    out, at = [], 0
    for cont in continuations:
        n = len(cont)
        out.append(Score(float(picked[at:at + n].double().sum()), bool(hits[at:at + n].all()), n))
        at += n
    return out


def _logits_at(model: Any, ids: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Logits at (row, col) positions only: the LM head over a few positions, not the whole batch."""
    if hasattr(model, "hidden_states") and hasattr(model, "lm_head"):
        return model.lm_head(model.hidden_states(ids)[rows, cols])
    return model(ids)[rows, cols]


def _device_of(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def rolling_windows(tokens: Sequence[int], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs that score tokens[1:] given tokens[0], each token once.

    Window k predicts tokens [1 + k*L, 1 + (k+1)*L) (L = max_length) and sees up to L inputs, so
    the last window gets full context even when it predicts only a few tokens.
    """
    pairs = []
    for start in range(1, len(tokens), max_length):
        end = min(start + max_length, len(tokens))
        pairs.append((list(tokens[max(0, end - 1 - max_length):start]), list(tokens[start:end])))
    return pairs


# ------------------------------------------------------------------------------------------------
# Text level
# ------------------------------------------------------------------------------------------------

class Scorer:
    """A model and its tokenizer with the scoring settings: text in, log-likelihoods out."""

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 32, max_length: int | None = None,
                 prefix_id: int | None = None):
        model_limit = model.config.max_position_embeddings
        if max_length is not None and max_length < 2:
            raise EvalError(f"max_length must be at least 2, got {max_length}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = max(1, int(batch_size))
        self.max_length = min(max_length or model_limit, model_limit)
        self.prefix_id = tokenizer.eos_id if prefix_id is None else prefix_id

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        stripped = context.rstrip()
        continuation = context[len(stripped):] + continuation
        return [self.prefix_id, *self.tokenizer.encode(stripped)], self.tokenizer.encode(continuation)

    def loglikelihoods(self, pairs: Sequence[tuple[str, str]], progress: Progress | None = None) -> list[Score]:
        """Log-likelihood of each (context, continuation) pair of strings."""
        encoded = [self.encode_pair(context, continuation) for context, continuation in pairs]
        return score_token_pairs(self.model, encoded, batch_size=self.batch_size, max_length=self.max_length,
                                 progress=progress)

    def rolling(self, texts: Sequence[str], progress: Progress | None = None) -> list[tuple[float, int]]:
        """(log-likelihood, tokens) of each whole text after the prefix token."""
        windows, owner = [], []
        for i, text in enumerate(texts):
            tokens = [self.prefix_id, *self.tokenizer.encode(text)]
            for pair in rolling_windows(tokens, self.max_length):
                windows.append(pair)
                owner.append(i)
        scores = score_token_pairs(self.model, windows, batch_size=self.batch_size, max_length=self.max_length,
                                   progress=progress)
        totals = [[0.0, 0] for _ in texts]
        for i, score in zip(owner, scores):
            totals[i][0] += score.logprob
            totals[i][1] += score.tokens
        return [(logprob, tokens) for logprob, tokens in totals]

    def generate(self, prompt: str, *, max_new_tokens: int, temperature: float, top_k: int | None,
                 seed: int) -> str:
        """The text the model writes after `prompt` (stopping at end of text)."""
        ids = [self.prefix_id, *self.tokenizer.encode(prompt)]
        return self.tokenizer.decode(self.generate_tokens(ids, max_new_tokens=max_new_tokens, temperature=temperature,
                                                          top_k=top_k, seed=seed))

    def generate_tokens(self, ids: Sequence[int], *, max_new_tokens: int, temperature: float = 0.0,
                        top_k: int | None = None, seed: int = 0) -> list[int]:
        """New token ids after `ids` (cut on the left to leave room), up to the first end-of-text, excluded."""
        from behemoth.inference.generate import generate

        ids = list(ids)[-max(1, self.max_length - max_new_tokens):]
        new = generate(self.model, torch.tensor([ids], device=_device_of(self.model)), max_new_tokens=max_new_tokens,
                       temperature=temperature, top_k=top_k, seed=seed, stop_token_ids={self.tokenizer.eos_id})
        tokens = new[0].tolist()
        return tokens[:tokens.index(self.tokenizer.eos_id)] if self.tokenizer.eos_id in tokens else tokens


# ------------------------------------------------------------------------------------------------
# Items
# ------------------------------------------------------------------------------------------------

SAMPLE_SETTINGS = {"max_new_tokens": 48, "temperature": 0.8, "top_k": 50}


def score_items(kind: str, items: Sequence[Any], scorer: Scorer, progress: Progress | None = None,
                seed: int = 0) -> list[dict[str, Any]]:
    """Per-item results (JSON-ready dicts) for items of one task kind."""
    if kind == MULTIPLE_CHOICE:
        return _multiple_choice(items, scorer, progress)
    if kind == LAST_WORD:
        return _last_word(items, scorer, progress)
    if kind == MINIMAL_PAIRS:
        return _minimal_pairs(items, scorer, progress)
    if kind == PERPLEXITY:
        return _perplexity(items, scorer, progress)
    if kind == SAMPLES:
        return _samples(items, scorer, progress, seed)
    raise ValueError(f"unknown task kind {kind!r}")


def requests_per_item(kind: str, item: Any) -> int:
    """Sequences an item costs (for the progress bar)."""
    if kind == MULTIPLE_CHOICE:
        return len(item.choices)
    return 2 if kind == MINIMAL_PAIRS else 1


def _multiple_choice(items: Sequence[MultipleChoiceItem], scorer: Scorer, progress: Progress | None) -> list[dict]:
    pairs = [(c.context, c.continuation) for item in items for c in item.choices]
    scores = iter(scorer.loglikelihoods(pairs, progress))
    results = []
    for item in items:
        logprobs = [next(scores).logprob for _ in item.choices]
        chars = [len(c.continuation) for c in item.choices]
        per_char = [lp / max(n, 1) for lp, n in zip(logprobs, chars)]
        results.append({
            "id": item.id, "gold": item.gold, "logprobs": logprobs, "chars": chars,
            "acc": int(_argmax(logprobs) == item.gold), "acc_norm": int(_argmax(per_char) == item.gold),
            "chance": 1.0 / len(item.choices),
        })
    return results


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first on a tie (ties are vanishingly rare with float scores)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _last_word(items: Sequence[LastWordItem], scorer: Scorer, progress: Progress | None) -> list[dict]:
    scores = scorer.loglikelihoods([(item.context, item.target) for item in items], progress)
    return [{"id": item.id, "logprob": s.logprob, "tokens": s.tokens, "acc": int(s.greedy), "chance": 0.0}
            for item, s in zip(items, scores)]


def _minimal_pairs(items: Sequence[MinimalPairItem], scorer: Scorer, progress: Progress | None) -> list[dict]:
    texts = [text for item in items for text in (item.good, item.bad)]
    scores = scorer.rolling(texts, progress)
    results = []
    for i, item in enumerate(items):
        good, bad = scores[2 * i][0], scores[2 * i + 1][0]
        # strictly more likely: a model that cannot tell the two apart gets no credit
        results.append({"id": item.id, "group": item.group, "good": good, "bad": bad, "acc": int(good > bad),
                        "chance": 0.5})
    return results


def _perplexity(items: Sequence[TextItem], scorer: Scorer, progress: Progress | None) -> list[dict]:
    scores = scorer.rolling([item.text for item in items], progress)
    return [{"id": item.id, "nats": -logprob, "tokens": tokens, "bytes": len(item.text.encode("utf-8"))}
            for item, (logprob, tokens) in zip(items, scores)]


def _samples(items: Sequence[PromptItem], scorer: Scorer, progress: Progress | None, seed: int) -> list[dict]:
    results = []
    for item in items:
        item_seed = seed + item.position
        text = scorer.generate(item.prompt, seed=item_seed, **SAMPLE_SETTINGS)
        results.append({"id": item.id, "prompt": item.prompt, "seed": item_seed, "text": text})
        if progress:
            progress(1)
    return results


def bits_per_byte(nats: float, n_bytes: int) -> float:
    return nats / math.log(2) / n_bytes if n_bytes else float("nan")
