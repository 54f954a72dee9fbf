"""The serving engine: continuous batching, the batch KV cache, sampling filters and stop rules."""

from __future__ import annotations

import asyncio
import functools
import time

import pytest
import torch
from hf_reference import hf_model_like, random_model
from hypothesis import given, settings
from hypothesis import strategies as st

from behemoth.config import ModelConfig
from behemoth.errors import BehemothError, ConfigError
from behemoth.inference.engine import Engine, EngineClosed, PromptTooLong, QueueFull, SamplingParams
from behemoth.inference.kv_cache import ModelCache
from behemoth.inference.sampling import IncrementalDecoder, TextStream, _sample, sample_tokens
from behemoth.tokenizer import train_tokenizer

transformers = pytest.importorskip("transformers")

TEXT = ("In the beginning God created the heavens and the earth. The quick brown fox jumps over the "
        "lazy dog. Café, naïve, façade; 日本語のテキスト; emoji 😀🎉 and numbers 1234567890.\n")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    # A small vocabulary leaves multi-byte characters split over several tokens.
    return train_tokenizer([TEXT] * 20, 300)


@pytest.fixture(scope="module")
def model(tokenizer):
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=96, intermediate_size_mlp=160,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
        num_experts_per_tok=1, interleave_moe_layer_step=2, max_position_embeddings=160, attention_chunk_size=8,
        floor_scale=4, attn_scale=0.5, initializer_range=0.1)
    return random_model(config, seed=3)


@pytest.fixture
def engine(model, tokenizer):
    with Engine(model, tokenizer, max_batch_size=3, prefill_chunk=7) as running:
        yield running


def greedy(max_new_tokens: int = 30, **kwargs) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True, **kwargs)


@functools.cache
def hf_twin(model):
    return hf_model_like(model)


def reference(model, prompt: list[int], max_new_tokens: int = 30) -> list[int]:
    """Greedy tokens from transformers' `generate` on the same weights: a decoder independent of the
    engine (behemoth's own `generate` runs on the engine)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_twin(model).generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def prompts(tokenizer) -> list[list[int]]:
    texts = ["In the", "The quick brown fox jumps over the lazy dog. Café", "日本", "x", "emoji 😀🎉 and numbers 1",
             "God created the heavens and the earth. The quick brown"]
    return [tokenizer.encode(t) for t in texts]


# ------------------------------------------------------------------------------------------------
# The batch cache: requests join and leave between steps
# ------------------------------------------------------------------------------------------------

def test_batch_cache_join_and_leave_keeps_every_row_exact(model) -> None:
    """Rows prefilled alone at different lengths, merged, decoded together, one removed: every
    row's logits equal a full recomputation of its own sequence."""
    gen = torch.Generator().manual_seed(0)
    sequences = [torch.randint(6, model.config.vocab_size, (n,), generator=gen) for n in (21, 5, 13)]
    # Each row: its tokens so far (`grown`) and how many of them are in the cache (`lengths`).
    batch, lengths, grown = ModelCache.for_model(model, 0), [], []

    def join(seq: torch.Tensor) -> None:
        cache = ModelCache.for_model(model, 1)
        model(seq[None, :-1], torch.arange(len(seq) - 1)[None], cache.layers)  # prefill alone
        batch.extend(cache)
        lengths.append(len(seq) - 1)
        grown.append(seq)

    with torch.no_grad():
        join(sequences[0])
        join(sequences[1])
        for step in range(14):
            if step == 5:  # a third request joins mid-flight
                join(sequences[2])
            if step == 9:  # the first one leaves
                batch.select([1, 2])
                lengths, grown = lengths[1:], grown[1:]
            last = torch.stack([g[n] for g, n in zip(grown, lengths)])[:, None]
            logits = model(last, torch.tensor(lengths)[:, None], batch.layers)[:, -1]
            for row, (g, n) in enumerate(zip(grown, lengths)):
                full = model(g[None, :n + 1])[0, -1]
                assert (logits[row] - full).abs().max().item() <= 1e-4, (step, row)
            nxt = logits.argmax(-1)
            grown = [torch.cat([g[:n + 1], t[None]]) for g, n, t in zip(grown, lengths, nxt)]
            lengths = [n + 1 for n in lengths]
    assert batch.batch_size == 2


# ------------------------------------------------------------------------------------------------
# Continuous batching
# ------------------------------------------------------------------------------------------------

def test_concurrent_greedy_requests_equal_generate(engine, model, tokenizer) -> None:
    """Six requests on a batch of three: they queue, join as others leave, prefill in pieces."""
    lengths = [30, 12, 25, 8, 30, 18]
    requests = [engine.submit(p, greedy(n)) for p, n in zip(prompts(tokenizer), lengths)]
    for prompt, n, request in zip(prompts(tokenizer), lengths, requests):
        events = list(request)
        assert [e.token_id for e in events] == reference(model, prompt, n)
        assert [e.finish_reason for e in events] == [None] * (n - 1) + ["length"]
        assert (request.prompt_tokens, request.completion_tokens) == (len(prompt), n)
    stats = engine.stats()
    assert stats["requests_finished"] == 6 and stats["tokens_generated"] == sum(lengths)
    assert stats["running"] == 0 and stats["queue_depth"] == 0


@pytest.mark.parametrize("prefill_chunk", [512, 24])
def test_queued_prompts_are_prefilled_together_and_equal_generate(model, tokenizer, monkeypatch,
                                                                   prefill_chunk: int) -> None:
    """Prompts waiting together share prefill forwards (right-padded rows at their own positions),
    never more than `prefill_chunk` tokens counting padding; a prompt longer than that runs in
    pieces; every request still decodes exactly as it would alone."""
    queued = prompts(tokenizer) + [prompts(tokenizer)[1] * 2]  # the last one is longer than 24
    real, shapes = model.hidden_states, []

    def recording(ids, *args, **kwargs):
        shapes.append(tuple(ids.shape))
        return real(ids, *args, **kwargs)

    monkeypatch.setattr(model, "hidden_states", recording)
    engine = Engine(model, tokenizer, max_batch_size=8, prefill_chunk=prefill_chunk)
    requests = [engine.submit(p, greedy(12)) for p in queued]  # all queued before the loop starts
    with engine:
        outputs = [[e.token_id for e in request] for request in requests]
    monkeypatch.undo()
    assert outputs == [reference(model, p, 12) for p in queued]
    prefills = [s for s in shapes if s[1] > 1]
    assert all(rows * width <= prefill_chunk for rows, width in prefills)
    if prefill_chunk == 512:
        assert prefills == [(len(queued), max(len(p) for p in queued))]  # one forward for all
    else:  # first come, first served: a prompt that does not fit waits for the next forward
        assert any(rows > 1 for rows, _ in prefills)
        assert any(rows == 1 and width == prefill_chunk for rows, width in prefills)  # a piece, alone


def test_a_request_joins_a_running_batch_and_a_finished_one_does_not_stall_others(engine, model, tokenizer) -> None:
    long_prompt, short_prompt = prompts(tokenizer)[1], prompts(tokenizer)[0]
    first = engine.submit(long_prompt, greedy(60))
    stream = iter(first)
    head = [next(stream) for _ in range(5)]  # the first request is decoding...
    second = engine.submit(short_prompt, greedy(4))  # ...when a short one arrives and leaves
    second_tokens = [e.token_id for e in second]
    rest = list(stream)
    assert second_tokens == reference(model, short_prompt, 4)
    assert [e.token_id for e in head + rest] == reference(model, long_prompt, 60)
    assert second.finished_at < first.finished_at  # it left while the long one was still running
    assert second.first_token_at > first.first_token_at


def test_seed_gives_the_same_output_alone_and_in_a_batch(engine, tokenizer) -> None:
    prompt = prompts(tokenizer)[1]
    params = dict(max_new_tokens=25, temperature=1.0, top_p=0.9, top_k=40, ignore_eos=True)

    def sample(seed: int) -> list[int]:
        return [e.token_id for e in engine.submit(prompt, SamplingParams(seed=seed, **params))]

    alone = sample(7)
    crowd = [engine.submit(p, SamplingParams(seed=i, **params)) for i, p in enumerate(prompts(tokenizer))]
    in_batch = sample(7)
    for request in crowd:
        list(request)
    assert alone == in_batch
    assert alone != sample(8)


def test_stop_token_ends_the_request_and_is_not_shown(engine, model, tokenizer) -> None:
    prompt = prompts(tokenizer)[4]
    free = reference(model, prompt, 30)
    stop = free[6]
    cut = free.index(stop)
    events = list(engine.submit(prompt, greedy(30, stop_token_ids=[stop])))
    assert [e.token_id for e in events] == free[:cut + 1]
    assert events[-1].finish_reason == "stop"
    assert "".join(e.text for e in events) == tokenizer.decode(free[:cut])


def test_stop_string_cuts_the_text_even_when_split_across_tokens(engine, model, tokenizer) -> None:
    prompt = prompts(tokenizer)[0]
    free = reference(model, prompt, 40)
    text = tokenizer.decode(free)
    # A stop string made of the end of one token's text and the start of the next ones.
    pieces = [tokenizer.decode([t]) for t in free]
    at = next(i for i in range(5, 30) if pieces[i] and pieces[i + 1] and "\ufffd" not in pieces[i] + pieces[i + 1])
    stop = pieces[at][-1] + pieces[at + 1]
    expected = text[:text.index(stop)]
    events = list(engine.submit(prompt, greedy(40, stop=["never appears", stop])))
    assert "".join(e.text for e in events) == expected
    assert events[-1].finish_reason == "stop"
    assert len(events) <= at + 2  # generation ended at the token that completed the stop string


def test_streamed_text_is_the_decoded_output_even_with_split_characters(engine, tokenizer) -> None:
    """Random weights emit arbitrary bytes: text deltas still add up to the decoded tokens, and a
    delta never ends inside a UTF-8 character."""
    for seed in range(4):
        events = list(engine.submit(prompts(tokenizer)[2], SamplingParams(max_new_tokens=40, seed=seed,
                                                                             ignore_eos=True)))
        assert "".join(e.text for e in events) == tokenizer.decode([e.token_id for e in events])
        assert all(not e.text.endswith("\ufffd") for e in events[:-1])


def test_logprobs_are_the_raw_distribution(engine, model, tokenizer) -> None:
    prompt = prompts(tokenizer)[3]
    events = list(engine.submit(prompt, SamplingParams(max_new_tokens=6, temperature=0.7, seed=1,
                                                         logprobs=5, ignore_eos=True)))
    sequence = prompt + [e.token_id for e in events]
    with torch.no_grad():
        logprobs = model(torch.tensor([sequence]))[0, len(prompt) - 1:-1].log_softmax(-1)
    for event, expected in zip(events, logprobs):
        assert abs(event.logprob - expected[event.token_id].item()) <= 1e-4
        assert len(event.top_logprobs) == 5
        top = expected.topk(5)
        assert [t for t, _ in event.top_logprobs] == top.indices.tolist()
        assert [lp for _, lp in event.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
    plain = next(iter(engine.submit(prompt, greedy(2))))
    assert plain.top_logprobs is None and plain.logprob is not None


def test_async_iteration_of_concurrent_requests(engine, model, tokenizer) -> None:
    async def consume(prompt: list[int]) -> list[int]:
        return [e.token_id async for e in engine.submit(prompt, greedy(15))]

    async def main() -> list[list[int]]:
        return await asyncio.gather(*(consume(p) for p in prompts(tokenizer)[:4]))

    outputs = asyncio.run(main())
    assert outputs == [reference(model, p, 15) for p in prompts(tokenizer)[:4]]


def test_leaving_the_iteration_cancels_and_frees_the_slot(engine, model, tokenizer) -> None:
    request = engine.submit(prompts(tokenizer)[0], greedy(120))
    for i, _ in enumerate(request):
        if i == 2:
            break  # the client went away
    deadline = time.monotonic() + 10
    while (not request.done or engine.stats()["running"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert request.finish_reason == "cancelled" and request.completion_tokens < 120
    assert engine.stats()["running"] == 0 and engine.stats()["requests_cancelled"] == 1
    assert [e.token_id for e in engine.submit(prompts(tokenizer)[3], greedy(5))] == \
        reference(model, prompts(tokenizer)[3], 5)


def test_cancel_in_async_consumer_and_of_a_queued_request(model, tokenizer) -> None:
    engine = Engine(model, tokenizer, max_batch_size=1)  # not started: requests wait in the queue
    queued = engine.submit(prompts(tokenizer)[0], greedy(50))
    queued.cancel()
    kept = engine.submit(prompts(tokenizer)[1], greedy(50))

    async def main() -> int:
        seen = 0
        async for _ in kept:
            seen += 1
            if seen == 3:
                break
        return seen

    with engine:
        assert list(queued) == [] and queued.finish_reason == "cancelled"
        assert asyncio.run(main()) == 3
        deadline = time.monotonic() + 10
        while not kept.done and time.monotonic() < deadline:
            time.sleep(0.01)
        assert kept.finish_reason == "cancelled"


def test_a_failed_step_fails_its_requests_and_the_engine_keeps_serving(model, tokenizer, monkeypatch) -> None:
    real, calls = model.hidden_states, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "hidden_states", flaky)
    with Engine(model, tokenizer) as engine:
        doomed = engine.submit(prompts(tokenizer)[0], greedy(10))
        with pytest.raises(RuntimeError, match="injected failure"):
            list(doomed)
        assert doomed.finish_reason == "error" and engine.stats()["requests_failed"] == 1
        after = engine.submit(prompts(tokenizer)[3], greedy(5))
        assert [e.token_id for e in after] == reference(model, prompts(tokenizer)[3], 5)


# ------------------------------------------------------------------------------------------------
# Admission errors
# ------------------------------------------------------------------------------------------------

def test_prompt_too_long_is_refused_with_the_numbers(model, tokenizer) -> None:
    engine = Engine(model, tokenizer, max_context=100)
    with pytest.raises(PromptTooLong, match=r"prompt of 90 tokens \+ max_new_tokens 20 = 110 tokens exceeds "
                                            r"the context of 100 tokens .*at most 10 new tokens"):
        engine.submit([7] * 90, SamplingParams(max_new_tokens=20))
    engine.submit([7] * 90, SamplingParams(max_new_tokens=10))  # fits exactly
    with pytest.raises(ConfigError, match="max_context"):
        Engine(model, tokenizer, max_context=model.config.max_position_embeddings + 1)


def test_queue_full_and_closed_engine(model, tokenizer) -> None:
    engine = Engine(model, tokenizer, max_queue=2)
    waiting = [engine.submit([7, 8], greedy(3)) for _ in range(2)]
    with pytest.raises(QueueFull):
        engine.submit([7, 8], greedy(3))
    engine.close()
    for request in waiting:
        with pytest.raises(EngineClosed):
            list(request)
    with pytest.raises(EngineClosed):
        engine.submit([7, 8], greedy(3))
    assert issubclass(QueueFull, BehemothError) and issubclass(PromptTooLong, BehemothError)


@pytest.mark.parametrize("field, value", [
    ("max_new_tokens", 0), ("max_new_tokens", 2.5), ("temperature", -0.1), ("temperature", float("nan")),
    ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5), ("min_p", -0.5), ("min_p", 2.0),
    ("repetition_penalty", 0.0), ("stop", ["ok", ""]), ("stop", "text"), ("stop_token_ids", [-1]),
    ("seed", "7"), ("logprobs", 21), ("logprobs", -1), ("ignore_eos", 1),
])
def test_invalid_parameters_name_the_field(engine, field: str, value) -> None:
    params = SamplingParams(**{field: value})
    with pytest.raises(ConfigError, match=field) as caught:
        engine.submit([7, 8], params)
    assert caught.value.field == field


def test_invalid_prompts_are_refused(engine, model) -> None:
    vocab = model.config.vocab_size
    for prompt in ([], [vocab], [-1], [1.5], "text"):
        with pytest.raises(ConfigError, match="prompt"):
            engine.submit(prompt, greedy(3))
    with pytest.raises(ConfigError, match="stop_token_ids"):
        engine.submit([7], greedy(3, stop_token_ids=[vocab]))


def test_end_of_text_stops_unless_ignored(engine, model, tokenizer) -> None:
    assert engine.eos_token_ids == {tokenizer.eos_id, tokenizer.eot_id}
    prompt = prompts(tokenizer)[5]
    free = reference(model, prompt, 20)
    engine.eos_token_ids = frozenset({free[3]})  # random weights never pick the real one
    events = list(engine.submit(prompt, SamplingParams(max_new_tokens=20, temperature=0)))
    assert events[-1].finish_reason == "stop" and [e.token_id for e in events] == free[:free.index(free[3]) + 1]
    assert len(list(engine.submit(prompt, greedy(20)))) == 20  # ignore_eos


# ------------------------------------------------------------------------------------------------
# Sampling filters: exact distributions through the inverse CDF on a grid of uniforms
# ------------------------------------------------------------------------------------------------

def empirical(logits: torch.Tensor, params: SamplingParams, draws: int = 4000) -> torch.Tensor:
    """The distribution `_sample` draws from, read off exactly with evenly spaced uniforms."""
    uniforms = (torch.arange(draws, dtype=torch.float32) + 0.5) / draws
    tokens = _sample(logits.expand(draws, -1), [params] * draws, uniforms)
    return torch.bincount(tokens, minlength=logits.shape[-1]).float() / draws


def hf_distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    if min_p:
        scores = MinPLogitsWarper(min_p)(None, scores)
    return scores.softmax(-1)[0]


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [
    (1.0, 0, 1.0, 0.0), (0.5, 0, 1.0, 0.0), (1.3, 5, 1.0, 0.0), (1.0, 0, 0.8, 0.0), (0.8, 7, 0.9, 0.0),
    (1.0, 0, 1.0, 0.2), (1.5, 10, 0.7, 0.1), (1.0, 1, 1.0, 0.0),
])
def test_filters_draw_from_the_transformers_distribution(temperature, top_k, top_p, min_p) -> None:
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(5)) * 2
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    ours = empirical(logits, params)
    theirs = hf_distribution(logits, temperature, top_k, top_p, min_p)
    assert (ours - theirs).abs().max().item() <= 2 / 4000
    assert set(ours.nonzero()[:, 0].tolist()) <= set(theirs.nonzero()[:, 0].tolist())  # never a filtered token


def test_wide_filters_are_not_limited_to_the_top_p_candidates() -> None:
    logits = torch.zeros(1, 1000)  # flat, and wider than the candidates tried first for top-p
    assert (empirical(logits, SamplingParams(top_p=0.9), draws=9000) > 0).sum().item() == 900
    assert (empirical(logits, SamplingParams(top_k=5000), draws=9000) > 0).sum().item() == 1000
    assert (empirical(logits, SamplingParams(top_k=600), draws=9000) > 0).sum().item() == 600


def test_repetition_penalty_equals_transformers_and_greedy_ignores_filters() -> None:
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(6))
    history = torch.tensor([[1, 2, 3, 4], [5, 5, 6, 7]])
    seen = torch.zeros(2, 30, dtype=torch.bool).scatter_(1, history, True)
    expected = RepetitionPenaltyLogitsProcessor(1.7)(history, logits.clone()).argmax(-1)
    params = [SamplingParams(temperature=0, repetition_penalty=1.7, top_k=3, top_p=0.5)] * 2
    chosen = sample_tokens(logits, params, [None, None], seen)
    assert [c.token_id for c in chosen] == expected.tolist()
    assert [c.token_id for c in sample_tokens(logits, params, [None, None])] == logits.argmax(-1).tolist()


def test_each_row_has_its_own_generator() -> None:
    logits = torch.zeros(3, 50)
    params = [SamplingParams()] * 3

    def draw(seeds: list[int]) -> list[list[int]]:
        """Five steps; per row, the tokens it drew."""
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        steps = [[c.token_id for c in sample_tokens(logits, params, generators)] for _ in range(5)]
        return [list(row) for row in zip(*steps)]

    first, second = draw([1, 2, 3]), draw([1, 9, 9])
    assert first[0] == second[0]  # row 0's stream does not depend on the other rows
    assert first[1] != second[1]


# ------------------------------------------------------------------------------------------------
# Text: incremental decoding and stop strings
# ------------------------------------------------------------------------------------------------

def test_incremental_decoder_holds_an_incomplete_character(tokenizer) -> None:
    ids = tokenizer.encode("a😀b")
    assert len(ids) > 3  # the emoji spans several byte tokens
    decoder = IncrementalDecoder(tokenizer.decode)
    deltas = [decoder.push(i) for i in ids]
    assert "".join(deltas) + decoder.flush() == "a😀b"
    assert "\ufffd" not in "".join(deltas) and "😀" in deltas


PIECES = st.lists(st.text(alphabet="ab.!\n", min_size=0, max_size=3), min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(pieces=PIECES, stops=st.lists(st.text(alphabet="ab.!\n", min_size=1, max_size=3), max_size=3))
def test_text_stream_cuts_at_the_first_stop_string(pieces: list[str], stops: list[str]) -> None:
    """Tokens are text pieces here: released text is the full text cut before the earliest stop
    string, whichever tokens that string straddles."""
    vocab = {i: piece for i, piece in enumerate(pieces)}
    stream = TextStream(lambda ids: "".join(vocab[i] for i in ids), stops)
    released, hit_at = [], None
    for i in range(len(pieces)):
        text, hit = stream.push(i)
        released.append(text)
        if hit:
            hit_at = i
            break
    if hit_at is None:
        released.append(stream.flush())
    full = "".join(pieces)
    cut = min((full.find(s) for s in stops if s in full), default=None)
    if cut is None:
        assert hit_at is None and "".join(released) == full
        return
    # Generation ends at the first token that completes a stop string; the text ends where the
    # earliest-starting stop string complete by then begins.
    assert hit_at is not None
    before, upto = "".join(pieces[:hit_at]), "".join(pieces[:hit_at + 1])
    assert not any(s in before for s in stops)
    assert "".join(released) == upto[:min(upto.find(s) for s in stops if s in upto)]
