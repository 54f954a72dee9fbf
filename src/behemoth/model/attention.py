"""Grouped-query attention with Llama 4's iRoPE. RoPE layers rotate, apply an optional weightless
QK-norm after the rotation, and attend causally within chunks of `attention_chunk_size` only;
NoPE layers attend causally over everything, with optional temperature tuning that sharpens
queries at long absolute positions. Visibility comes from absolute positions, so one code path
serves a full forward and decoding against a `KVCache`.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from behemoth.config import ModelConfig
from behemoth.model.rope import apply_rotary


class KVCache(Protocol):
    """What attention needs from a per-layer cache."""

    def update(self, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Add this step's key/value [batch, kv_heads, new, head_dim] at absolute `positions`
        [batch, new]; return all keys, values and their positions [batch, keys] (-1 = empty slot)."""
        ...


def rms_normalize(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """RMS normalisation over the last dimension in float32 (float64 for float64 input), times `weight`."""
    if x.dtype == torch.float32 and (weight is None or weight.dtype == torch.float32):
        # One fused kernel instead of six small ones (they dominate a decode step); for float32
        # it is bitwise equal to the explicit formula below, gradients included.
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)
    return out if weight is None else out * weight


def visibility_mask(query_positions: torch.Tensor, key_positions: torch.Tensor,
                    chunk_size: int | None) -> torch.Tensor:
    """Boolean [batch, 1, queries, keys]: key at or before the query, in the same chunk if chunked."""
    q = query_positions[:, :, None]
    k = key_positions[:, None, :]
    # The first visible position per query (0, or its chunk's start), so the [queries, keys] grid
    # needs two comparisons; clamping keeps empty slots (-1) invisible to padding queries (-1).
    first = (q - q % chunk_size).clamp(min=0) if chunk_size is not None else 0
    return ((k <= q) & (k >= first))[:, None]


def temperature_scales(positions: torch.Tensor, floor_scale: int, attn_scale: float) -> torch.Tensor:
    """Query scale per absolute position: 1 + attn_scale * log1p(floor((pos + 1) / floor_scale))."""
    return 1.0 + attn_scale * torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale))


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.use_rope = config.uses_rope(layer_idx)
        self.chunk_size = config.chunk_size_for_layer(layer_idx)
        self.qk_norm_eps = config.rms_norm_eps if (config.use_qk_norm and self.use_rope) else None
        self.temperature_tuning = config.attn_temperature_tuning and not self.use_rope
        self.floor_scale = config.floor_scale
        self.attn_scale = config.attn_scale
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        # Optional: one module computing [q | k | v] at once, which an inference weight format may
        # install in place of the three projections (behemoth.inference.weights). Not in the state dict.
        self.qkv_proj: nn.Module | None = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor] | None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        """x [batch, seq, hidden]; positions [batch|1, seq] absolute; rope = (cos, sin) for them."""
        q, k, v = self.project(x, positions, rope)
        return self.o_proj(self.attend(q, k, v, positions, kv_cache))

    def project(self, x: torch.Tensor, positions: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries [batch, heads, seq, head_dim], keys and values [batch, kv_heads, seq, head_dim]:
        projected, then rotated and normalised (RoPE layers) or temperature-scaled (NoPE layers).
        A pure function of its inputs (no cache), so it can be compiled on its own."""
        batch, seq, _ = x.shape
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split([self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                                              self.num_kv_heads * self.head_dim], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(batch, seq, self.num_heads, self.head_dim)
        k = k.view(batch, seq, self.num_kv_heads, self.head_dim)
        v = v.reshape(batch, seq, self.num_kv_heads, self.head_dim)

        if self.use_rope:
            # Queries and keys rotated (and normalised) together: half the small kernels, which
            # is what a decode step of a small model spends its time on.
            qk = apply_rotary(torch.cat([q, k], dim=2), *rope)
            if self.qk_norm_eps is not None:
                qk = rms_normalize(qk, self.qk_norm_eps)
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=2)
        elif self.temperature_tuning:
            scales = temperature_scales(positions, self.floor_scale, self.attn_scale)
            q = (q * scales[:, :, None, None]).to(q.dtype)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               kv_cache: KVCache | None = None) -> torch.Tensor:
        """Attention of the projected q, k, v (through the cache, if any): [batch, seq, heads * head_dim],
        the input of o_proj."""
        batch, _, seq, _ = q.shape
        if kv_cache is not None:
            query_positions = positions.expand(batch, seq)
            k, v, key_positions = kv_cache.update(k, v, query_positions)
            mask = visibility_mask(query_positions, key_positions, self.chunk_size)
            if seq == 1:
                out = attend_one_query(q, k, v, mask)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        elif self.chunk_size is None or seq <= self.chunk_size and _starts_at_zero(positions):
            # Plain causal attention: the fast path of training and prefill.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            mask = visibility_mask(positions.expand(batch, seq), positions.expand(batch, seq), self.chunk_size)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)


def _starts_at_zero(positions: torch.Tensor) -> bool:
    """True when positions are 0..seq-1 (so chunk boundaries fall after the last query)."""
    return positions.shape[-1] == 0 or bool((positions[:, 0] == 0).all())


def attend_one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of one query per row (a decode step): q [batch, heads, 1, head_dim], k and v
    [batch, kv_heads, keys, head_dim], mask [batch, 1, 1, keys] -> [batch, heads, 1, head_dim].
    The heads sharing a key/value head are stacked as its queries, so the cache is read as it is
    (SDPA's grouped-query path copies it per query head, every layer and step). Scores in float32;
    a query that sees no key gets zeros, as from SDPA."""
    batch, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    queries = q.reshape(batch, kv_heads, heads // kv_heads, dim).float()
    scores = (queries @ k.float().transpose(-1, -2)) * dim ** -0.5
    weights = torch.where(mask, scores.masked_fill(~mask, float("-inf")).softmax(-1), 0.0)
    return (weights @ v.float()).to(v.dtype).view(batch, heads, 1, dim)
