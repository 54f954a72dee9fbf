"""Model directories: bit-exact round trips, transformers interop both ways, and refusal of bad input."""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import pytest
import torch
from hf_reference import hf_model_like, random_model, transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import behemoth
import behemoth.checkpoint
from behemoth.config import ModelConfig, preset
from behemoth.errors import BehemothError, CheckpointError, ConfigError

IDS = torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(7))
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


def tiny(**changes) -> ModelConfig:
    return preset("tiny").replace(**changes) if changes else preset("tiny")


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


def assert_same_weights(loaded, original) -> None:
    ours, theirs = loaded.state_dict(), original.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype, name
        assert torch.equal(ours[name], tensor), name


def saved(tmp_path: Path, config: ModelConfig | None = None, name: str = "model", seed: int = 0, **kwargs):
    model = random_model(config or tiny(), seed=seed)
    return model, behemoth.save(model, tmp_path / name, **kwargs)


def hf_load(directory: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(directory), attn_implementation="eager").eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ------------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["float32", "tied", "bfloat16", "tied-bfloat16"])
def test_save_then_load_is_bit_exact(tmp_path: Path, variant: str) -> None:
    model = random_model(tiny(tie_word_embeddings=variant.startswith("tied")), seed=1)
    if variant.endswith("bfloat16"):
        model = model.to(torch.bfloat16)
        model.reset_buffers()  # RoPE frequencies back in float32, as load() gives them
    directory = behemoth.save(model, tmp_path / "model")

    loaded = behemoth.load(directory)
    assert loaded.config == model.config
    assert loaded.dtype == model.dtype
    assert_same_weights(loaded, model)
    assert torch.equal(logits(loaded), logits(model))
    if variant.startswith("tied"):
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still one tensor, as in training
        with safe_open(str(directory / "model.safetensors"), framework="pt") as reader:
            assert "lm_head.weight" not in reader.keys()


def test_load_can_convert_dtype(tmp_path: Path) -> None:
    model = random_model(tiny(), seed=2).to(torch.bfloat16)
    loaded = behemoth.load(behemoth.save(model, tmp_path / "model"), dtype=torch.float32)
    assert loaded.dtype == torch.float32
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.float()), name


def test_save_over_existing_directory_replaces_it_cleanly(tmp_path: Path) -> None:
    _, directory = saved(tmp_path, seed=3)
    second = random_model(tiny(), seed=4)
    behemoth.save(second, directory)
    assert_same_weights(behemoth.load(directory), second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging or retired folder left


# ------------------------------------------------------------------------------------------------
# transformers interop
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_transformers_loads_our_save_unchanged(tmp_path: Path, tied: bool) -> None:
    model, directory = saved(tmp_path, tiny(tie_word_embeddings=tied), seed=5)
    hf = hf_load(directory)
    assert type(hf).__name__ == "Llama4ForCausalLM"
    assert hf.dtype == torch.float32
    assert max_diff(logits(hf), logits(model)) <= 1e-4


def test_bfloat16_checkpoint_loads_with_float32_rope_frequencies_as_transformers_does(tmp_path: Path) -> None:
    model = random_model(tiny(rope_scaling=dict(LLAMA3)), seed=5)
    directory = behemoth.save(model.to(torch.bfloat16), tmp_path / "model")
    ours = behemoth.load(directory)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16 and hf.dtype == torch.bfloat16
    assert ours.rope_inv_freq.dtype == torch.float32 == hf.model.rotary_emb.inv_freq.dtype
    assert torch.allclose(ours.rope_inv_freq, hf.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
    assert not torch.equal(ours.rope_inv_freq, ours.rope_inv_freq.bfloat16().float())  # rounding would show


def test_config_form_4_with_llama3_rope_loads_identically(tmp_path: Path) -> None:
    config = tiny(rope_theta=10000.0, rope_scaling=dict(LLAMA3))
    model, directory = saved(tmp_path, config, seed=6, config_form="4")

    written = json.loads((directory / "config.json").read_text())
    assert "rope_parameters" not in written
    assert written["rope_theta"] == 10000.0
    assert written["rope_scaling"]["rope_type"] == "llama3"
    assert written["rope_scaling"]["factor"] == 8.0

    ours = behemoth.load(directory)
    assert ours.config == model.config
    assert torch.equal(logits(ours), logits(model))
    hf = hf_load(directory)
    assert hf.config.rope_parameters["rope_type"] == "llama3"
    assert max_diff(logits(hf), logits(ours)) <= 1e-4
    # Guard: the scaling really changes the output, so agreeing above means both applied it.
    unscaled = random_model(config.replace(rope_scaling=None), seed=6)
    assert max_diff(logits(unscaled), logits(ours)) > 1e-3


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_load_checkpoint_written_by_transformers(tmp_path: Path, tied: bool) -> None:
    model = random_model(tiny(tie_word_embeddings=tied), seed=8)
    hf = hf_model_like(model)
    hf.save_pretrained(str(tmp_path / "hf"))

    loaded = behemoth.load(tmp_path / "hf")
    assert loaded.config == model.config
    assert_same_weights(loaded, model)
    assert max_diff(logits(loaded), logits(hf)) <= 1e-4


# ------------------------------------------------------------------------------------------------
# Sharding and the multimodal layout
# ------------------------------------------------------------------------------------------------

def test_sharded_save_loads_back_and_in_transformers(tmp_path: Path) -> None:
    model, directory = saved(tmp_path, seed=9, max_shard_bytes=300_000)

    shards = sorted(p.name for p in directory.glob("*.safetensors"))
    count = len(shards)
    assert count >= 3
    assert shards == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert not (directory / "model.safetensors").exists()
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    state = model.state_dict()
    assert index["weight_map"].keys() == state.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    for name, shard in index["weight_map"].items():
        with safe_open(str(directory / shard), framework="pt") as reader:
            assert name in reader.keys(), (name, shard)

    loaded = behemoth.load(directory)
    assert_same_weights(loaded, model)
    assert torch.equal(logits(loaded), logits(model))
    assert max_diff(logits(hf_load(directory)), logits(model)) <= 1e-4


def test_sharded_index_naming_a_missing_shard_is_refused(tmp_path: Path) -> None:
    _, directory = saved(tmp_path, max_shard_bytes=300_000)
    next(directory.glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json.*model-00002-of-\d+\.safetensors.*missing"):
        behemoth.load(directory)


def test_conditional_generation_layout_loads_text_weights(tmp_path: Path) -> None:
    model = random_model(tiny(), seed=10)
    directory = tmp_path / "multimodal"
    directory.mkdir()
    config = {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
              "text_config": model.config.to_hf_dict(), "vision_config": {}}
    (directory / "config.json").write_text(json.dumps(config))
    tensors = {f"language_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors["vision_model.foo"] = torch.randn(3, 5)
    tensors["multi_modal_projector.linear_1.weight"] = torch.randn(64, 7)
    save_file(tensors, str(directory / "model.safetensors"))

    loaded = behemoth.load(directory)
    assert loaded.config == model.config
    assert_same_weights(loaded, model)
    assert torch.equal(logits(loaded), logits(model))


# ------------------------------------------------------------------------------------------------
# Bad input: one typed error, one line naming the file and the problem
# ------------------------------------------------------------------------------------------------

def test_errors_are_behemoth_errors() -> None:
    assert issubclass(CheckpointError, BehemothError) and issubclass(ConfigError, BehemothError)


@contextlib.contextmanager
def expect(error: type[BehemothError], *fragments: str):
    """pytest.raises for `error`, then each fragment must appear in its one-line message."""
    with pytest.raises(error) as info:
        yield info
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment.lower() in message.lower(), (fragment, message)


_DELETE = object()  # edit_config: remove this key


def edit_config(directory: Path, **changes) -> Path:
    path = directory / "config.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DELETE:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))
    return path



@pytest.mark.parametrize("changes, fragments", [
    (dict(architectures=["BertModel"], model_type="bert"), ("architectures", "BertModel")),
    (dict(architectures=_DELETE, model_type="bert"), ("model_type", "bert")),
], ids=["architectures", "model_type"])
def test_other_architecture_is_refused(tmp_path: Path, changes: dict, fragments: tuple) -> None:
    _, directory = saved(tmp_path)
    path = edit_config(directory, **changes)
    with expect(ConfigError, str(path), *fragments):
        behemoth.load(directory)


def rewrite_weights(directory: Path, change) -> Path:
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))
    return path


def test_missing_tensor_is_refused(tmp_path: Path) -> None:
    _, directory = saved(tmp_path)
    path = rewrite_weights(directory, lambda t: t.pop("model.layers.1.post_attention_layernorm.weight"))
    with expect(CheckpointError, str(path), "missing", "model.layers.1.post_attention_layernorm.weight"):
        behemoth.load(directory)


def test_misshaped_tensor_is_refused(tmp_path: Path) -> None:
    _, directory = saved(tmp_path)
    path = rewrite_weights(directory, lambda t: t.update({"model.norm.weight": torch.ones(63)}))
    with expect(CheckpointError, str(path), "model.norm.weight", "shape", "[63]", "[64]"):
        behemoth.load(directory)


def test_unknown_extra_tensor_is_refused(tmp_path: Path) -> None:
    _, directory = saved(tmp_path)
    path = rewrite_weights(directory, lambda t: t.update({"model.layers.0.mystery.weight": torch.ones(2)}))
    with expect(CheckpointError, str(path), "unexpected", "model.layers.0.mystery.weight"):
        behemoth.load(directory)


def test_integer_tensor_is_refused(tmp_path: Path) -> None:
    _, directory = saved(tmp_path)
    path = rewrite_weights(directory, lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}))
    with expect(CheckpointError, str(path), "model.norm.weight", "dtype", "I32"):
        behemoth.load(directory)


class Canary:
    """Unpickling this creates a directory: proof that a pickle was (wrongly) executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_pickle_weights_are_refused_without_unpickling(tmp_path: Path) -> None:
    model, directory = saved(tmp_path)
    (directory / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    torch.save({**model.state_dict(), "canary": Canary(marker)}, directory / "pytorch_model.bin")
    with expect(CheckpointError, str(directory / "pytorch_model.bin"), "pickle", "safetensors"):
        behemoth.load(directory)
    assert not marker.exists()


def test_pickle_disguised_as_safetensors_is_refused(tmp_path: Path) -> None:
    model, directory = saved(tmp_path)
    marker = tmp_path / "unpickled"
    torch.save({**model.state_dict(), "canary": Canary(marker)}, directory / "model.safetensors")
    with expect(CheckpointError, str(directory / "model.safetensors"), "not a valid safetensors file"):
        behemoth.load(directory)
    assert not marker.exists()


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    with expect(CheckpointError, str(tmp_path / "nowhere"), "no such directory"):
        behemoth.load(tmp_path / "nowhere")


def test_directory_without_config_is_refused(tmp_path: Path) -> None:
    _, directory = saved(tmp_path)
    (directory / "config.json").unlink()
    with expect(CheckpointError, str(directory), "no config.json"):
        behemoth.load(directory)


def test_directory_without_weights_is_refused(tmp_path: Path) -> None:
    _, directory = saved(tmp_path)
    (directory / "model.safetensors").unlink()
    with expect(CheckpointError, str(directory), "no model.safetensors"):
        behemoth.load(directory)


def test_config_that_is_not_json_is_refused(tmp_path: Path) -> None:
    _, directory = saved(tmp_path)
    (directory / "config.json").write_text('{"hidden_size": 64,')
    with expect(ConfigError, str(directory / "config.json"), "not valid JSON"):
        behemoth.load(directory)


@pytest.mark.parametrize("changes, fragments", [
    (dict(hidden_size="big"), ("hidden_size", "wrong type", "'big'")),
    (dict(hidden_size="big", head_dim=_DELETE), ("hidden_size", "wrong type", "'big'")),
    (dict(num_attention_heads=0, head_dim=_DELETE), ("num_attention_heads", "positive", "0")),
    (dict(tie_word_embeddings="yes"), ("tie_word_embeddings", "wrong type")),
    (dict(rope_parameters=[1, 2]), ("rope_parameters", "object")),
    (dict(rope_parameters={**LLAMA3, "factor": "big", "rope_theta": 1e4}), ("rope_scaling.factor", "number", "'big'")),
    (dict(no_rope_layers=_DELETE, no_rope_layer_interval=0), ("no_rope_layer_interval", "positive")),
], ids=["string-hidden", "string-hidden-derived-head-dim", "zero-heads-derived-head-dim", "string-bool",
        "rope-not-object", "string-llama3-factor", "zero-nope-interval"])
def test_config_with_wrong_field_is_refused(tmp_path: Path, changes: dict, fragments: tuple) -> None:
    _, directory = saved(tmp_path)
    path = edit_config(directory, **changes)
    with expect(ConfigError, str(path), *fragments):
        behemoth.load(directory)


def test_failed_save_leaves_old_directory_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old, directory = saved(tmp_path, seed=11)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    real_write = behemoth.checkpoint.write_model_files
    staged = []

    def write_then_fail(model, staging, **kwargs):
        real_write(model, staging, **kwargs)
        staged.append(Path(staging))
        assert (Path(staging) / "model.safetensors").is_file()  # it really wrote something
        raise OSError("disk full")

    monkeypatch.setattr(behemoth.checkpoint, "write_model_files", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        behemoth.save(random_model(tiny(), seed=12), directory)

    assert staged and re.fullmatch(r"\.model\..+\.tmp", staged[0].name) and staged[0].parent == tmp_path
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert_same_weights(behemoth.load(directory), old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert not list(tmp_path.glob(".model.*.tmp"))
