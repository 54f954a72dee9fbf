"""LoRA helpers shared by the adapter tests: factors that compute something, and saving an adapter."""

from __future__ import annotations

from pathlib import Path

import torch

from behemoth.lora_files import AdapterInfo, save_adapter
from behemoth.model.lora import adapter_modules, lora_state_dict
from behemoth.train.config import LoraConfig


def randomise_adapters(model, seed: int = 1, std: float = 0.05, b_only: bool = True) -> None:
    """B is zero at the start: give it (and, unless `b_only`, A) random values, so the adapters act."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in lora_state_dict(model).items():
            if not b_only or name.endswith("lora_B.weight"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)


def save_adapted(model, path: Path, settings: LoraConfig, base_model: str, base_hash: str | None) -> Path:
    """The adapters `settings` put on `model`, saved as an adapter directory."""
    info = AdapterInfo(settings.rank, settings.alpha, settings.use_rslora, settings.dropout, list(settings.targets),
                       list(adapter_modules(model)), base_model, base_hash)
    return save_adapter(model, path, info)
