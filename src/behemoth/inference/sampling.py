"""Choosing the next token, and turning chosen tokens into text that stops where it should.

`sample_tokens` picks one token per row, each with its own parameters and generator, filtering in
`transformers`' order (repetition penalty, temperature, top-k, top-p over the renormalised top-k,
min-p). Each row inverts its cumulative distribution at one uniform draw, so a seed gives the same
tokens whatever else is in the batch. `TextStream` holds back an incomplete UTF-8 character and
any text that could still become a stop string, so a stop string split across tokens is never shown.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from behemoth.errors import ConfigError

MAX_LOGPROBS = 20
# Candidates taken with topk before falling back to a full sort for top-p: the nucleus of a
# trained model is almost always inside them, and sorting a whole vocabulary row is slow on CPU.
TOP_P_CANDIDATES = 256
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed accepts


class InvalidParameter(ConfigError):
    """A sampling parameter is out of range; `field` names it (for a 400 response)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass
class SamplingParams:
    """How one request is decoded. Defaults: sampling at temperature 1 with no filters."""

    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # 1 = off; applied to every token of prompt and output
    stop: list[str] = field(default_factory=list)  # stop strings (not included in output)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None  # same seed, same output
    logprobs: int = 0  # number of top alternatives to return per token; 0 = none; max 20
    ignore_eos: bool = False  # True: do not stop on the tokenizer's end-of-text / end-of-turn
    prompt_logprobs: int | None = None  # score the prompt too, with this many alternatives (vLLM's);
    # then max_new_tokens may be 0: the prompt goes through the model, nothing is generated
    adapter: int = 0  # which of the engine's LoRA adapters this row runs with (1, 2, ...); 0 = the base alone

    def validate(self) -> None:
        """Raise InvalidParameter (a ConfigError) naming the first field that is out of range."""
        _check_int("max_new_tokens", self.max_new_tokens, low=0 if self.prompt_logprobs is not None else 1)
        _check_float("temperature", self.temperature, low=0.0)
        _check_int("top_k", self.top_k, low=0)
        _check_float("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        _check_float("min_p", self.min_p, low=0.0, high=1.0)
        _check_float("repetition_penalty", self.repetition_penalty, low=0.0, low_open=True)
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidParameter("stop", "must be a list of non-empty strings")
        if not isinstance(self.stop_token_ids, (list, tuple, set, frozenset)):
            raise InvalidParameter("stop_token_ids", "must be a list of token ids")
        for token in self.stop_token_ids:
            _check_int("stop_token_ids", token, low=0)
        if self.seed is not None:
            _check_int("seed", self.seed, low=SEED_RANGE[0], high=SEED_RANGE[1])
        _check_int("logprobs", self.logprobs, low=0, high=MAX_LOGPROBS)
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, low=0, high=MAX_LOGPROBS)
        _check_int("adapter", self.adapter, low=0)
        if not isinstance(self.ignore_eos, bool):
            raise InvalidParameter("ignore_eos", f"must be true or false, got {self.ignore_eos!r}")


def _check_int(name: str, value: object, low: int | None = None, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidParameter(name, f"must be an integer, got {value!r}")
    if low is not None and value < low or high is not None and value > high:
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise InvalidParameter(name, f"must be {bounds}, got {value}")


def _check_float(name: str, value: object, low: float, high: float | None = None, low_open: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise InvalidParameter(name, f"must be a finite number, got {value!r}")
    if value < low or (low_open and value == low) or high is not None and value > high:
        lower = f"> {low}" if low_open else f">= {low}"
        raise InvalidParameter(name, f"must be {lower}" + (f" and <= {high}" if high is not None else "")
                               + f", got {value}")


@dataclass
class Choice:
    """The token picked for one row, with its logprob under the model's raw distribution (softmax of the logits)."""

    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]] | None  # the `logprobs` most likely tokens, or None


def sample_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                  generators: Sequence[torch.Generator | None],
                  seen: torch.Tensor | None = None) -> list[Choice]:
    """One token per row of `logits` [batch, vocab] (float32), each with its params and generator (None:
    torch's global one); seen: bool [batch, vocab], each row's prompt and output tokens, for a penalty."""
    raw = logits
    logits = _penalize_repeats(logits, params, seen)
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    greedy = [i for i, p in enumerate(params) if p.temperature == 0]
    sampled = [i for i, p in enumerate(params) if p.temperature != 0]
    if len(greedy) == len(params):  # the common all-greedy batch: no row gathering
        tokens = logits.argmax(dim=-1)
    elif greedy:
        tokens[greedy] = logits[greedy].argmax(dim=-1)
    if sampled:
        uniforms = torch.cat([torch.rand(1, generator=generators[i]) for i in sampled]).to(logits.device)
        tokens[sampled] = _sample(logits[sampled], [params[i] for i in sampled], uniforms)
    return token_choices(raw, tokens, [p.logprobs for p in params])


def _penalize_repeats(logits: torch.Tensor, params: Sequence[SamplingParams],
                      seen: torch.Tensor | None) -> torch.Tensor:
    """CTRL-style: a seen token's logit is divided by the penalty if positive, else multiplied."""
    penalties = [p.repetition_penalty for p in params]
    if seen is None or all(p == 1.0 for p in penalties):
        return logits
    penalty = torch.tensor(penalties, dtype=logits.dtype, device=logits.device)[:, None]
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def _sample(logits: torch.Tensor, params: Sequence[SamplingParams], uniforms: torch.Tensor) -> torch.Tensor:
    """Rows that sample: temperature, then top-k/top-p (on a sorted candidate set) and min-p."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=device)
    probs = (logits / temperature[:, None]).softmax(dim=-1)
    min_p = torch.tensor([p.min_p for p in params], dtype=probs.dtype, device=device)
    tokens = torch.empty(len(params), dtype=torch.long, device=device)
    vocab = logits.shape[-1]
    # Only a top-k below the vocabulary or a top-p below 1 needs ranking.
    needs_rank = [0 < p.top_k < vocab or p.top_p < 1.0 for p in params]
    ranked = [i for i, r in enumerate(needs_rank) if r]
    plain = [i for i, r in enumerate(needs_rank) if not r]
    if plain:
        tokens[plain] = _draw(_apply_min_p(probs[plain], min_p[plain]), uniforms[plain])
    if ranked:
        tokens[ranked] = _sample_ranked(probs[ranked], [params[i] for i in ranked], min_p[ranked], uniforms[ranked])
    return tokens


def _sample_ranked(probs: torch.Tensor, params: Sequence[SamplingParams], min_p: torch.Tensor,
                   uniforms: torch.Tensor) -> torch.Tensor:
    """top-k, top-p over the renormalised top-k, then min-p, on the most likely candidates."""
    vocab, device = probs.shape[-1], probs.device
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    # Enough candidates for every row: its top-k, or a first guess at its nucleus.
    count = min(vocab, max(k if k < vocab else TOP_P_CANDIDATES for k in top_k))
    values, index = probs.topk(count, dim=-1)
    top_p = torch.tensor([p.top_p for p in params], dtype=probs.dtype, device=device)
    unlimited = torch.tensor([k >= vocab for k in top_k], device=device)
    if count < vocab and bool((unlimited & (top_p < 1.0) & (values.sum(-1) < top_p)).any()):
        values, index = probs.sort(dim=-1, descending=True)  # a flat distribution: the nucleus is wide
        count = vocab
    rank = torch.arange(count, device=device)
    k = torch.tensor(top_k, device=device)
    values = values.masked_fill(rank[None] >= k[:, None], 0.0)
    # A row limited by top-k renormalises over its k tokens; an unlimited row's mass is already 1.
    values = values / torch.where(unlimited, torch.ones_like(top_p), values.sum(-1))[:, None]
    before = values.cumsum(dim=-1) - values  # mass of the more likely tokens
    values = values.masked_fill((before >= top_p[:, None]) & (top_p[:, None] < 1.0), 0.0)
    values = _apply_min_p(values, min_p)
    return index.gather(1, _draw(values, uniforms)[:, None])[:, 0]


def _apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens less likely than min_p times the most likely one (min_p 0 drops nothing)."""
    threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    return probs.masked_fill(probs < threshold, 0.0)


def _draw(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index drawn per row in proportion to `weights` (unnormalised, >= 0), by inverse CDF."""
    cumulative = weights.cumsum(dim=-1)
    target = uniforms.to(cumulative.dtype)[:, None] * cumulative[:, -1:]
    # right=True: a zero-weight entry shares its predecessor's cumulative value and is never hit.
    index = torch.searchsorted(cumulative, target, right=True)
    return index[:, 0].clamp(max=weights.shape[-1] - 1)


def token_choices(logits: torch.Tensor, tokens: torch.Tensor, counts: Sequence[int]) -> list[Choice]:
    """Each row's token in `tokens` with its logprob under softmax(`logits` [rows, vocab]) and, where
    its entry of `counts` is not 0, that many likeliest tokens (sampled tokens, and prompt tokens)."""
    logprobs = logits.log_softmax(dim=-1)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
    wanted = max(counts)
    top_values, top_index = [t.tolist() for t in logprobs.topk(wanted, dim=-1)] if wanted else (None, None)
    return [Choice(token, logprob, list(zip(top_index[row][:n], top_values[row][:n])) if n else None)
            for row, (token, logprob, n) in enumerate(zip(tokens.tolist(), chosen, counts))]


REPLACEMENT = "\ufffd"  # what a cut-off UTF-8 sequence decodes to


class IncrementalDecoder:
    """Text deltas of a growing token list, withheld while they end in U+FFFD (a character split over
    tokens). Decoding starts at the last character boundary, so its cost does not grow with the output."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self._ids: list[int] = []
        self._start = 0  # ids[start:done] were decoded to complete characters last time
        self._done = 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        shown = self._decode(self._ids[self._start:self._done])
        text = self._decode(self._ids[self._start:])
        if text.endswith(REPLACEMENT):
            return ""
        self._start, self._done = self._done, len(self._ids)
        return text[len(shown):]

    def flush(self) -> str:
        """Whatever is still held (an incomplete character comes out as U+FFFD)."""
        shown = self._decode(self._ids[self._start:self._done])
        text = self._decode(self._ids[self._start:])
        self._start = self._done = len(self._ids)
        return text[len(shown):]


class TextStream:
    """Generated text released piece by piece, cut before the first stop string: the longest suffix
    that is a prefix of a stop string is held back, so a completed stop string lies inside it."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self._decoder = IncrementalDecoder(decode)
        self._stop = [s for s in stop if s]
        self._held = ""
        self.text = ""  # everything released so far

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (text released now, whether a stop string was completed)."""
        self._held += self._decoder.push(token_id)
        hit = self._first_stop()
        cut = len(self._held) - self._partial_stop_length() if hit is None else hit
        released = self._held[:cut]
        self._held = self._held[cut:] if hit is None else ""
        self.text += released
        return released, hit is not None

    def flush(self) -> str:
        """At the end of generation without a stop string: release everything held."""
        released = self._held + self._decoder.flush()
        self._held = ""
        self.text += released
        return released

    def _first_stop(self) -> int | None:
        found = [i for i in (self._held.find(s) for s in self._stop) if i >= 0]
        return min(found) if found else None

    def _partial_stop_length(self) -> int:
        """Length of the longest suffix of the held text that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(self._held)), best, -1):
                if self._held.endswith(stop[:length]):
                    best = length
                    break
        return best
