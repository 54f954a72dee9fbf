"""Config round trips, presets, and the parameter/FLOP arithmetic of `behemoth info`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from behemoth.cli import main
from behemoth.config import PRESETS, ModelConfig, preset
from behemoth.errors import ConfigError
from behemoth.info import mean_visible_keys, model_size
from behemoth.model import Transformer, init_weights


def numel_on_meta(config: ModelConfig) -> int:
    with torch.device("meta"):
        model = Transformer(config)
    return sum(p.numel() for p in model.parameters())  # parameters() counts a tied weight once


@pytest.mark.parametrize("name", PRESETS)
def test_total_params_equal_the_real_module(name: str) -> None:
    config = preset(name)
    assert model_size(config).total_params == numel_on_meta(config)


@pytest.mark.parametrize("changes", [dict(), dict(tie_word_embeddings=True), dict(attention_bias=True),
                                     dict(num_experts_per_tok=2, interleave_moe_layer_step=1)])
def test_active_params_equal_a_model_holding_only_the_picked_experts(changes: dict) -> None:
    config = preset("tiny").replace(**changes)
    only_picked = config.replace(num_local_experts=config.num_experts_per_tok)
    router_difference = len(config.moe_layers) * config.hidden_size * (
        config.num_local_experts - config.num_experts_per_tok)
    assert model_size(config).active_params == numel_on_meta(only_picked) + router_difference


def test_published_shapes() -> None:
    scout, maverick, behemoth = (model_size(preset(n)) for n in
                                 ("scout-17b-16e", "maverick-17b-128e", "behemoth-288b-16e"))
    assert scout.total_params == pytest.approx(107.8e9, rel=0.01)
    assert scout.active_params == pytest.approx(17.2e9, rel=0.01)
    assert maverick.total_params == pytest.approx(400e9, rel=0.01)
    # Meta rounds Maverick's active count to "17B"; its layers are as wide as Scout's (17.2B).
    assert maverick.active_params == pytest.approx(17.2e9, rel=0.01)
    assert behemoth.active_params == pytest.approx(288e9, rel=0.02)
    assert behemoth.total_params == pytest.approx(2e12, rel=0.05) and behemoth.total_params < 2e12


def test_small_presets_are_sized_as_promised() -> None:
    assert model_size(preset("tiny")).total_params < 1_000_000
    assert 10e6 <= model_size(preset("cpu-small")).total_params <= 30e6
    moe, dense = model_size(preset("cpu-small")), model_size(preset("dense-small"))
    assert dense.num_moe_layers == 0
    assert dense.active_params == pytest.approx(moe.active_params, rel=0.01)


def test_matmul_flops_match_a_flop_counter_so_experts_run_sparsely() -> None:
    """Every routed token goes through top_k experts only: counted FLOPs equal our arithmetic."""
    config = preset("tiny").replace(num_local_experts=8, num_experts_per_tok=2)
    model = Transformer(config)
    init_weights(model, seed=0)
    ids = torch.randint(0, config.vocab_size, (2, 32))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(ids)
    counts = counter.get_flop_counts()["Global"]
    matmul = sum(v for op, v in counts.items() if "attention" not in str(op))
    assert matmul == model_size(config).matmul_flops_per_token * ids.numel()


def test_mean_visible_keys() -> None:
    assert mean_visible_keys(4, None) == 2.5
    assert mean_visible_keys(6, 4) == (1 + 2 + 3 + 4 + 1 + 2) / 6


@pytest.mark.parametrize("form", ["4", "5"])
def test_config_json_round_trip(form: str, tmp_path) -> None:
    config = preset("scout-17b-16e")
    config.save(tmp_path / "config.json", form=form)
    data = json.loads((tmp_path / "config.json").read_text())
    assert ("rope_parameters" in data) == (form == "5")
    assert ("rope_scaling" in data) == (form == "4")
    assert ModelConfig.load(tmp_path) == config


def test_transformers_reads_our_config_the_same_way() -> None:
    transformers = pytest.importorskip("transformers")
    ours = preset("maverick-17b-128e").replace(no_rope_layers=[1, 0] * 24)
    fields = {k: v for k, v in ours.to_hf_dict().items() if k not in ("architectures", "model_type")}
    theirs = transformers.Llama4TextConfig(**fields)
    assert theirs.moe_layers == ours.moe_layers
    assert theirs.no_rope_layers == ours.no_rope_layers
    assert theirs.rope_parameters["rope_theta"] == ours.rope_theta


@pytest.mark.parametrize("change, words", [
    (dict(num_attention_heads=6, num_key_value_heads=4), "multiple of num_key_value_heads"),
    (dict(hidden_size="wide"), "hidden_size"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(moe_layers=[7]), "moe_layers"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "rope_type"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0}), "missing"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(no_rope_layers=[1, 1]), "no_rope_layers"),
])
def test_invalid_configs_are_named(change: dict, words: str) -> None:
    values = {**preset("tiny").to_hf_dict(), **change}
    with pytest.raises(ConfigError, match=words):
        ModelConfig.from_hf_dict(values, "config.json")


def test_other_architecture_is_refused() -> None:
    with pytest.raises(ConfigError, match="architectures"):
        ModelConfig.from_hf_dict({"architectures": ["BertModel"], "model_type": "bert"}, "x/config.json")


def test_cli_info_json(capsys) -> None:
    assert main(["info", "cpu-small", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total_params"] == model_size(preset("cpu-small")).total_params
    assert data["active_params"] < data["total_params"]


def test_cli_info_reads_a_model_directory(tmp_path, capsys) -> None:
    preset("tiny").save(tmp_path / "config.json")
    assert main(["info", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_params"] == model_size(preset("tiny")).total_params


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path) -> None:
    (tmp_path / "config.json").write_text('{"architectures": ["BertModel"]}')
    for target in ("no-such-preset", str(tmp_path)):
        result = subprocess.run([sys.executable, "-m", "behemoth", "info", target],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2
        assert result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("behemoth: error:"), result.stderr


def test_public_api_is_lazy_and_generate_is_the_function() -> None:
    """`behemoth info` and `--help` must not pay for torch; behemoth.generate stays a function."""
    code = ("import sys, behemoth; behemoth.preset('tiny'); assert 'torch' not in sys.modules; "
            "import behemoth.inference.generate; assert callable(behemoth.generate) and behemoth.generate.__name__ == 'generate'; "
            "assert behemoth.load.__module__ == 'behemoth.checkpoint'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_version_flag(capsys) -> None:
    from behemoth import __version__
    from behemoth.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"behemoth {__version__}"
