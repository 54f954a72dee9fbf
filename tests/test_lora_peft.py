"""LoRA adapters in PEFT's format, both ways (lora_files.py): what we write, PEFT loads over
transformers' Llama4ForCausalLM and computes our logits; what PEFT writes for that model, we load
and compute PEFT's logits. The routed experts' two packings (before and since PEFT 0.19.1) are
built here from PEFT's own delta formulas, not from our conversion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_reference import hf_model_like, random_model
from lora_support import randomise_adapters

from behemoth.cli import main
from behemoth.config import preset
from behemoth.errors import CheckpointError
from behemoth.lora_files import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterInfo, base_sha256, expert_layouts,
                                 load_adapter_into, save_adapter)
from behemoth.model.lora import ExpertLoRA, adapter_modules, apply_lora
from behemoth.train.config import LoraConfig

peft = pytest.importorskip("peft", reason="PEFT is needed for the adapter round trips (the test extras have it)")
from safetensors.torch import load_file, save_file  # noqa: E402

ATOL = 1e-5  # as the float32 parity tests
pytestmark = pytest.mark.usefixtures("one_torch_thread")
TARGETS = ["attention", "mlp", "shared_expert", "experts"]  # PEFT cannot run a LoRA on Llama4Router


def base_model(**overrides):
    return random_model(preset("tiny").replace(**overrides), seed=3)


def adapted(model, targets=TARGETS, **settings):
    apply_lora(model, LoraConfig(rank=4, alpha=8.0, targets=targets, **settings))
    randomise_adapters(model, std=0.1, b_only=False)
    return model.eval()


def info_of(model, targets=TARGETS, dropout: float = 0.0) -> AdapterInfo:
    return AdapterInfo(4, 8.0, False, dropout, targets, list(adapter_modules(model)), "a test base",
                       base_sha256(model))


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


IDS = torch.tensor([[1, 5, 9, 2, 7, 3, 11, 4], [8, 6, 4, 2, 1, 3, 5, 7]])


def test_peft_loads_our_adapter_and_computes_our_logits(tmp_path) -> None:
    base = base_model()
    hf = hf_model_like(base)  # before the adapters: the base's weights
    before = logits(hf, IDS)
    ours = adapted(base, use_rslora=True, dropout=0.1)
    info = info_of(ours, dropout=0.1)
    info.use_rslora = True
    save_adapter(ours, tmp_path / "adapter", info)
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["lora_dropout"] == 0.0  # PEFT refuses dropout on expert parameters; ours is in the metadata
    assert {"model.layers.1.feed_forward.experts.gate_up_proj",
            "model.layers.3.feed_forward.experts.down_proj"} <= set(config["target_parameters"])
    model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(logits(model, IDS), logits(ours, IDS), rtol=ATOL, atol=ATOL)
    assert (logits(model, IDS) - before).abs().max() > 1e-2  # the adapters, experts included, act


def peft_made_adapter(tmp_path: Path, base, expert_targets=("gate_up_proj", "down_proj")) -> Path:
    """An adapter PEFT trains for transformers' Llama4ForCausalLM (its factors randomised)."""
    hf = hf_model_like(base)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                             target_parameters=[f"feed_forward.experts.{name}" for name in expert_targets])
    model = peft.get_peft_model(hf, config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(str(tmp_path / "peft"))
    return tmp_path / "peft", model.eval()


def test_we_load_an_adapter_peft_trained_and_compute_its_logits(tmp_path) -> None:
    base = base_model()
    directory, peft_model = peft_made_adapter(tmp_path, base)
    info = load_adapter_into(base, directory, expected_base=base_sha256(base), attach=True)
    assert info.base_sha256 is None and info.rank == 4  # made elsewhere: no checksum to hold it to
    assert "model.layers.1.feed_forward.experts.gate_up_proj" in info.modules
    assert "model.layers.0.self_attn.q_proj" in info.modules and "model.layers.0.self_attn.k_proj" not in info.modules
    torch.testing.assert_close(logits(base.eval(), IDS), logits(peft_model, IDS), rtol=ATOL, atol=ATOL)


def test_behemoth_merge_takes_a_peft_adapter(tmp_path) -> None:
    import behemoth

    base = base_model()
    base_dir = behemoth.save(base, tmp_path / "base")
    directory, peft_model = peft_made_adapter(tmp_path, base, expert_targets=("down_proj",))
    assert main(["merge", "--model", str(base_dir), "--adapter", str(directory), "--out", str(tmp_path / "m")]) == 0
    merged = behemoth.load(tmp_path / "m").eval()
    torch.testing.assert_close(logits(merged, IDS), logits(peft_model, IDS), rtol=ATOL, atol=ATOL)


def old_layout(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT < 0.19.1's factors for our A [E, in, r], B [E, r, out]: lora_A [E*r, in] and lora_B
    [out, r*E] with delta[e] = einsum("o r e, e r i -> e i o") (PEFT 0.18's get_delta_weight)."""
    experts, fan_in, rank = a.shape
    lora_a = a.transpose(1, 2).reshape(experts * rank, fan_in)
    lora_b = b.permute(2, 1, 0).reshape(b.shape[2], rank * experts)
    delta = torch.einsum("ore,eri->eio", lora_b.reshape(-1, rank, experts), lora_a.reshape(experts, rank, -1))
    torch.testing.assert_close(delta, torch.bmm(a, b))  # the packing is PEFT's, checked by its formula
    return lora_a, lora_b


def new_layout_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, experts: int, rank: int) -> torch.Tensor:
    """PEFT >= 0.19.1's delta for a stack stored (E, in, out): einsum("o r e, e r i -> e o i")."""
    return torch.einsum("ore,eri->eoi", lora_b.reshape(-1, rank, experts), lora_a.reshape(experts, rank, -1))


def test_what_we_write_is_the_new_expert_layout(tmp_path) -> None:
    model = adapted(base_model(), targets=["experts"])
    save_adapter(model, tmp_path / "a", info_of(model, ["experts"]))
    tensors = load_file(str(tmp_path / "a" / ADAPTER_WEIGHTS))
    prefix = "base_model.model.model.layers.1.feed_forward.experts"
    for key, stack in ((f"{prefix}.base_layer", "gate_up_proj"), (prefix, "down_proj")):
        lora = getattr(model.model.layers[1].feed_forward.experts, "lora_gate_up" if stack == "gate_up_proj"
                       else "lora_down")
        delta = new_layout_delta(tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"], 4, 4)
        torch.testing.assert_close(delta, torch.bmm(lora.lora_A, lora.lora_B).detach())


def rewrite_experts_old(directory: Path, model, peft_version: str | None) -> None:
    """Turn a saved adapter's expert factors into the pre-0.19.1 packing, naming `peft_version`."""
    tensors = load_file(str(directory / ADAPTER_WEIGHTS))
    modules = adapter_modules(model)
    for site, module in modules.items():
        if isinstance(module, ExpertLoRA):
            owner, _, stack = site.rpartition(".")
            inner = stack == "gate_up_proj" and f"{owner}.down_proj" in modules
            key = "base_model.model." + owner + (".base_layer" if inner else "")
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = old_layout(
                module.lora_A.detach(), module.lora_B.detach())
    save_file(tensors, str(directory / ADAPTER_WEIGHTS))
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    config.pop("peft_version")
    if peft_version is not None:
        config["peft_version"] = peft_version
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config))


@pytest.mark.parametrize("version", [None, "0.18.1", "0.19.0"])
def test_the_older_expert_layout_is_read(tmp_path, version) -> None:
    model = adapted(base_model(), targets=["experts"])
    save_adapter(model, tmp_path / "a", info_of(model, ["experts"]))
    rewrite_experts_old(tmp_path / "a", model, version)
    fresh = base_model()
    load_adapter_into(fresh, tmp_path / "a", attach=True)
    torch.testing.assert_close(logits(fresh.eval(), IDS), logits(model, IDS), rtol=ATOL, atol=ATOL)


def test_an_ambiguous_expert_layout_is_refused(tmp_path) -> None:
    # hidden 64 = 2 x intermediate 32: gate_up_proj is [E, 64, 64], and both packings fit its factors
    model = adapted(base_model(intermediate_size=32), targets=["experts.gate_up_proj"])
    save_adapter(model, tmp_path / "a", info_of(model, ["experts.gate_up_proj"]))
    rewrite_experts_old(tmp_path / "a", model, "0.19.1.dev0")  # a build from between the two layouts
    with pytest.raises(CheckpointError, match="fits both PEFT expert layouts"):
        load_adapter_into(base_model(intermediate_size=32), tmp_path / "a", attach=True)
    rewrite_experts_old(tmp_path / "a", model, "0.19.0")  # the version decides
    fresh = base_model(intermediate_size=32)
    load_adapter_into(fresh, tmp_path / "a", attach=True)
    torch.testing.assert_close(logits(fresh.eval(), IDS), logits(model, IDS), rtol=ATOL, atol=ATOL)


@pytest.mark.parametrize("version, layouts", [(None, (False,)), ("0.18.1", (False,)), ("0.19.0", (False,)),
                                              ("0.19.1", (True,)), ("0.22.0", (True,)), ("0.22.0@1a2b", (True,)),
                                              ("0.19.1.dev0", (False, True)), ("main", (False, True))])
def test_expert_layouts_follow_the_peft_version(version, layouts) -> None:
    assert expert_layouts(version) == layouts


@pytest.mark.parametrize("change, words", [({"peft_type": "IA3"}, "not a PEFT LoRA config"),
                                           ({"use_dora": True}, "use_dora = True is not supported"),
                                           ({"r": 0}, "r must be a positive number"),
                                           ({"bias": "all"}, "bias = 'all' is not supported")])
def test_unsupported_peft_settings_are_one_line(tmp_path, capsys, change, words) -> None:
    import behemoth

    model = adapted(base_model(), targets=["attention"])
    save_adapter(model, tmp_path / "a", info_of(model, ["attention"]))
    config = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    (tmp_path / "a" / ADAPTER_CONFIG).write_text(json.dumps({**config, **change}))
    base_dir = behemoth.save(base_model(), tmp_path / "base")
    assert main(["merge", "--model", str(base_dir), "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert words in err and ADAPTER_CONFIG in err and err.count("\n") == 1
    assert not (tmp_path / "m").exists()
