"""Llama 4 mixture of experts: token-choice top-k routing, sparse routed experts, shared expert.

Routing as `transformers`' Llama4TextMoe computes it: float32 router logits without bias pick the
top-k experts; a picked expert's gate is sigmoid(its logit), not renormalised, and scales the
expert's *input*: expert(gate * x), not gate * expert(x); an always-on shared expert is added.
Unlike transformers, which runs every token through every expert and zeroes the unpicked ones,
tokens are sorted by expert and each expert runs one matmul over its own slice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from behemoth.config import ModelConfig
from behemoth.model.int8 import expert_product, stack_scales


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class RouterOutput:
    """What a MoE layer decided for one forward pass, for balance losses and telemetry."""

    logits: torch.Tensor  # [tokens, experts], float32
    expert_ids: torch.Tensor  # [tokens, top_k]
    gates: torch.Tensor  # [tokens, top_k], sigmoid of the picked logits


def route(logits: torch.Tensor, top_k: int, selection_bias: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick top-k experts per token: (expert_ids, gates), both [tokens, top_k]. `selection_bias`
    shifts which experts are picked, never the gates, which come from the raw logits."""
    scores_for_choice = logits if selection_bias is None else logits + selection_bias
    expert_ids = scores_for_choice.topk(top_k, dim=-1).indices
    gates = torch.sigmoid(logits.gather(-1, expert_ids))
    return expert_ids, gates


def sort_by_expert(x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor, num_experts: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lay the (token, pick) slots out grouped by expert, in expert order (token order within one):
    (routed_in [slots, hidden], each token scaled by its gate; token_of_slot [slots]; counts
    [num_experts])."""
    top_k = expert_ids.shape[-1]
    flat_ids = expert_ids.reshape(-1)
    order = flat_ids.argsort(stable=True)
    token_of_slot = order // top_k
    # A scatter rather than bincount: its output size is fixed, so a compiled program can count
    # (bincount's size depends on the data).
    counts = flat_ids.new_zeros(num_experts).scatter_add_(0, flat_ids, torch.ones_like(flat_ids))
    routed_in = x[token_of_slot] * gates.reshape(-1, 1)[order].to(x.dtype)
    return routed_in, token_of_slot, counts


# An optional term added to one expert's product: (expert, its input rows) -> rows to add. A LoRA
# adapter (model/lora.py) supplies one per stacked matrix: x @ A[e] @ B[e] * scale. Its module's
# `bind(tokens, token_of_slot, counts)` makes one per forward: the slots' tokens and the experts'
# counts let an adapter that differs per token (several adapters in one batch) find each row's own.
LowRankTerm = Callable[[int, torch.Tensor], torch.Tensor]


def grouped_experts(routed_in: torch.Tensor, counts: list[int], gate_up_proj: torch.Tensor,
                    down_proj: torch.Tensor, skip_empty: bool = True,
                    low_rank: tuple[LowRankTerm | None, LowRankTerm | None] = (None, None),
                    scales: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)) -> torch.Tensor:
    """SwiGLU expert e of `gate_up_proj` [E, hidden, 2I] and `down_proj` [E, I, hidden] applied to
    the e-th contiguous group of `routed_in` (sizes `counts`), plus the `low_rank` terms of the two
    products when given. With `scales`, a stack is int8 [E, out, in] (model/int8.py). With
    `skip_empty=False` an expert without tokens still takes part in the graph, so it gets a zero
    gradient rather than none."""
    # unbind, not indexing: the backward of W[e] would allocate (and zero) a full [E, ...]
    # gradient per expert; unbind's backward stacks the per-expert gradients once.
    per_expert = [t.unbind(0) if t is not None else [None] * len(counts)
                  for t in (gate_up_proj, down_proj, *scales)]
    outputs = []
    for expert, tokens in enumerate(routed_in.split(counts)):
        if skip_empty and tokens.shape[0] == 0:
            continue
        outputs.append(_expert(expert, tokens, *(weights[expert] for weights in per_expert), low_rank))
    if not outputs:
        return routed_in.new_zeros((0, routed_in.shape[-1]))  # experts map hidden to hidden
    return torch.cat(outputs)


def _expert(expert: int, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
            gate_up_scales: torch.Tensor | None, down_scales: torch.Tensor | None,
            low_rank: tuple[LowRankTerm | None, LowRankTerm | None]) -> torch.Tensor:
    """One SwiGLU expert on its rows `x`, with the optional low-rank terms of its two products (and
    the scales of its matrices, when they are int8)."""
    gate_up_term, down_term = low_rank
    projected = expert_product(x, gate_up, gate_up_scales)
    if gate_up_term is not None:
        projected = projected + gate_up_term(expert, x)
    gate, up = projected.chunk(2, dim=-1)
    hidden = F.silu(gate) * up
    out = expert_product(hidden, down, down_scales)
    return out if down_term is None else out + down_term(expert, hidden)


def combine(x: torch.Tensor, token_of_slot: torch.Tensor, routed_out: torch.Tensor) -> torch.Tensor:
    """Sum each token's expert outputs back into its row: [tokens, hidden]."""
    # routed_out's dtype, not x's: under autocast the expert matmuls produce bfloat16.
    return x.new_zeros(x.shape, dtype=routed_out.dtype).index_add_(0, token_of_slot, routed_out)


class Experts(nn.Module):
    """E SwiGLU experts stacked as in Hugging Face checkpoints: gate_up_proj [E, hidden, 2 * I]
    (gate first, used as x @ W) and down_proj [E, I, hidden]. The forward is three functions of
    this module, sort_by_expert -> grouped_experts -> combine, so that a wrapper (expert
    parallelism) can put its own transport between the first two."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, hidden_size, 2 * intermediate_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        # Optional low-rank adapters of the two stacks (model/lora.py installs them): modules with a
        # `bind(...)` that returns a LowRankTerm for one forward. Absent, the experts are plain Llama 4.
        # A frozen stack may also be held as int8 (model/int8.py), with a `<stack>_scales` buffer.
        self.lora_gate_up: nn.Module | None = None
        self.lora_down: nn.Module | None = None

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """x [tokens, hidden]; expert_ids, gates [tokens, top_k] -> summed expert outputs [tokens, hidden]."""
        if x.shape[0] == 1:
            return self._one_token(x, expert_ids[0], gates[0])
        routed_in, token_of_slot, counts = sort_by_expert(x, expert_ids, gates, self.num_experts)
        # The one host sync of the layer: slice sizes must be known to split the sorted tokens.
        counts_list = counts.tolist()
        routed_out = grouped_experts(routed_in, counts_list, self.gate_up_proj, self.down_proj,
                                     low_rank=self.low_rank_terms(x.shape[0], token_of_slot, counts_list),
                                     scales=stack_scales(self))
        return combine(x, token_of_slot, routed_out)

    def low_rank_terms(self, tokens: int = 1, token_of_slot: torch.Tensor | None = None,
                       counts: list[int] | None = None) -> tuple[LowRankTerm | None, LowRankTerm | None]:
        """The adapters' terms for this forward of `tokens` tokens (each binds its factors once, as the
        weights are unbound); no slots: a single token."""
        return tuple(None if lora is None else lora.bind(tokens, token_of_slot, counts)
                     for lora in (self.lora_gate_up, self.lora_down))

    def _one_token(self, x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """A single token (decoding one sequence): run its top-k experts directly, since sorting,
        counting and scattering would cost more than the experts. Summed in expert order, as
        the sorted path's index_add does, so both give the same bits."""
        out = None
        low_rank = self.low_rank_terms()
        gate_up_scales, down_scales = stack_scales(self)
        for expert, gate in sorted(zip(expert_ids.tolist(), gates.unbind())):
            weights = (self.gate_up_proj[expert], self.down_proj[expert],
                       None if gate_up_scales is None else gate_up_scales[expert],
                       None if down_scales is None else down_scales[expert])
            y = _expert(expert, x * gate.to(x.dtype), *weights, low_rank)
            out = y if out is None else out + y
        return out


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_local_experts
        self.router = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = Experts(config.num_local_experts, config.hidden_size, config.intermediate_size)
        self.shared_expert = MLP(config.hidden_size, config.intermediate_size)
        # Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert offset that steers which experts
        # training picks, never gate values; unused in eval mode, so the released model routes as
        # Llama 4 does. Not in the state dict (a Hugging Face checkpoint has no place for it).
        self.register_buffer("selection_bias", torch.zeros(config.num_local_experts), persistent=False)

    def forward(self, x: torch.Tensor, router_outputs: list[RouterOutput] | None = None) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        logits = self.router_logits(tokens)
        expert_ids, gates = route(logits, self.top_k, self.selection_bias if self.training else None)
        if router_outputs is not None:
            router_outputs.append(RouterOutput(logits, expert_ids, gates))
        out = self.shared_expert(tokens) + self.experts(tokens, expert_ids, gates)
        return out.view(shape)

    def router_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Float32 router logits [tokens, experts]. The router's weight is read directly (not through
        its forward, which would compute in the tokens' dtype), so an adapter on the router (a LoRA
        module's `lora_term`, model/lora.py) is added here, or it would be silently ignored."""
        logits = F.linear(tokens.float(), self.router.weight.float())
        lora_term = getattr(self.router, "lora_term", None)
        return logits if lora_term is None else logits + lora_term(tokens.float()).float()
