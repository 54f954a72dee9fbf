"""The offline batched API (behemoth.inference.complete): the engine's continuous batching for
programs such as evaluation and RL rollouts."""

from __future__ import annotations

import math

import pytest
import torch
from hf_reference import hf_model_like
from phrase_model import CONFIG, Digits, pattern_text, train_phrase_model

from behemoth.errors import ConfigError
from behemoth.inference import Completion, PromptTooLong, SamplingParams, complete, generate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0)


@pytest.fixture(scope="module")
def model():
    return train_phrase_model()


def test_greedy_completions_equal_transformers_in_prompt_order(model) -> None:
    # more prompts than batch slots, of different lengths: they queue, join and leave the batch
    prompts = [pattern_text(length, seed=50 + length).tolist() for length in (5, 17, 9, 30, 12)]
    completions = complete(model, Digits(), prompts, GREEDY, max_batch_size=2)
    assert [c.prompt_ids for c in completions] == prompts
    hf = hf_model_like(model)
    for prompt, completion in zip(prompts, completions):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            expected = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10,
                                   eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert completion.token_ids == expected
        assert completion.finish_reason == "length"
        assert completion.text == Digits.decode(expected)
        assert len(completion.logprobs) == 10 and all(-math.inf < p <= 0 for p in completion.logprobs)
    # the model learned the phrase: greedy decoding continues it
    assert completions[3].token_ids == pattern_text(40, seed=80)[30:40].tolist()


def test_each_prompt_has_its_own_params_and_seeded_rows_do_not_depend_on_the_batch(model) -> None:
    prompts = [pattern_text(8, seed=s).tolist() for s in range(4)]
    params = [SamplingParams(max_new_tokens=6, temperature=1.0, seed=100 + i) for i in range(3)]
    params.append(SamplingParams(max_new_tokens=3, temperature=0.0, stop_token_ids=[]))
    together = complete(model, Digits(), prompts, params, max_batch_size=4)
    alone = [complete(model, Digits(), [p], q)[0] for p, q in zip(prompts, params)]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [len(c.token_ids) for c in together] == [6, 6, 6, 3]


def test_a_stop_token_ends_a_completion(model) -> None:
    prompt = pattern_text(12, seed=3).tolist()
    continuation = generate(model, torch.tensor([prompt]), max_new_tokens=10)[0].tolist()
    stop = continuation[4]
    [completion] = complete(model, Digits(), [prompt], SamplingParams(max_new_tokens=10, temperature=0.0,
                                                                      stop_token_ids=[stop]))
    assert completion.token_ids == continuation[:continuation.index(stop) + 1]
    assert completion.finish_reason == "stop"


def test_the_model_is_borrowed_not_kept(model) -> None:
    model.train()
    try:
        assert isinstance(complete(model, Digits(), [[1, 2, 3]], GREEDY)[0], Completion)
        assert model.training
    finally:
        model.eval()


def test_bad_requests_fail_before_anything_runs(model) -> None:
    with pytest.raises(ConfigError, match="params: 2 SamplingParams for 3 prompts"):
        complete(model, Digits(), [[1], [2], [3]], [GREEDY, GREEDY])
    with pytest.raises(PromptTooLong):
        complete(model, Digits(), [[1, 2], [1] * CONFIG.max_position_embeddings], GREEDY)
    with pytest.raises(ConfigError, match="prompt"):
        complete(model, Digits(), [[1, CONFIG.vocab_size]], GREEDY)
    assert complete(model, Digits(), [], GREEDY) == []


def test_progress_counts_finished_completions(model) -> None:
    seen: list[tuple[int, int]] = []
    prompts = [pattern_text(6, seed=s).tolist() for s in range(5)]
    lengths = [SamplingParams(max_new_tokens=n, temperature=0.0) for n in (2, 9, 4, 4, 7)]
    complete(model, Digits(), prompts, lengths, max_batch_size=2, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (5, 5) and all(total == 5 for _, total in seen)
    assert [done for done, _ in seen] == sorted({done for done, _ in seen})  # rises, each count once
