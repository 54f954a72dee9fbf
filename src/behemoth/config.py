"""Model configuration and presets.

`ModelConfig` carries the field names and meaning of `transformers`' `Llama4TextConfig`, so a
`config.json` written by either side reads on the other. It reads both the transformers 4.x form
(`rope_theta` + `rope_scaling`) and the 5.x form (`rope_parameters`), and writes either.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from behemoth.errors import ConfigError
from behemoth.jsonio import read_json_object

TEXT_ARCHITECTURE = "Llama4ForCausalLM"
MULTIMODAL_ARCHITECTURE = "Llama4ForConditionalGeneration"
SUPPORTED_ROPE_TYPES = ("default", "llama3")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

@dataclass
class ModelConfig:
    """Shape and semantics of a Llama 4 text model (names as in `Llama4TextConfig`)."""

    vocab_size: int = 202048
    hidden_size: int = 5120
    intermediate_size: int = 8192  # width of each routed expert and of the shared expert
    intermediate_size_mlp: int = 16384  # width of the dense (non-MoE) layers' MLP
    num_hidden_layers: int = 48
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    num_experts_per_tok: int = 1
    num_local_experts: int = 16
    interleave_moe_layer_step: int = 1
    moe_layers: list[int] | None = None  # resolved from interleave_moe_layer_step when None
    use_qk_norm: bool = True
    rope_theta: float = 500000.0
    rope_scaling: dict[str, Any] | None = None  # None or {"rope_type": "llama3", factor, ...}
    no_rope_layers: list[int] | None = None  # 1 = the layer USES RoPE; resolved when None
    no_rope_layer_interval: int = 4
    attention_chunk_size: int | None = 8192
    attn_temperature_tuning: bool = True
    floor_scale: int = 8192
    attn_scale: float = 0.1

    def __post_init__(self) -> None:
        _check_field_types(self)
        if self.moe_layers is None:
            step = self.interleave_moe_layer_step
            self.moe_layers = list(range(step - 1, self.num_hidden_layers, step)) if step > 0 else []
        if not self.no_rope_layers:
            interval = self.no_rope_layer_interval
            if interval <= 0:
                raise ConfigError(f"no_rope_layer_interval must be positive, got {interval}")
            self.no_rope_layers = [int((i + 1) % interval != 0) for i in range(self.num_hidden_layers)]
        self.validate()

    # -- checks -----------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming the first field whose value cannot work."""
        _check_field_types(self)
        if self.moe_layers is None or self.no_rope_layers is None:
            raise ConfigError("moe_layers and no_rope_layers must be resolved lists")
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (Llama 4 uses 'silu')")
        if self.moe_layers:
            if self.num_local_experts < 1:
                raise ConfigError(f"num_local_experts must be >= 1, got {self.num_local_experts}")
            if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
                raise ConfigError(f"num_experts_per_tok must be between 1 and num_local_experts "
                                  f"({self.num_local_experts}), got {self.num_experts_per_tok}")
        bad = [i for i in self.moe_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ConfigError(f"moe_layers has indices outside 0..{self.num_hidden_layers - 1}: {bad}")
        if len(self.no_rope_layers) < self.num_hidden_layers:
            raise ConfigError(f"no_rope_layers has {len(self.no_rope_layers)} entries, need at least "
                              f"num_hidden_layers ({self.num_hidden_layers})")
        if any(v not in (0, 1) for v in self.no_rope_layers):
            raise ConfigError("no_rope_layers entries must be 0 (NoPE) or 1 (RoPE)")
        if self.attention_chunk_size is not None and self.attention_chunk_size <= 0:
            raise ConfigError(f"attention_chunk_size must be positive or null, got {self.attention_chunk_size}")
        needed = {"intermediate_size": bool(self.moe_layers), "floor_scale": True, "rope_theta": True,
                  "intermediate_size_mlp": len(self.moe_layers) < self.num_hidden_layers}  # dense layers exist
        for name, applies in needed.items():
            if applies and getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"rope_scaling.rope_type {self.rope_type!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        if self.rope_type == "llama3":
            missing = [k for k in LLAMA3_ROPE_KEYS if k not in self.rope_scaling]
            if missing:
                raise ConfigError(f"rope_scaling (llama3) is missing {', '.join(missing)}")
            wrong = [k for k in LLAMA3_ROPE_KEYS if not _is_number(self.rope_scaling[k])]
            if wrong:
                raise ConfigError(f"rope_scaling.{wrong[0]} must be a number, got {self.rope_scaling[wrong[0]]!r}")

    # -- derived facts --------------------------------------------------------------------------
    @property
    def rope_type(self) -> str:
        if self.rope_scaling is None:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx in self.moe_layers

    def uses_rope(self, layer_idx: int) -> bool:
        return bool(self.no_rope_layers[layer_idx])

    def chunk_size_for_layer(self, layer_idx: int) -> int | None:
        """Chunked local attention on RoPE layers; full causal attention on NoPE layers."""
        return self.attention_chunk_size if self.uses_rope(layer_idx) else None

    # -- Hugging Face config.json ---------------------------------------------------------------
    def to_hf_dict(self, form: str = "5") -> dict[str, Any]:
        """The `config.json` content for `Llama4ForCausalLM`; form "5" (rope_parameters) or "4"."""
        if form not in ("4", "5"):
            raise ConfigError(f"config form must be '4' or '5', got {form!r}")
        out: dict[str, Any] = {"architectures": [TEXT_ARCHITECTURE], "model_type": "llama4_text",
                               **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                                  if f.name not in ("rope_theta", "rope_scaling")}}
        rope = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope.update({k: v for k, v in self.rope_scaling.items() if k not in ("type", "rope_type")})
        if form == "5":
            out["rope_parameters"] = rope
        else:
            out["rope_theta"] = self.rope_theta
            out["rope_scaling"] = ({k: v for k, v in rope.items() if k != "rope_theta"}
                                   if self.rope_scaling else None)
        return out

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], source: str = "config") -> ModelConfig:
        """Build from a `config.json` dict (text or multimodal Llama 4, 4.x or 5.x form)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        architectures = data.get("architectures") or []
        if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
            raise ConfigError(f"{source}: architectures must be a list of names, got {architectures!r}")
        model_type = data.get("model_type")
        if MULTIMODAL_ARCHITECTURE in architectures or model_type == "llama4":
            text = data.get("text_config")
            if not isinstance(text, dict):
                raise ConfigError(f"{source}: a {MULTIMODAL_ARCHITECTURE} config needs a text_config object")
            return cls.from_hf_dict({"architectures": [TEXT_ARCHITECTURE], **text}, source)
        known = (TEXT_ARCHITECTURE, "Llama4TextModel")
        if architectures and not any(a in known for a in architectures):
            raise ConfigError(f"{source}: architectures is {architectures}, expected {TEXT_ARCHITECTURE} "
                              f"or {MULTIMODAL_ARCHITECTURE}")
        if model_type not in (None, "llama4_text"):
            raise ConfigError(f"{source}: model_type is {model_type!r}, expected 'llama4_text' or 'llama4'")
        field_names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in field_names and k not in ("rope_theta", "rope_scaling")}
        kwargs["rope_theta"], kwargs["rope_scaling"] = _read_rope(data, source)
        hidden, heads = kwargs.get("hidden_size"), kwargs.get("num_attention_heads")
        if kwargs.get("head_dim") is None and _is_int(hidden) and _is_int(heads) and hidden > 0 and heads > 0:
            kwargs["head_dim"] = hidden // heads  # otherwise the constructor names the bad field
        if kwargs.get("num_key_value_heads") is None and "num_attention_heads" in kwargs:
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        try:
            return cls(**kwargs)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    def save(self, path: str | Path, form: str = "5") -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(form), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no such file")
        return cls.from_hf_dict(read_json_object(path), str(path))

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed; layer lists are re-derived when the layout changes."""
        values = dataclasses.asdict(self)
        if "num_hidden_layers" in changes or "interleave_moe_layer_step" in changes:
            values["moe_layers"] = None
        if "num_hidden_layers" in changes or "no_rope_layer_interval" in changes:
            values["no_rope_layers"] = None
        values.update(changes)
        return ModelConfig(**values)


_OPTIONAL_INT_FIELDS = {"pad_token_id", "bos_token_id", "attention_chunk_size"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_field_types(config: ModelConfig) -> None:
    """JSON gives any type for any key: reject a wrong one by name before arithmetic meets it."""
    for f in dataclasses.fields(config):
        value, default = getattr(config, f.name), f.default
        if f.name in _OPTIONAL_INT_FIELDS:
            ok = value is None or _is_int(value)
        elif f.name in ("moe_layers", "no_rope_layers"):
            ok = value is None or isinstance(value, list) and all(_is_int(v) for v in value)
        elif f.name == "eos_token_id":
            ok = value is None or isinstance(value, int) or (
                isinstance(value, list) and all(isinstance(v, int) for v in value))
        elif f.name == "rope_scaling":
            ok = value is None or isinstance(value, dict)
        elif isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = _is_int(value)
        elif isinstance(default, float):
            ok = _is_number(value)
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise ConfigError(f"{f.name} has the wrong type: {value!r}")


def _read_rope(data: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """RoPE base and scaling from either the 5.x `rope_parameters` or the 4.x keys."""
    params = data.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise ConfigError(f"{source}: rope_parameters must be an object")
        theta = params.get("rope_theta", data.get("rope_theta", 500000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = data.get("rope_theta", 500000.0)
        scaling = data.get("rope_scaling")
        if scaling is not None and not isinstance(scaling, dict):
            raise ConfigError(f"{source}: rope_scaling must be an object or null")
        scaling = dict(scaling) if scaling else None
    if scaling is not None:
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        if scaling.get("rope_type", "default") == "default":
            scaling = None
    if not _is_number(theta):
        raise ConfigError(f"{source}: rope_theta must be a number, got {theta!r}")
    return float(theta), scaling


# -- presets --------------------------------------------------------------------------------------

def _tiny() -> ModelConfig:
    """Well under 1M parameters, for tests: every feature present (MoE + dense, RoPE + NoPE)."""
    return ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, intermediate_size_mlp=256,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
        max_position_embeddings=2048, tie_word_embeddings=False)


def _cpu_small() -> ModelConfig:
    """About 23M total / 12M active parameters: trains usefully on two CPU cores. It keeps every
    value llama.cpp hard-codes for Llama 4 (chunk 8192, NoPE every 4th layer, temperature tuning
    8192/0.1, QK-norm, shared expert as wide as a routed one), so its models can be released as GGUF."""
    return ModelConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=512, intermediate_size_mlp=1024,
        num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        num_local_experts=8, num_experts_per_tok=1, interleave_moe_layer_step=2,
        max_position_embeddings=4096)


def _cpu_mini() -> ModelConfig:
    """About 4.5M parameters (3.1M active): cpu-small's student in the speedrun (half the width,
    half the depth, the same tokenizer and expert layout), distilled from a cpu-small teacher."""
    return _cpu_small().replace(hidden_size=128, intermediate_size=256, intermediate_size_mlp=512,
                                num_hidden_layers=4, head_dim=32)


def _dense_small() -> ModelConfig:
    """`cpu-small` without experts: every layer a dense MLP as wide as cpu-small's active MoE path
    (shared expert + one routed expert = 2 x 512), so active parameters match within the router."""
    return _cpu_small().replace(moe_layers=[], intermediate_size_mlp=1024)


def _scout() -> ModelConfig:
    """Llama 4 Scout (17B active, 16 experts, 109B total with vision; text model 107.8B)."""
    return ModelConfig(
        vocab_size=202048, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384,
        num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
        num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=1,
        max_position_embeddings=10485760, bos_token_id=200000, eos_token_id=[200001, 200007, 200008],
        pad_token_id=200018,
        rope_scaling={"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 1.0, "original_max_position_embeddings": 8192})


def _maverick() -> ModelConfig:
    """Llama 4 Maverick (17B active, 128 experts, about 400B total): dense and MoE layers alternate."""
    return _scout().replace(
        num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False,
        max_position_embeddings=1048576, rope_scaling=None)


def _behemoth() -> ModelConfig:
    """Llama 4 Behemoth, an ESTIMATE: Meta published 16 experts, 288B active and nearly 2T total.
    Scout's layout (every layer MoE, top-1 plus a shared expert, NoPE every 4th layer) with hidden
    16384, 96 layers, 128 query / 8 KV heads of 128 and experts 23552 wide (1.44 x hidden; Scout's
    are 1.6 x) gives about 284B active and 1.95T total, each within 2% of the published figures."""
    return _scout().replace(
        hidden_size=16384, intermediate_size=23552, intermediate_size_mlp=47104, num_hidden_layers=96,
        num_attention_heads=128, num_key_value_heads=8, head_dim=128)


_PRESET_BUILDERS = {"tiny": _tiny, "cpu-small": _cpu_small, "cpu-mini": _cpu_mini, "dense-small": _dense_small,
                    "scout-17b-16e": _scout, "maverick-17b-128e": _maverick, "behemoth-288b-16e": _behemoth}
PRESETS: tuple[str, ...] = tuple(_PRESET_BUILDERS)


def preset(name: str) -> ModelConfig:
    """A fresh ModelConfig for a named preset (see PRESETS)."""
    try:
        return _PRESET_BUILDERS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})") from None
