"""Model size and compute, by arithmetic on the config: no weights are allocated.

As the published Llama 4 figures count: active parameters are everything a token touches, embedding
and LM head included, routed experts `num_experts_per_tok` times per MoE layer. Forward FLOPs per token
are 2 per active matmul weight (the embedding lookup is free, the LM head is not), plus attention
scores and values over the keys a query actually sees (chunked layers see less).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from behemoth.config import ModelConfig


@dataclass
class ModelSize:
    total_params: int
    active_params: int
    embedding_params: int  # input embedding (+ LM head when untied)
    expert_params: int  # all routed experts, all layers
    num_moe_layers: int
    num_dense_layers: int
    num_nope_layers: int
    matmul_flops_per_token: int  # forward, weights only
    attention_flops_per_token: float  # forward, QK^T and AV, at seq_len
    flops_per_token: float  # forward total at seq_len
    seq_len: int

    def as_dict(self) -> dict:
        return asdict(self)


def attention_params(c: ModelConfig) -> int:
    """Parameters of one attention block's projections (q, k, v, o and their biases)."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    bias = q + 2 * kv + c.hidden_size if c.attention_bias else 0
    return c.hidden_size * (q + 2 * kv) + q * c.hidden_size + bias


def mean_visible_keys(seq_len: int, chunk_size: int | None) -> float:
    """Mean number of keys per query under causal attention, restricted to chunks if given."""
    if chunk_size is None or chunk_size >= seq_len:
        return (seq_len + 1) / 2
    full_chunks, rest = divmod(seq_len, chunk_size)
    visible = full_chunks * chunk_size * (chunk_size + 1) / 2 + rest * (rest + 1) / 2
    return visible / seq_len


def model_size(config: ModelConfig, seq_len: int | None = None) -> ModelSize:
    """Parameter counts and forward FLOPs per token at `seq_len` (default 2048, capped at the context)."""
    c = config
    seq_len = seq_len or min(2048, c.max_position_embeddings)
    expert = 3 * c.hidden_size * c.intermediate_size
    norms = 2 * c.hidden_size
    embedding = c.vocab_size * c.hidden_size
    lm_head = 0 if c.tie_word_embeddings else embedding
    num_moe = len(c.moe_layers)
    num_dense = c.num_hidden_layers - num_moe
    dense_mlp = 3 * c.hidden_size * c.intermediate_size_mlp
    router = c.hidden_size * c.num_local_experts
    # What every token touches (the shared expert and the final norm included); then the routed experts:
    # all of them in the total, the picked ones in the active count.
    common = (c.num_hidden_layers * (attention_params(c) + norms) + num_dense * dense_mlp
              + num_moe * (router + expert) + embedding + lm_head + c.hidden_size)
    experts = num_moe * c.num_local_experts * expert
    total, active = common + experts, common + num_moe * c.num_experts_per_tok * expert

    # Matmul weights a token multiplies by: all active parameters except norms and the lookup table.
    matmul_weights = active - embedding - c.num_hidden_layers * norms - c.hidden_size
    if c.tie_word_embeddings:
        matmul_weights += embedding  # the tied LM head is still a matmul
    if c.attention_bias:
        matmul_weights -= c.num_hidden_layers * (c.num_attention_heads * c.head_dim
                                                 + 2 * c.num_key_value_heads * c.head_dim + c.hidden_size)
    attention_flops = sum(
        4 * c.num_attention_heads * c.head_dim * mean_visible_keys(seq_len, c.chunk_size_for_layer(i))
        for i in range(c.num_hidden_layers))
    return ModelSize(
        total_params=total, active_params=active, embedding_params=embedding + lm_head,
        expert_params=experts, num_moe_layers=num_moe, num_dense_layers=num_dense,
        num_nope_layers=sum(1 for v in c.no_rope_layers[:c.num_hidden_layers] if not v),
        matmul_flops_per_token=2 * matmul_weights, attention_flops_per_token=attention_flops,
        flops_per_token=2 * matmul_weights + attention_flops, seq_len=seq_len)


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def describe(name: str, config: ModelConfig, size: ModelSize) -> str:
    """A short human-readable summary for `behemoth info`."""
    c = config
    rows = [
        f"{name}",
        f"  total parameters     {human(size.total_params):>8}  ({size.total_params:,})",
        f"  active parameters    {human(size.active_params):>8}  ({size.active_params:,})",
        f"  forward FLOPs/token  {human(size.flops_per_token):>8}  (at seq len {size.seq_len:,}; "
        f"training ~3x)",
        f"  layers               {c.num_hidden_layers} ({size.num_moe_layers} MoE, {size.num_dense_layers} dense; "
        f"{size.num_nope_layers} NoPE global-attention)",
        f"  width                hidden {c.hidden_size}, heads {c.num_attention_heads}/{c.num_key_value_heads} kv "
        f"x {c.head_dim}, expert {c.intermediate_size}, dense MLP {c.intermediate_size_mlp}",
    ]
    if size.num_moe_layers:
        rows.append(f"  experts              {c.num_local_experts} routed (top-{c.num_experts_per_tok}) + 1 shared")
    rows.append(f"  vocabulary           {c.vocab_size:,}" + (" (tied embeddings)" if c.tie_word_embeddings else ""))
    return "\n".join(rows)
