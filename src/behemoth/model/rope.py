"""Rotary position embedding, Llama 4 flavour: *interleaved pairs* (dimensions 0-1, 2-3, ...) rotate
as complex numbers, not the two halves of the head as Llama 2/3 in transformers. The complex
product is written out in real arithmetic so it runs under torch.compile and on any backend.
"""

from __future__ import annotations

import math

import torch

from behemoth.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """Per-pair rotation speeds (float32, [head_dim // 2]), with llama3 scaling if configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if config.rope_type == "llama3":
        inv_freq = _llama3_scaled(inv_freq, config.rope_scaling or {})
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 long-context scaling: slow down low frequencies by `factor`, keep high ones,
    and blend smoothly in between (by wavelength relative to the original context)."""
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    original_context = float(scaling["original_max_position_embeddings"])

    wavelength = 2 * math.pi / inv_freq
    long_wavelength = original_context / low_freq_factor
    short_wavelength = original_context / high_freq_factor

    scaled = torch.where(wavelength > long_wavelength, inv_freq / factor, inv_freq)
    if high_freq_factor != low_freq_factor:
        blend = (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
        blended = (1 - blend) * scaled / factor + blend * scaled
        in_between = (wavelength >= short_wavelength) & (wavelength <= long_wavelength)
        scaled = torch.where(in_between, blended, scaled)
    return scaled


def rotation_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation of every position for `apply_rotary`: (cos, signed sin), float32, [*positions.shape,
    1, head_dim], each pair's angle repeated for both its dimensions, the first sine negated: (cos a,
    cos a) and (-sin a, sin a). Computed once per forward for every RoPE layer."""
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    cos, sin = angles.cos(), angles.sin()
    return (torch.stack((cos, cos), dim=-1).flatten(-2)[..., None, :],
            torch.stack((-sin, sin), dim=-1).flatten(-2)[..., None, :])


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [batch, seq, heads, head_dim] by `rotation_angles` [batch|1, seq, 1, head_dim].

    Pair (a, b) becomes (a cos - b sin, b cos + a sin): x * cos + (x with each pair swapped) * signed
    sin. Bit for bit the complex product written out (negating is exact, adding commutes)."""
    x32 = x.float()
    swapped = x32.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return (x32 * cos + swapped * sin).type_as(x)
