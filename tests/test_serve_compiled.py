"""The compiled decode step (behemoth.inference.compiled): same logits as eager decoding, same greedy
tokens through the engine, and caches that need no host reads. Compiling takes tens of seconds
here, so one module-scoped decoder serves every test."""

from __future__ import annotations

import shutil

import pytest
import torch
from phrase_model import CONFIG, Digits, pattern_text, random_model, train_phrase_model

from behemoth.inference.generate import generate
from behemoth.inference.engine import Engine, SamplingParams
from behemoth.inference.kv_cache import ModelCache
from behemoth.inference.weights import prepare_weights

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(shutil.which("g++") is None and shutil.which("gcc") is None,
                                 reason="torch.compile's CPU backend needs a C++ compiler")]


@pytest.fixture(scope="module")
def int8_model():
    return prepare_weights(train_phrase_model(), "int8")


@pytest.fixture(scope="module")
def decoder(int8_model):
    from behemoth.inference.compiled import CompiledDecoder

    return CompiledDecoder(int8_model, threads=1)


def eager_logits(model, tokens, positions, cache) -> torch.Tensor:
    return model.lm_head(model.hidden_states(tokens, positions, cache.layers)[:, -1]).float()


@torch.inference_mode()
@pytest.mark.parametrize("rows", [3, 1])
def test_compiled_step_gives_the_eager_logits(int8_model, decoder, rows) -> None:
    # Rows at different positions (one past a chunk boundary of 8), as continuous batching has
    # them; then one row, which must find the one-row program again (the programs check their
    # inputs and the cache, not the model's modules).
    prompts = [pattern_text(n, seed=n) for n in (5, 11, 17)][:rows]
    caches = []
    for _ in range(2):
        cache = ModelCache.for_model(int8_model, rows, 64)
        width = max(len(p) for p in prompts)
        ids = torch.zeros(rows, width, dtype=torch.long)
        positions = torch.full((rows, width), -1)
        for row, prompt in enumerate(prompts):
            ids[row, :len(prompt)] = prompt
            positions[row, :len(prompt)] = torch.arange(len(prompt))
        int8_model.hidden_states(ids, positions, cache.layers)
        caches.append(cache)
    eager_cache, compiled_cache = caches
    tokens = torch.tensor([[int(p[-1])] for p in prompts])
    positions = torch.tensor([[len(p)] for p in prompts])
    for step in range(6):
        expected = eager_logits(int8_model, tokens, positions, eager_cache)
        got = decoder(tokens, positions, compiled_cache, int(positions.max()))
        assert got.dtype == torch.float32 and got.shape == expected.shape
        assert (got - expected).abs().max() < 2e-2 * expected.abs().max(), step
        tokens, positions = expected.argmax(-1, keepdim=True), positions + 1
    for eager_layer, compiled_layer in zip(eager_cache.layers, compiled_cache.layers):
        used = eager_layer.used
        assert torch.equal(eager_layer.positions[:, :used], compiled_layer.positions[:, :used])
        assert not compiled_layer.reserved  # the context manager put the layers back


def test_engine_with_the_compiled_step_equals_generate(int8_model, decoder) -> None:
    prompts = [pattern_text(n, seed=40 + n) for n in (9, 14)]
    expected = [generate(int8_model, p[None], max_new_tokens=15)[0].tolist() for p in prompts]
    with Engine(int8_model, Digits(), max_batch_size=2, threads=1, decoder=decoder) as engine:
        requests = [engine.submit(p.tolist(), SamplingParams(temperature=0.0, max_new_tokens=15)) for p in prompts]
        got = [[event.token_id for event in request] for request in requests]
    assert got == expected


def test_a_decoder_of_another_model_is_refused(decoder) -> None:
    from behemoth.errors import ConfigError

    with pytest.raises(ConfigError, match="another model"):
        Engine(train_phrase_model(), Digits(), decoder=decoder)


@torch.inference_mode()
def test_each_decoder_keeps_its_own_programs(int8_model, decoder) -> None:
    """torch.compile keeps programs per code object, at most 8 of them: decoders of several
    models must not share one list (each call would check the others' guards first, and a fifth
    model would find the limit reached and run uncompiled)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from behemoth.inference.compiled import CompiledDecoder

    def programs(of: CompiledDecoder) -> int:
        return len(_debug_get_cache_entry_list(of._step._torchdynamo_orig_callable.__code__))

    before = programs(decoder)
    assert before >= 2  # at least the warm-up's: one row, several rows
    other_model = prepare_weights(random_model(CONFIG, seed=5), "int8")
    other = CompiledDecoder(other_model, threads=1, warm_up=False)
    cache = ModelCache.for_model(other_model, 2, 16)
    other_model.hidden_states(torch.zeros(2, 3, dtype=torch.long), torch.arange(3).expand(2, 3), cache.layers)
    other(torch.ones(2, 1, dtype=torch.long), torch.full((2, 1), 3), cache, 3)
    assert programs(other) == 1 and programs(decoder) == before


def test_reserved_cache_reads_no_tensor(int8_model) -> None:
    cache = ModelCache.for_model(int8_model, 2, 64)
    layer = next(layer for layer in cache.layers if layer.window is None)  # global: slot = position
    ring = next(layer for layer in cache.layers if layer.window is not None)
    with cache.reserved(highest_position=20):
        assert all(layer.reserved for layer in cache.layers)
        assert layer.capacity >= 21 and layer.used == 21
        assert ring.capacity == ring.window  # a ring never grows past its chunk
        key = torch.randn(2, layer.keys.shape[1], 1, layer.keys.shape[3])
        keys, _, positions = layer.update(key, key, torch.tensor([[20], [3]]))
        assert keys.shape[2] == layer.capacity  # whole buffers: shapes do not follow the data
        assert positions[0, 20] == 20 and positions[1, 3] == 3
    assert not layer.reserved
