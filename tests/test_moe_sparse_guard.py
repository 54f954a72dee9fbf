"""Regression guard: a MoE layer runs each token through its top-k experts only (issue #9, item 4).

Not a timing: the FLOPs of every matrix product the layer runs are counted (torch's
FlopCounterMode sees each aten matmul, whichever Python code issues it, forward and backward),
and must equal exactly those of the router, the shared expert, and tokens x top-k rows through
the routed experts. Fewer would mean a matmul the counter cannot see; more, work spent on
experts a token did not pick. A dense implementation (every token through every expert with the
unpicked outputs zeroed, as transformers' Llama4TextMoe does) gives the same output and is shown
to fail the check.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from behemoth.config import preset
from behemoth.model.moe import MoE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXPERTS = 8
CONFIG = preset("tiny").replace(hidden_size=32, intermediate_size=48, num_local_experts=EXPERTS)
TOKENS = [1, 2, 5, 64, 300]  # 1 takes the single-token decode path
TOP_K = [1, 2, 3]


def grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """torch._grouped_mm, which FlopCounterMode does not know: a grouped expert GEMM is a
    legitimate sparse implementation and must count as one. With two 2-D operands the groups
    split the inner dimension (a weight gradient); otherwise each output element is a dot
    product over the last dimension of `a`."""
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    return 2 * math.prod(out_shape) * a_shape[-1]


def counted_flops(moe: MoE, tokens: int, train: bool) -> int:
    """Matmul FLOPs of one forward (eval, no grad) or forward + backward (training, with the input
    gradient, as inside a network) of `moe` on `tokens` random tokens."""
    generator = torch.Generator().manual_seed(tokens)
    x = torch.randn(1, tokens, CONFIG.hidden_size, generator=generator, requires_grad=train)
    moe.train(train)
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten._grouped_mm: grouped_mm_flops})
    with counter, torch.set_grad_enabled(train):
        out = moe(x)
        if train:
            out.backward(torch.randn(out.shape, generator=generator))
    return counter.get_total_flops()


def expected_flops(tokens: int, expert_rows: int, train: bool) -> int:
    """Router [hidden -> E], shared SwiGLU expert for every token, and `expert_rows` rows through
    a routed SwiGLU expert (gate_up [hidden -> 2I], down [I -> hidden]). In training every matmul
    has both operands needing gradients, so its backward costs two more of the same size."""
    h, i = CONFIG.hidden_size, CONFIG.intermediate_size
    forward = 2 * tokens * h * EXPERTS + 3 * 2 * tokens * h * i + 3 * 2 * expert_rows * h * i
    return forward * (3 if train else 1)


def assert_sparse(moe: MoE, tokens: int, train: bool) -> None:
    counted = counted_flops(moe, tokens, train)
    expected = expected_flops(tokens, tokens * moe.top_k, train)
    per_row = expected_flops(tokens, 1, train) - expected_flops(tokens, 0, train)
    rows = (counted - expected_flops(tokens, 0, train)) / per_row
    assert counted == expected, (f"{'training' if train else 'eval'}, {tokens} tokens, top-{moe.top_k}: the "
                                 f"matmuls amount to {rows:g} expert rows, not tokens x top-k = "
                                 f"{tokens * moe.top_k}")


def moe_layer(top_k: int) -> MoE:
    torch.manual_seed(top_k)
    moe = MoE(CONFIG.replace(num_experts_per_tok=top_k))
    for param in moe.parameters():
        torch.nn.init.normal_(param, std=0.2)  # spread-out router logits: every expert gets tokens
    return moe


@pytest.mark.parametrize("train", [False, True], ids=["eval", "training"])
@pytest.mark.parametrize("top_k", TOP_K)
@pytest.mark.parametrize("tokens", TOKENS)
def test_moe_computes_only_the_picked_experts(tokens, top_k, train) -> None:
    assert_sparse(moe_layer(top_k), tokens, train)


# ------------------------------------------------------------------------------------------------
# The guard catches a dense implementation, and accepts a grouped GEMM
# ------------------------------------------------------------------------------------------------

def dense_experts(experts, x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Every token through every expert, the input scaled by the gate (0 for an unpicked expert,
    whose output is then exactly 0): transformers' Llama4TextMoe."""
    scores = torch.zeros(x.shape[0], experts.num_experts, dtype=x.dtype).scatter(1, expert_ids, gates.to(x.dtype))
    routed_in = x[None] * scores.T[..., None]  # [E, tokens, hidden]
    gate, up = torch.bmm(routed_in, experts.gate_up_proj).chunk(2, dim=-1)
    return torch.bmm(F.silu(gate) * up, experts.down_proj).sum(0)


def grouped_experts(experts, x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """The picked experts only, through torch._grouped_mm (one call for all experts)."""
    flat = expert_ids.reshape(-1)
    order = flat.argsort(stable=True)
    token_of_slot = order // expert_ids.shape[-1]
    routed_in = x[token_of_slot] * gates.reshape(-1, 1)[order].to(x.dtype)
    offsets = torch.bincount(flat, minlength=experts.num_experts).cumsum(0).to(torch.int32)
    gate, up = torch._grouped_mm(routed_in, experts.gate_up_proj, offs=offsets).chunk(2, dim=-1)
    out = torch._grouped_mm((F.silu(gate) * up).contiguous(), experts.down_proj, offs=offsets)
    return torch.zeros_like(x).index_add_(0, token_of_slot, out)


def replaced(top_k: int, forward) -> tuple[MoE, MoE]:
    """The layer as it is, and the same weights with its experts computed by `forward`."""
    moe, other = moe_layer(top_k), moe_layer(top_k)
    other.experts.forward = lambda x, ids, gates: forward(other.experts, x, ids, gates)
    return moe, other


@pytest.mark.parametrize("top_k", [1, 2])
def test_a_dense_implementation_fails_the_guard(top_k) -> None:
    moe, dense = replaced(top_k, dense_experts)
    x = torch.randn(1, 40, CONFIG.hidden_size)
    with torch.no_grad():  # the same function: only the work differs
        torch.testing.assert_close(dense.eval()(x), moe.eval()(x), rtol=1e-5, atol=1e-6)
    for train in (False, True):
        assert counted_flops(dense, 40, train) == expected_flops(40, 40 * EXPERTS, train)
        with pytest.raises(AssertionError, match=f"amount to {40 * EXPERTS} expert rows"):
            assert_sparse(dense, 40, train)


def grouped_mm_available() -> bool:
    """torch._grouped_mm runs on CPU only in recent torch releases (pyproject allows older ones)."""
    try:
        torch._grouped_mm(torch.ones(4, 8), torch.ones(2, 8, 8), offs=torch.tensor([2, 4], dtype=torch.int32))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.skipif(not grouped_mm_available(), reason="torch._grouped_mm does not run on this CPU build")
@pytest.mark.parametrize("train", [False, True], ids=["eval", "training"])
def test_a_grouped_gemm_implementation_passes_the_guard(train) -> None:
    moe, grouped = replaced(2, grouped_experts)
    x = torch.randn(1, 40, CONFIG.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(grouped.eval()(x), moe.eval()(x), rtol=1e-5, atol=1e-6)
    assert_sparse(grouped, 40, train)
