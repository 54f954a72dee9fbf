"""Scoring text with a model: batched continuation log-likelihoods, rolling log-likelihoods of whole
texts, and the per-item scores of each kind of task.

Conventions (recorded in every results file's settings): every sequence starts with one prefix token,
end-of-text by default, since every training document follows one. A context's trailing whitespace
moves to the start of its continuation, so " word" stays the one token it was in training. Context and
continuation are tokenized apart; an over-long sequence loses context from the left. Log-probabilities
are natural logs, in float32. Rolling log-likelihood scores each token once, in windows of `max_length`
predictions that each see as much earlier text as fits (lm-evaluation-harness semantics).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from behemoth.eval.errors import EvalError
from behemoth.eval.tasks import (GENERATE, LAST_WORD, MINIMAL_PAIRS, MULTIPLE_CHOICE, PERPLEXITY, SAFETY, SAMPLES,
                                 GenItem, LastWordItem, MinimalPairItem, MultipleChoiceItem, PromptItem, TextItem)
from behemoth.inference.offline import complete
from behemoth.inference.sampling import SamplingParams

Progress = Callable[[int], None]  # called with the number of sequences just scored


@dataclass(frozen=True)
class Score:
    """A continuation's log-likelihood given its context."""

    logprob: float  # natural log-probability, summed over the continuation's tokens
    greedy: bool    # every continuation token is the model's most likely next token
    tokens: int     # continuation tokens


@torch.no_grad()
def score_token_pairs(model: Any, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int = 32,
                      max_length: int | None = None, progress: Progress | None = None) -> list[Score]:
    """Log-likelihood of each continuation after its context (token ids; at least the prefix). Batches
    are sorted by length and right-padded, which changes nothing for a causal model; only the
    continuation positions go through the LM head."""
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
    batch_size = max(1, batch_size)
    try:
        device = _device_of(model)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
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
    rows_t, cols_t = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
    targets_t = torch.tensor(targets, device=device)
    logits = _logits_at(model, ids.to(device), rows_t, cols_t).float()
    picked = torch.log_softmax(logits, dim=-1).gather(1, targets_t[:, None]).squeeze(1)
    hits = logits.argmax(dim=-1) == targets_t
    lengths = [len(cont) for cont in continuations]
    return [Score(float(lp.double().sum()), bool(hit.all()), len(lp))
            for lp, hit in zip(picked.split(lengths), hits.split(lengths))]


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
    """(context, continuation) pairs that score tokens[1:] given tokens[0], each token once: window k
    predicts tokens [1 + k*L, 1 + (k+1)*L) and sees up to L = max_length inputs, so the last window
    has full context even when it predicts only a few tokens."""
    pairs = []
    for start in range(1, len(tokens), max_length):
        end = min(start + max_length, len(tokens))
        pairs.append((list(tokens[max(0, end - 1 - max_length):start]), list(tokens[start:end])))
    return pairs


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

    def fit_prompt(self, ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """`ids` cut on the left to leave room for `max_new_tokens` in the scoring length."""
        return list(ids)[-max(1, self.max_length - max_new_tokens):]

    def complete(self, prompts: Sequence[list[int]], params: SamplingParams | Sequence[SamplingParams],
                 progress: Progress | None = None) -> list[str]:
        """The text of each prompt's completion, batched through the inference engine."""
        done = [0]

        def report(finished: int, _total: int) -> None:
            progress(finished - done[0])
            done[0] = finished

        completions = complete(self.model, self.tokenizer, prompts, params, max_batch_size=self.batch_size,
                               progress=report if progress else None)
        return [c.text for c in completions]

    def generate_tokens(self, ids: Sequence[int], *, max_new_tokens: int, temperature: float = 0.0,
                        top_k: int | None = None, seed: int = 0) -> list[int]:
        """New token ids after `ids` (cut on the left to leave room), up to the first end-of-text, excluded."""
        from behemoth.inference.generate import generate

        ids = self.fit_prompt(ids, max_new_tokens)
        new = generate(self.model, torch.tensor([ids], device=_device_of(self.model)), max_new_tokens=max_new_tokens,
                       temperature=temperature, top_k=top_k, seed=seed, stop_token_ids={self.tokenizer.eos_id})
        tokens = new[0].tolist()
        return tokens[:tokens.index(self.tokenizer.eos_id)] if self.tokenizer.eos_id in tokens else tokens


SAMPLE_SETTINGS = {"max_new_tokens": 48, "temperature": 0.8, "top_k": 50}
# Generative tasks: a greedy reply per item, and `samples` more at `temperature` for pass@k.
GENERATE_SETTINGS = {"max_new_tokens": 48, "samples": 0, "temperature": 0.8}


def score_items(kind: str, items: Sequence[Any], scorer: Scorer, progress: Progress | None = None,
                seed: int = 0, generation: dict[str, Any] | None = None, classifier: Any = None) -> list[dict[str, Any]]:
    """Per-item results (JSON-ready dicts) for items of one task kind; `generation` overrides
    GENERATE_SETTINGS for generative and safety tasks, whose replies `classifier` judges
    (behemoth.safety; the string classifier by default)."""
    if kind == SAMPLES:
        return _samples(items, scorer, progress, seed)
    settings = {**GENERATE_SETTINGS, **(generation or {})}
    if kind == GENERATE:
        return _generate(items, scorer, progress, seed, settings)
    if kind == SAFETY:
        from behemoth.eval.safety import judge_replies
        from behemoth.safety import StringClassifier

        budget = settings["max_new_tokens"]
        prompts = _chat_prompts([[("user", item.prompt)] for item in items], scorer, budget)
        replies = _greedy_replies(prompts, scorer, budget, progress)
        return judge_replies(items, replies, classifier or StringClassifier())
    scorers = {MULTIPLE_CHOICE: _multiple_choice, LAST_WORD: _last_word, MINIMAL_PAIRS: _minimal_pairs,
               PERPLEXITY: _perplexity}
    if kind in scorers:
        return scorers[kind](items, scorer, progress)
    raise ValueError(f"unknown task kind {kind!r}")


def requests_per_item(kind: str, item: Any) -> int:
    """Sequences an item costs (for the progress bar)."""
    if kind == MULTIPLE_CHOICE:
        return len(item.choices)
    return 2 if kind == MINIMAL_PAIRS else 1  # a generative item's samples are not counted


def _multiple_choice(items: Sequence[MultipleChoiceItem], scorer: Scorer, progress: Progress | None) -> list[dict]:
    pairs = [(c.context, c.continuation) for item in items for c in item.choices]
    scores = iter(scorer.loglikelihoods(pairs, progress))
    results = []
    for item in items:
        logprobs = [next(scores).logprob for _ in item.choices]
        chars = [len(c.continuation) for c in item.choices]
        per_char = [lp / max(n, 1) for lp, n in zip(logprobs, chars)]
        results.append({"id": item.id, "gold": item.gold, "logprobs": logprobs, "chars": chars,
                        "acc": int(_argmax(logprobs) == item.gold), "acc_norm": int(_argmax(per_char) == item.gold),
                        "chance": 1.0 / len(item.choices)})
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
    budget = SAMPLE_SETTINGS["max_new_tokens"]
    params = [SamplingParams(max_new_tokens=budget, temperature=SAMPLE_SETTINGS["temperature"],
                             top_k=SAMPLE_SETTINGS["top_k"], seed=seed + item.position,
                             stop_token_ids=[scorer.tokenizer.eos_id]) for item in items]
    prompts = [scorer.fit_prompt([scorer.prefix_id, *scorer.tokenizer.encode(item.prompt)], budget) for item in items]
    texts = scorer.complete(prompts, params, progress)
    return [{"id": item.id, "prompt": item.prompt, "seed": p.seed, "text": text}
            for item, p, text in zip(items, params, texts)]


def _generate(items: Sequence[GenItem], scorer: Scorer, progress: Progress | None, seed: int,
              settings: dict[str, Any]) -> list[dict]:
    """A greedy reply per item, checked; with `samples` n > 0, n sampled replies more, for pass@k."""
    from behemoth.rewards import is_correct

    budget, n = settings["max_new_tokens"], settings["samples"]
    prompts = _chat_prompts([item.messages for item in items], scorer, budget)
    greedy = _greedy_replies(prompts, scorer, budget, progress)
    sampled: list[list[str]] = [[] for _ in items]
    if n:
        stops = [scorer.tokenizer.eot_id, scorer.tokenizer.eos_id]
        params = [SamplingParams(max_new_tokens=budget, temperature=settings["temperature"], stop_token_ids=stops,
                                 seed=_sample_seed(seed, item.id, j)) for item in items for j in range(n)]
        replies = scorer.complete([p for p in prompts for _ in range(n)], params)
        sampled = [replies[i * n:(i + 1) * n] for i in range(len(items))]
    results = []
    for item, reply, others in zip(items, greedy, sampled):
        result = {"id": item.id, "question": item.messages[-1][1], "answer": item.answer, "match": item.match,
                  "reply": reply, "pass@1": int(is_correct(reply, item.answer, item.match))}
        if n:
            result.update(samples=others, sampled_correct=sum(is_correct(r, item.answer, item.match) for r in others))
        results.append(result)
    return results


def _chat_prompts(conversations: Sequence[Sequence[tuple[str, str]]], scorer: Scorer, budget: int) -> list[list[int]]:
    """Each (role, content) conversation in the chat template, open for the assistant's reply."""
    from behemoth.data.chat import render_prompt

    return [scorer.fit_prompt(render_prompt(scorer.tokenizer, [{"role": r, "content": c} for r, c in turns]), budget)
            for turns in conversations]


def _greedy_replies(prompts: list[list[int]], scorer: Scorer, budget: int, progress: Progress | None) -> list[str]:
    stops = [scorer.tokenizer.eot_id, scorer.tokenizer.eos_id]
    return scorer.complete(prompts, SamplingParams(max_new_tokens=budget, temperature=0.0, stop_token_ids=stops),
                           progress)


def _sample_seed(seed: int, item_id: str, sample: int) -> int:
    """A sampled reply's seed, from the item's id: the same whichever items share its batch or the cache."""
    digest = hashlib.sha256(f"{seed}:{item_id}:{sample}".encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") >> 1


def pass_at_k(n: int, correct: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples of which `correct` passed (Chen et al., 2021):
    the chance that k of the n, drawn without replacement, hold at least one correct."""
    if not 0 < k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n samples, got n = {n}")
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)
