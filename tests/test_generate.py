"""KV-cached decoding computes what full recomputation computes, and greedy `generate` equals
transformers' `generate(do_sample=False)` token for token, on every layer kind."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hf_reference import hf_model_like, random_model

from behemoth.config import ModelConfig, preset
from behemoth.errors import ConfigError
from behemoth.inference.generate import generate
from behemoth.model.attention import attend_one_query
from behemoth.inference.engine import PromptTooLong
from behemoth.inference.kv_cache import ModelCache

# Small chunks (8) so prompts cross chunk boundaries, NoPE layers with temperature tuning whose
# floor_scale (4) makes the scale change every few positions, and a larger init so greedy
# choices are not near-ties.
BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, intermediate_size_mlp=160,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
            max_position_embeddings=96, attention_chunk_size=8, floor_scale=4, attn_scale=0.5,
            initializer_range=0.1, eos_token_id=None)
CASES = {
    "chunk8-nope-temperature": {},
    "two-nope-layers-top2-qknorm-off": dict(no_rope_layers=[1, 0, 1, 0], num_experts_per_tok=2, use_qk_norm=False),
    "no-chunking": dict(attention_chunk_size=None),
    "llama3-rope-tied": dict(tie_word_embeddings=True, rope_theta=10000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "tiny-preset-chunk8": "tiny",
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_model(case: str, seed: int = 1):
    spec = CASES[case]
    if spec == "tiny":
        config = preset("tiny").replace(attention_chunk_size=8, floor_scale=4, attn_scale=0.5, eos_token_id=None)
    else:
        config = ModelConfig(**{**BASE, **spec})
    return random_model(config, seed=seed)


def tokens(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("pieces", [[21, 1], [1], [5, 3, 11, 1], [13, 8, 1]])
def test_incremental_logits_equal_full_recomputation(case: str, pieces: list[int]) -> None:
    """Prefill in pieces of these sizes (crossing chunk boundaries), then one token at a time."""
    model = make_model(case)
    ids = tokens(2, 40, model.config.vocab_size)
    cache = ModelCache.for_model(model, batch_size=2)
    outputs, start = [], 0
    with torch.no_grad():
        full = model(ids)
        while start < ids.shape[1]:
            size = min(pieces[min(len(outputs), len(pieces) - 1)], ids.shape[1] - start)
            positions = torch.arange(start, start + size)[None]
            outputs.append(model(ids[:, start:start + size], positions, cache.layers))
            start += size
    assert (torch.cat(outputs, dim=1) - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_query_attention_equals_grouped_sdpa_and_a_blind_query_gets_zeros(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, heads, length, 16, generator=generator).to(dtype)
               for heads, length in ((6, 1), (2, 9), (2, 9)))
    mask = torch.rand(3, 1, 1, 9, generator=generator) > 0.5
    mask[0, ..., 0] = True  # at least one visible key
    mask[2] = False  # row 2 sees nothing (a padding query)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    got = attend_one_query(q, k, v, mask)
    assert got.dtype == dtype and got.shape == (3, 6, 1, 16)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    assert (got.float() - expected).abs().max().item() <= tolerance
    assert torch.equal(got[2], torch.zeros_like(got[2]))


def test_chunked_layers_keep_one_chunk_and_global_layers_keep_everything() -> None:
    model = make_model("chunk8-nope-temperature")
    cache = ModelCache.for_model(model, batch_size=1)
    with torch.no_grad():
        model(tokens(1, 37, 256), torch.arange(37)[None], cache.layers)
    for i, layer in enumerate(cache.layers):
        if model.config.uses_rope(i):
            # A ring of one chunk however long the sequence; only the current chunk is kept.
            assert layer.capacity == 8
            assert layer.positions[0].tolist() == [32, 33, 34, 35, 36, -1, -1, -1]
        else:
            assert layer.positions[0, :37].tolist() == list(range(37))  # NoPE: everything, by position


@pytest.mark.parametrize("case", ["chunk8-nope-temperature", "two-nope-layers-top2-qknorm-off", "tiny-preset-chunk8"])
@pytest.mark.parametrize("prompt_length", [5, 21])
def test_greedy_equals_transformers_generate(case: str, prompt_length: int) -> None:
    model = make_model(case)
    reference = hf_model_like(model)
    ids = tokens(2, prompt_length, model.config.vocab_size, seed=prompt_length)
    ours = generate(model, ids, max_new_tokens=40)
    with torch.no_grad():
        theirs = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=40, pad_token_id=0)[:, prompt_length:]
    assert ours.tolist() == theirs.tolist()


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_row_alone(side: str) -> None:
    """Padding gets no position and no cache entry, so each row continues as it would alone
    (alone = transformers, by the test above). transformers itself is not the reference here:
    with left padding its Llama 4 keeps chunk boundaries where the padded row's tokens are not."""
    model = make_model("chunk8-nope-temperature")
    long, short = tokens(1, 19, 256, seed=1), tokens(1, 6, 256, seed=2)
    pad = torch.zeros(1, 13, dtype=torch.long)
    padded = torch.cat([pad, short], dim=1) if side == "left" else torch.cat([short, pad], dim=1)
    ids = torch.cat([long, padded])
    mask = torch.ones_like(ids)
    mask[1] = padded != 0 if side == "left" else torch.arange(19) < 6
    ours = generate(model, ids, max_new_tokens=25, attention_mask=mask)
    assert ours[0].tolist() == generate(model, long, max_new_tokens=25)[0].tolist()
    assert ours[1].tolist() == generate(model, short, max_new_tokens=25)[0].tolist()


def test_repetition_penalty_equals_transformers() -> None:
    model = make_model("chunk8-nope-temperature")
    ids = tokens(2, 9, 256, seed=3)
    ours = generate(model, ids, max_new_tokens=30, repetition_penalty=1.8)
    with torch.no_grad():
        theirs = hf_model_like(model).generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                               max_new_tokens=30, repetition_penalty=1.8, pad_token_id=0)[:, 9:]
    assert ours.tolist() == theirs.tolist()
    assert ours.tolist() != generate(model, ids, max_new_tokens=30).tolist()  # the penalty did something


def test_seed_gives_the_same_sample_and_sampling_uses_it() -> None:
    model = make_model("chunk8-nope-temperature")
    ids = tokens(3, 7, 256)
    kwargs = dict(max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.95)
    first = generate(model, ids, seed=11, **kwargs)
    assert first.tolist() == generate(model, ids, seed=11, **kwargs).tolist()
    assert first.tolist() != generate(model, ids, seed=12, **kwargs).tolist()
    assert first.tolist() != generate(model, ids, max_new_tokens=20).tolist()  # not greedy


def test_stop_tokens_end_rows_which_then_repeat_their_stop_token() -> None:
    model = make_model("chunk8-nope-temperature")
    ids = tokens(2, 7, 256)
    free = generate(model, ids, max_new_tokens=20)
    stop = free[0, 4].item()  # row 0 emits this at step 4 (perhaps earlier too)
    stopped = generate(model, ids, max_new_tokens=20, stop_token_ids={stop})
    first = free[0].tolist().index(stop)
    assert stopped[0, :first + 1].tolist() == free[0, :first + 1].tolist()
    assert set(stopped[0, first:].tolist()) == {stop}
    if stop not in free[1].tolist():  # the other row never stops: the batch runs to the end
        assert stopped.shape[1] == 20 and stopped[1].tolist() == free[1].tolist()


def test_prompt_too_long_is_an_error_with_the_numbers() -> None:
    model = make_model("chunk8-nope-temperature")  # context 96
    with pytest.raises(PromptTooLong, match=r"90 tokens \+ max_new_tokens 10 = 100 tokens exceeds the context of 96"):
        generate(model, tokens(1, 90, 256), max_new_tokens=10)
    assert generate(model, tokens(1, 90, 256), max_new_tokens=6).shape == (1, 6)  # exactly full is fine


def test_bad_settings_are_config_errors_naming_the_field_and_mode_is_restored() -> None:
    model = make_model("chunk8-nope-temperature").train()
    ids = tokens(1, 4, 256)
    for kwargs, field in ((dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
                          (dict(top_k=-2), "top_k"), (dict(repetition_penalty=0.0), "repetition_penalty")):
        with pytest.raises(ConfigError, match=field):
            generate(model, ids, **kwargs)
    assert generate(model, ids, max_new_tokens=0).shape == (1, 0)
    assert generate(model, ids, max_new_tokens=3).shape == (1, 3)
    assert model.training  # generate switches to eval and back
