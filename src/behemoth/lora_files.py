"""LoRA adapter directories in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`
with transformers' module names, so `peft.PeftModel.from_pretrained(Llama4ForCausalLM..., DIR)` runs
what we trained, and adapters PEFT trained for this architecture load here.

Routed experts are PEFT `target_parameters` on the stacks `experts.gate_up_proj` [E, H, 2I] and
`experts.down_proj` [E, I, H], used as x @ W[e]. PEFT keeps one stack's factors as two matrices with
the experts packed into the rank, and PEFT 0.19.1 changed that packing for stacks stored (E, in, out):
- before 0.19.1: lora_A [E*r, in] (expert-major), lora_B [out, r*E] (expert-minor); delta[e] = A_e^T B_e^T
- since 0.19.1:  lora_A [E*r, out] (expert-major), lora_B [in, r*E] (expert-minor); delta[e] = B_e A_e
where A_e = lora_A.reshape(E, r, -1)[e] and B_e = lora_B.reshape(-1, r, E)[..., e]. Our ExpertLoRA
holds A [E, in, r] and B [E, r, out] (delta[e] = A[e] B[e]). We write the newer layout; reading takes
the layout from the config's `peft_version` (none: before 0.18, the older), or from the shapes for a
development build, and refuses an adapter whose shapes fit both. When one experts module adapts both
stacks, PEFT nests two wrappers, gate_up_proj inside (`experts.base_layer.lora_*`), down_proj outside
(`experts.lora_*`); reading matches pairs to stacks by shape, not by place.

What PEFT's config has no key for (our target list, the base's checksum, the training dropout) sits in
the safetensors header's metadata under "behemoth".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from behemoth.checkpoint import read_safetensors_header, replace_directory, save_safetensors
from behemoth.durable import fsync_tree, staging_folder
from behemoth.errors import CheckpointError, ConfigError
from behemoth.model import Transformer
from behemoth.model.lora import (ExpertLoRA, RowAdapters, adapter_modules, apply_lora, attach_adapter_bank,
                                 base_state_dict, factor_shapes, load_lora_state_dict, lora_sites, scale_of)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
WRITTEN_PEFT_VERSION = "0.22.0"  # the layout we write is that of PEFT >= 0.19.1; tested against 0.22
NEW_LAYOUT_SINCE = (0, 19, 1)
# PEFT settings we cannot honour: reading an adapter that uses one is refused, naming the key
UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "lora_bias": False, "rank_pattern": {},
               "alpha_pattern": {}, "modules_to_save": None, "layers_to_transform": None}


@dataclass
class AdapterInfo:
    """An adapter's settings and the base it was trained on."""

    rank: int
    alpha: float
    use_rslora: bool
    dropout: float
    targets: list[str]  # as configured
    modules: list[str]  # the adapted weights' names (model.lora's site names)
    base_model: str  # where the base came from (a model directory, or how it was made)
    base_sha256: str | None  # `base_sha256` of the base's weights; None for an adapter made elsewhere
    base_weights: str = "float32"  # how the base was held while training: "float32", or "int8" (model/int8.py)

    def peft_config(self) -> dict[str, Any]:
        stacks = [m for m in self.modules if ".experts." in m]
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "peft_version": WRITTEN_PEFT_VERSION,
                "base_model_name_or_path": self.base_model, "r": self.rank, "lora_alpha": self.alpha,
                "use_rslora": self.use_rslora, "bias": "none", "init_lora_weights": True,
                # PEFT refuses dropout on parameter targets; it is a training setting, kept in our metadata
                "lora_dropout": 0.0 if stacks else self.dropout,
                "target_modules": [m for m in self.modules if m not in stacks], "target_parameters": stacks,
                "inference_mode": True}

    def metadata(self) -> dict[str, str]:
        ours = {"targets": self.targets, "base_sha256": self.base_sha256, "dropout": self.dropout,
                "base_weights": self.base_weights}
        return {"format": "pt", "behemoth": json.dumps(ours)}


def base_sha256(model: Transformer) -> str:
    """SHA-256 over the base weights' names and float32 values (adapters left out): the base's
    identity whatever dtype it was stored or trained in."""
    digest = hashlib.sha256()
    for name, tensor in sorted(base_state_dict(model).items()):
        digest.update(f"{name}\0{list(tensor.shape)}\n".encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


# -- our tensors <-> PEFT's ------------------------------------------------------------------------

def peft_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """The adapters of `model` under PEFT's names and layouts (module notes)."""
    modules = adapter_modules(model)
    tensors = {}
    for site, module in modules.items():
        if isinstance(module, ExpertLoRA):
            owner, _, stack = site.rpartition(".")
            inner = stack == "gate_up_proj" and f"{owner}.down_proj" in modules
            key = owner + (".base_layer" if inner else "")
            experts, fan_in, rank = module.lora_A.shape
            a = module.lora_B.reshape(experts * rank, -1)
            b = module.lora_A.permute(1, 2, 0).reshape(fan_in, rank * experts)
        else:
            key, a, b = site, module.lora_A.weight, module.lora_B.weight
        tensors[f"{PEFT_PREFIX}{key}.lora_A.weight"] = a.detach().to("cpu").contiguous()
        tensors[f"{PEFT_PREFIX}{key}.lora_B.weight"] = b.detach().to("cpu").contiguous()
    return tensors


def _unpack_experts(a: torch.Tensor, b: torch.Tensor, stack: torch.Tensor, rank: int,
                    new_layout: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Our (A [E, in, r], B [E, r, out]) from PEFT's pair for `stack` [E, in, out] in one layout, or
    None when the shapes do not fit that layout."""
    experts, fan_in, fan_out = stack.shape
    if new_layout and a.shape == (experts * rank, fan_out) and b.shape == (fan_in, rank * experts):
        return b.reshape(fan_in, rank, experts).permute(2, 0, 1), a.reshape(experts, rank, fan_out)
    if not new_layout and a.shape == (experts * rank, fan_in) and b.shape == (fan_out, rank * experts):
        return a.reshape(experts, rank, fan_in).transpose(1, 2), b.reshape(fan_out, rank, experts).permute(2, 1, 0)
    return None


def our_tensors(model: Transformer, tensors: dict[str, torch.Tensor], rank: int, layouts: tuple[bool, ...],
                source: str) -> dict[str, torch.Tensor]:
    """PEFT's adapter tensors -> model.lora's names and layouts, for `model` (the base's shapes);
    `layouts` holds the expert layouts the version allows (True: since 0.19.1)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        found = re.fullmatch(rf"{re.escape(PEFT_PREFIX)}(.+)\.lora_([AB])\.weight", name)
        if not found:
            raise CheckpointError(f"{source}: tensor {name!r} is not a PEFT LoRA tensor of a causal LM "
                                  f"({PEFT_PREFIX}<module>.lora_A.weight / .lora_B.weight)")
        pairs.setdefault(found.group(1), {})[found.group(2)] = tensor
    ours: dict[str, torch.Tensor] = {}
    for key, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise CheckpointError(f"{source}: {key} has lora_{next(iter(pair))} without its other factor")
        owner = key.replace(".base_layer", "")
        if not owner.endswith(".experts"):
            ours[f"{owner}.lora_A.weight"], ours[f"{owner}.lora_B.weight"] = pair["A"], pair["B"]
            continue
        site, a, b = _expert_pair(model, owner, pair["A"], pair["B"], rank, layouts, source)
        if f"{site}.lora_A.weight" in ours:
            raise CheckpointError(f"{source}: two adapters in {owner} fit {site.rpartition('.')[2]}")
        ours[f"{site}.lora_A.weight"], ours[f"{site}.lora_B.weight"] = a, b
    return ours


def _expert_pair(model: Transformer, owner: str, a: torch.Tensor, b: torch.Tensor, rank: int,
                 layouts: tuple[bool, ...], source: str) -> tuple[str, torch.Tensor, torch.Tensor]:
    try:
        experts = model.get_submodule(owner)
    except AttributeError:
        raise ConfigError(f"{source}: {owner} is no experts module of this model") from None
    fits = [(f"{owner}.{stack}", factors) for stack in ("gate_up_proj", "down_proj") for new in layouts
            if (factors := _unpack_experts(a, b, getattr(experts, stack), rank, new)) is not None]
    shapes = f"the adapter of {owner} (lora_A {list(a.shape)}, lora_B {list(b.shape)})"
    if not fits:
        raise ConfigError(f"{source}: {shapes} fits no expert stack of this model")
    if len(fits) > 1:
        raise CheckpointError(f"{source}: {shapes} fits both PEFT expert layouts (before and since 0.19.1) "
                              f"and its peft_version does not say which; set peft_version in {ADAPTER_CONFIG}")
    site, (ours_a, ours_b) = fits[0]
    return site, ours_a, ours_b


def expert_layouts(peft_version: str | None) -> tuple[bool, ...]:
    """The expert layouts an adapter saved by PEFT `peft_version` can have (True: since 0.19.1)."""
    if peft_version is None:
        return (False,)  # PEFT writes its version since 0.18: before that, the older layout
    release = re.match(r"(\d+)\.(\d+)\.(\d+)", peft_version)
    if not release:
        return (False, True)
    numbers = tuple(int(part) for part in release.groups())
    if numbers == NEW_LAYOUT_SINCE and peft_version[release.end():release.end() + 1] not in ("", "@"):
        return (False, True)  # a development build of 0.19.1: either side of the change
    return (numbers >= NEW_LAYOUT_SINCE,)


# -- directories ------------------------------------------------------------------------------------

def write_adapter_files(model: Transformer, directory: Path, info: AdapterInfo) -> None:
    """The adapters of `model` and their config into an existing directory, in PEFT's format."""
    save_safetensors(peft_tensors(model), directory / ADAPTER_WEIGHTS, metadata=info.metadata())
    (directory / ADAPTER_CONFIG).write_text(json.dumps(info.peft_config(), indent=2) + "\n")


def save_adapter(model: Transformer, path: str | Path, info: AdapterInfo) -> Path:
    """An adapter directory, assembled in a temporary sibling and renamed into place."""
    target = Path(path)
    with staging_folder(target) as staging:
        write_adapter_files(model, staging, info)
        fsync_tree(staging)
        replace_directory(staging, target)
    return target


def _read_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """An adapter directory's PEFT config, our metadata and its (PEFT-named) tensors, every file
    checked before any tensor data is read."""
    directory = Path(path)
    config_file, weights = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for file in (config_file, weights):
        if not file.is_file():
            raise CheckpointError(f"{directory}: no {file.name} (not an adapter directory)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_file}: not valid JSON ({err})") from None
    _check_peft_config(config, config_file)
    read_safetensors_header(weights)
    try:
        with safe_open(str(weights), framework="pt") as reader:
            ours = json.loads((reader.metadata() or {}).get("behemoth", "{}"))
            tensors = {key: reader.get_tensor(key) for key in reader.keys()}
    except (SafetensorError, OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{weights}: cannot be read ({err})") from None
    return config, ours, tensors


def _check_peft_config(config: Any, where: Path) -> None:
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise CheckpointError(f"{where}: not a PEFT LoRA config (peft_type must be \"LORA\")")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool) or config[key] <= 0:
            raise CheckpointError(f"{where}: {key} must be a positive number, got {config.get(key)!r}")
    for key, plain in UNSUPPORTED.items():
        if config.get(key, plain) not in (plain, None, {}, False):
            raise CheckpointError(f"{where}: {key} = {config[key]!r} is not supported here (only plain LoRA)")
    if config.get("bias", "none") != "none":
        raise CheckpointError(f"{where}: bias = {config['bias']!r} is not supported here (only \"none\")")


def load_adapter_into(model: Transformer, path: str | Path, expected_base: str | None = None,
                      attach: bool = False) -> AdapterInfo:
    """Fill the adapters of `model` from an adapter directory, ours or PEFT's (with `attach`, first
    give `model` the adapters the directory holds); with `expected_base`, refuse one trained on
    another base (an adapter made elsewhere names none, and is taken on trust)."""
    info, named = _read_for(model, path)
    _check_base(path, info, expected_base)
    try:
        if attach:
            apply_lora(model, dataclasses.replace(info, targets=info.modules, dropout=0.0))
        load_lora_state_dict(model, named, source=str(Path(path) / ADAPTER_WEIGHTS))
    except ConfigError as err:
        raise CheckpointError(f"{path}: does not fit the base ({err})") from None
    return info


def attach_adapter_dirs(model: Transformer, adapters: dict[str, str | Path]) -> RowAdapters:
    """Several adapter directories over the plain base `model` at once, each batch row choosing its
    own (`model.lora.attach_adapter_bank`); each is checked against the base as `load_adapter_into`."""
    base: str | None = None  # the base's checksum, computed once and only if an adapter names one
    banks = {}
    for name, path in adapters.items():
        info, named = _read_for(model, path)
        if info.base_sha256 is not None:
            base = base or base_sha256(model)
            _check_base(path, info, base)
        _check_shapes(model, named, info.rank, Path(path) / ADAPTER_WEIGHTS)
        banks[name] = (named, scale_of(info))
    return attach_adapter_bank(model, banks)


def _read_for(model: Transformer, path: str | Path) -> tuple[AdapterInfo, dict[str, torch.Tensor]]:
    """An adapter directory's settings and its tensors in model.lora's names, for `model`'s shapes."""
    config, ours, tensors = _read_adapter(path)
    try:
        named = our_tensors(model, tensors, config["r"], expert_layouts(config.get("peft_version")),
                            str(Path(path) / ADAPTER_WEIGHTS))
    except ConfigError as err:
        raise CheckpointError(f"{path}: does not fit the base ({err})") from None
    modules = [site.name for site in lora_sites(model) if f"{site.name}.lora_A.weight" in named]
    info = AdapterInfo(config["r"], config["lora_alpha"], bool(config.get("use_rslora", False)),
                       ours.get("dropout", config.get("lora_dropout", 0.0)), ours.get("targets", modules),
                       modules, config.get("base_model_name_or_path") or "unknown", ours.get("base_sha256"),
                       ours.get("base_weights", "float32"))
    return info, named


def _check_base(path: str | Path, info: AdapterInfo, expected: str | None) -> None:
    if expected is not None and info.base_sha256 not in (None, expected):
        raise CheckpointError(f"{path}: was trained on another base (sha256 {info.base_sha256[:12]}..., "
                              f"from {info.base_model}); this base is {expected[:12]}...")


def _check_shapes(model: Transformer, named: dict[str, torch.Tensor], rank: int, source: Path) -> None:
    """Each factor fits the base weight it adapts (what `load_lora_state_dict` checks when adapters
    are attached one at a time)."""
    sites = {site.name: site for site in lora_sites(model)}
    for name, tensor in named.items():
        site_name, _, factor = name.rpartition(".lora_")
        if site_name not in sites:
            raise CheckpointError(f"{source}: tensor {name!r} has no place in this model")
        a_shape, b_shape = factor_shapes(sites[site_name], rank)
        want = a_shape if factor == "A.weight" else b_shape
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {list(tensor.shape)}, this base "
                                  f"needs {list(want)}")
