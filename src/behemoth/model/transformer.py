"""The Llama 4 text transformer: embeddings, decoder blocks, final norm, LM head. Module and
parameter names follow `transformers`' `Llama4ForCausalLM`, so our state dict *is* a Hugging Face
checkpoint (`model.layers.3.feed_forward.experts.gate_up_proj`, ...).
"""

from __future__ import annotations

import torch
from torch import nn

from behemoth.config import ModelConfig
from behemoth.model.attention import Attention, KVCache, rms_normalize
from behemoth.model.moe import MLP, MoE, RouterOutput
from behemoth.model.rope import inverse_frequencies, rotation_angles


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_normalize(x, self.eps, self.weight)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.is_moe = config.is_moe_layer(layer_idx)
        self.self_attn = Attention(config, layer_idx)
        self.feed_forward = MoE(config) if self.is_moe else MLP(config.hidden_size, config.intermediate_size_mlp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                kv_cache: KVCache | None = None, router_outputs: list[RouterOutput] | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, rope, kv_cache)
        h = self.post_attention_layernorm(x)
        h = self.feed_forward(h, router_outputs) if self.is_moe else self.feed_forward(h)
        return x + h


class TextModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    """`model(input_ids [batch, seq])` -> logits [batch, seq, vocab]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = TextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.register_buffer("rope_inv_freq", inverse_frequencies(config), persistent=False)
        self.any_rope = any(config.uses_rope(i) for i in range(config.num_hidden_layers))

    def tie_weights(self) -> None:
        """Share the LM head with the input embedding when the config says so (again after
        `to_empty`, which gives every parameter its own storage)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_buffers(self) -> None:
        """Recompute derived buffers (after building on the meta device and `to_empty`)."""
        device = self.rope_inv_freq.device
        self.rope_inv_freq = inverse_frequencies(self.config).to(device)
        for layer in self.model.layers:
            if layer.is_moe:
                layer.feed_forward.selection_bias = torch.zeros_like(layer.feed_forward.selection_bias, device=device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                kv_caches: list[KVCache] | None = None,
                router_outputs: list[RouterOutput] | None = None) -> torch.Tensor:
        """Logits for every position. positions: absolute [batch|1, seq], default 0..seq-1; kv_caches:
        one `attention.KVCache` per layer; router_outputs: each MoE layer appends its RouterOutput."""
        return self.lm_head(self.hidden_states(input_ids, positions, kv_caches, router_outputs))

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      kv_caches: list[KVCache] | None = None,
                      router_outputs: list[RouterOutput] | None = None) -> torch.Tensor:
        """Final-norm hidden states [batch, seq, hidden] (the LM head's input)."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        rope = rotation_angles(positions, self.rope_inv_freq) if self.any_rope else None
        x = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            cache = kv_caches[i] if kv_caches is not None else None
            x = layer(x, positions, rope, cache, router_outputs)
        return self.model.norm(x)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the hidden states (projections may store their weights otherwise)."""
        return self.model.embed_tokens.weight.dtype


# The matrices that write into the residual stream: attention's and every MLP's output.
OUTPUT_PROJECTIONS = ("o_proj.weight", "down_proj.weight", "experts.down_proj")


@torch.no_grad()
def init_weights(model: Transformer, seed: int | None = None, zero_outputs: bool = False) -> None:
    """Normal(0, initializer_range) for matrices, ones for norms, as Llama 4 initialises. zero_outputs:
    OUTPUT_PROJECTIONS start at zero instead (modded-nanogpt's recipe), so every block starts as the
    identity; the random draws of the other matrices stay the same."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    std = model.config.initializer_range
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:  # drawn even when zeroed, so the other matrices get the same values either way
            values = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
            param.copy_(values.zero_() if zero_outputs and name.endswith(OUTPUT_PROJECTIONS) else values)
