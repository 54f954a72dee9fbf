"""Several LoRA adapters over one base, each batch row with its own (model/lora.py's banks), as
serving needs them: every row computes what the merged model of its adapter computes alone."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from lora_support import randomise_adapters, save_adapted

import behemoth
from behemoth.config import preset
from behemoth.errors import ConfigError
from behemoth.model import init_weights
from behemoth.model.lora import (apply_lora, attach_adapter_bank, lora_state_dict, merge_lora, scale_of)
from behemoth.tokenizer import Tokenizer
from behemoth.train.config import LoraConfig

ATOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(seed: int = 0, **overrides) -> behemoth.Transformer:
    model = behemoth.Transformer(preset("tiny").replace(**overrides))
    init_weights(model, seed=seed)
    return model.eval()


def adapted_copy(base: behemoth.Transformer, settings: LoraConfig, seed: int, std: float = 0.1):
    """A copy of `base` with adapters whose factors are random (so that they change the output)."""
    model = copy.deepcopy(base)
    apply_lora(model, settings)
    randomise_adapters(model, seed, std, b_only=False)
    return model


def trained_adapter(base: behemoth.Transformer, settings: LoraConfig, seed: int):
    """(the merged model of a random adapter over `base`, the adapter's tensors, its scale)."""
    model = adapted_copy(base, settings, seed)
    tensors = {name: t.detach().clone() for name, t in lora_state_dict(model).items()}
    return merge_lora(model).eval(), tensors, scale_of(settings)


@pytest.fixture(scope="module")
def banked():
    base = tiny()
    one = trained_adapter(base, LoraConfig(rank=4, alpha=8.0, targets=["all", "router"]), seed=1)
    two = trained_adapter(base, LoraConfig(rank=2, alpha=4.0, targets=["experts", "q_proj"], use_rslora=True),
                          seed=2)
    model = copy.deepcopy(base)
    rows = attach_adapter_bank(model, {"one": one[1:], "two": two[1:]})
    return model, rows, {0: base, 1: one[0], 2: two[0]}


def logits(model, ids):
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("picks", [[1, 0, 2], [2, 2, 1], [0, 0, 0]])
def test_each_row_computes_its_own_adapters_merged_model(banked, picks) -> None:
    model, rows, alone = banked
    ids = torch.randint(3, 500, (len(picks), 9), generator=torch.Generator().manual_seed(7))
    with rows.use(picks):
        together = logits(model, ids)
    for row, pick in enumerate(picks):
        torch.testing.assert_close(together[row], logits(alone[pick], ids[row:row + 1])[0], rtol=ATOL, atol=ATOL)
    assert rows.ids is None  # the selection holds for one forward only


def test_a_single_token_row_takes_its_adapter(banked) -> None:
    model, rows, alone = banked
    token = torch.tensor([[42]])
    for pick in (1, 2):
        with rows.use([pick]):
            torch.testing.assert_close(logits(model, token), logits(alone[pick], token), rtol=ATOL, atol=ATOL)
    assert (logits(alone[1], token) - logits(alone[0], token)).abs().max() > 1e-3


def test_banks_go_on_a_plain_base_only() -> None:
    adapted = tiny()
    apply_lora(adapted, LoraConfig(rank=2, alpha=2.0, targets=["attention"]))
    with pytest.raises(ConfigError, match="already carries LoRA adapters"):
        attach_adapter_bank(adapted, {})


# ------------------------------------------------------------------------------------------------
# In the engine and behind the API
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    """A served base with a tokenizer, two adapter folders for it, and each adapter's merged model."""
    from serve_support import make_model_dir

    from behemoth.lora_files import base_sha256

    root = tmp_path_factory.mktemp("lora-serving")
    base_dir = make_model_dir(root / "base")
    base = behemoth.load(base_dir).eval()
    folders, merged = {}, {}
    for name, settings, seed in (("one", LoraConfig(rank=4, alpha=8.0, targets=["all", "router"]), 1),
                                 ("two", LoraConfig(rank=2, alpha=4.0, targets=["experts"], use_rslora=True), 2)):
        model = adapted_copy(base, settings, seed, std=0.3)
        folders[name] = save_adapted(model, root / name, settings, str(base_dir), base_sha256(base))
        merged[name] = behemoth.save(merge_lora(model).eval(), root / f"{name}-merged",
                                     tokenizer=Tokenizer.load(base_dir))
    return base_dir, folders, merged


def greedy_alone(model_dir, prompts, tokens=8):
    from behemoth.inference.offline import load_engine
    from behemoth.inference.sampling import SamplingParams

    with load_engine(model_dir) as engine:
        requests = [engine.submit(p, SamplingParams(max_new_tokens=tokens, temperature=0.0, ignore_eos=True))
                    for p in prompts]
        return [[event.token_id for event in request] for request in requests]


def test_rows_of_different_adapters_share_a_batch_and_each_gets_its_own_tokens(adapter_dirs) -> None:
    from behemoth.inference.offline import load_engine
    from behemoth.inference.sampling import SamplingParams

    base_dir, folders, merged = adapter_dirs
    prompts = [[1, 17, 42, 99, 7], [1, 5, 6], [1, 200, 31, 8, 9, 10], [1, 64]]
    picks = [1, 0, 2, 1]  # one, the base, two, one: all in one continuous batch
    expected = {0: greedy_alone(base_dir, prompts), 1: greedy_alone(merged["one"], prompts),
                2: greedy_alone(merged["two"], prompts)}
    assert expected[1] != expected[0] and expected[2] != expected[0]  # each adapter changes the output
    with load_engine(base_dir, max_batch_size=4, adapters=folders) as engine:
        requests = [engine.submit(p, SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True,
                                                    adapter=pick)) for p, pick in zip(prompts, picks)]
        got = [[event.token_id for event in request] for request in requests]
        assert engine.stats()["requests_finished"] == 4
    assert got == [expected[pick][row] for row, pick in enumerate(picks)]


def test_an_unknown_adapter_another_base_or_compiling_is_refused(adapter_dirs, tmp_path) -> None:
    from serve_support import make_model_dir

    from behemoth.errors import CheckpointError
    from behemoth.inference.engine import InvalidParameter
    from behemoth.inference.offline import load_engine
    from behemoth.inference.sampling import SamplingParams

    base_dir, folders, _ = adapter_dirs
    engine = load_engine(base_dir, adapters=folders)
    with pytest.raises(InvalidParameter, match="this engine has 2 adapter"):
        engine.submit([1, 2], SamplingParams(max_new_tokens=2, adapter=3))
    with pytest.raises(ConfigError, match="--compile with adapters is not supported yet"):
        load_engine(base_dir, compile=True, adapters=folders)
    other = make_model_dir(tmp_path / "other", seed=1)  # the same shapes, other weights
    with pytest.raises(CheckpointError, match="was trained on another base"):
        load_engine(other, adapters=folders)


def test_the_api_serves_adapters_by_model_name_with_key_permissions(adapter_dirs, tmp_path) -> None:
    openai = pytest.importorskip("openai", reason="the openai client drives the API test")
    from serve_support import LiveServer

    from behemoth.serve.app import create_app
    from behemoth.serve.keys import KeyStore, Limits, create_key
    from behemoth.inference.offline import complete
    from behemoth.inference.sampling import SamplingParams
    from behemoth.serve.models import load_served_model, served_adapters

    base_dir, folders, merged = adapter_dirs
    keys_file = tmp_path / "keys.json"
    unlimited = Limits(requests_per_minute=None, tokens_per_minute=None)
    main_key = create_key(keys_file, "main", unlimited)[0]
    two_only = create_key(keys_file, "two-only", unlimited, models=["two"])[0]
    base = load_served_model("base", base_dir, max_batch_size=4, adapters=folders)
    app = create_app([base, *served_adapters(base)], KeyStore(keys_file))
    messages = [{"role": "user", "content": "the cat sat on"}]
    with LiveServer(app) as live:
        api = openai.OpenAI(base_url=live.url + "/v1", api_key=main_key, max_retries=0, timeout=60)
        listed = {m.id: getattr(m, "parent", None) for m in api.models.list().data}
        assert listed == {"base": None, "one": "base", "two": "base"}
        replies = {name: api.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0,
                                                     extra_body={"ignore_eos": True}).choices[0].message.content
                   for name in ("base", "one", "two")}
        limited = openai.OpenAI(base_url=live.url + "/v1", api_key=two_only, max_retries=0, timeout=60)
        assert [m.id for m in limited.models.list().data] == ["two"]
        with pytest.raises(openai.NotFoundError):
            limited.chat.completions.create(model="one", messages=messages, max_tokens=2)
    tokenizer = Tokenizer.load(base_dir)
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    for name in ("one", "two"):  # each adapter's reply is its merged model's, generated alone
        alone = complete(behemoth.load(merged[name]), tokenizer, [prompt],
                         SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True))
        assert alone[0].text == replies[name]
    assert replies["one"] != replies["base"]


@pytest.mark.parametrize("specs, models, words", [
    (["bad"], 1, "expected NAME=ADAPTER_DIR"),
    (["x={adapter}", "x={adapter}"], 1, "the name 'x' is already taken"),
    (["x={adapter}"], 2, "give exactly one --model (got 2)"),
    (["x={missing}"], 1, "has no adapter_config.json"),
])
def test_bad_lora_specs_are_one_line(adapter_dirs, tmp_path, specs, models, words) -> None:
    from behemoth.serve.models import parse_lora_specs

    _, folders, _ = adapter_dirs
    specs = [s.format(adapter=folders["one"], missing=tmp_path / "missing") for s in specs]
    with pytest.raises(ConfigError, match=re.escape(words)):
        parse_lora_specs(specs, {f"m{i}": tmp_path for i in range(models)})
    assert parse_lora_specs([f"sft={folders['one']}"], {"base": tmp_path}) == {"sft": folders["one"]}


def test_adapters_over_an_int8_base_each_row_its_own(adapter_dirs, tmp_path) -> None:
    """`weights="int8"` with adapters: the base is held as int8 once, inside its own modules, and each
    row of a shared batch gets what its adapter alone over that int8 base gives."""
    from behemoth.inference.offline import load_engine
    from behemoth.inference.sampling import SamplingParams
    from behemoth.model.int8 import is_quantized

    base_dir, folders, _ = adapter_dirs
    prompts = [[1, 17, 42, 99, 7], [1, 5, 6], [1, 200, 31, 8, 9, 10], [1, 64]]
    picks = [1, 0, 2, 1]
    params = [SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True, adapter=pick) for pick in picks]

    def greedy(engine, rows, on_base=False):
        requests = [engine.submit(prompts[row], SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
                                  if on_base else params[row]) for row in rows]
        return [[event.token_id for event in request] for request in requests]

    with load_engine(base_dir, max_batch_size=4, weights="int8", adapters=folders) as engine:
        assert is_quantized(engine.model) and not any(
            p.dtype == torch.float32 and p.dim() == 2 and "proj" in name for name, p in engine.model.named_parameters())
        together = greedy(engine, range(4))
        alone = [greedy(engine, [row])[0] for row in range(4)]
        base_only = greedy(engine, range(4), on_base=True)
    assert together == alone
    assert together[0] != base_only[0] and together[2] != base_only[2]  # the adapters act
    assert together[1] == base_only[1]
    with load_engine(base_dir, max_batch_size=4, adapters=folders) as engine:
        float_base = greedy(engine, range(4))
    agree = sum(a == b for row_a, row_b in zip(together, float_base) for a, b in zip(row_a, row_b))
    assert agree >= 0.75 * sum(map(len, together))  # int8 rounding moves a few greedy picks at most
