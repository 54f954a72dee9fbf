"""Frozen int8 weights inside the model's own modules: the base of a LoRA run held as int8
(QLoRA-style, `lora.base_weights = "int8"`) and the int8 base under served adapters.

A frozen matrix W [out, in] is stored as int8 values with one scale per output row (`quantize_rows`,
the same numbers as the serving format of inference/weights.py), in the module's own attribute
(`weight`, or an expert stack's `gate_up_proj` / `down_proj`) beside a buffer `<name>_scales`.
Products dequantise one matrix at a time, in the input's dtype (bfloat16 under autocast), and their
backward gives the input's gradient only: autograd keeps the int8 matrix, never a float copy, so
a frozen base costs 1 byte per weight through a training step instead of 4. Expert stacks, used
as x @ W[e] with W [E, in, out], are stored transposed [E, out, in], each matrix as a Linear's.

Embeddings, norms, the router and the LM head stay as trained, as in the serving format.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # model.moe builds on this module
    from behemoth.model.transformer import Transformer

SCALES = "_scales"  # suffix of a quantised tensor's scales buffer
KERNEL_BLOCK = 16  # the int8 kernel reads its input in blocks of 16: other widths give wrong results
KERNEL_ROWS = 32  # from this many rows on (prompts), the dequantised product is faster (bench/decode_kernels.py)
EXPERT_STACKS = ("gate_up_proj", "down_proj")


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row (output channel) of weight [..., out, in]: (int8 values, scales [..., out]),
    rounded against the bfloat16 scale the int8 kernel takes, so the error is at most half a step."""
    weight = weight.detach().float()
    scales = (weight.abs().amax(dim=-1) / 127).clamp(min=torch.finfo(torch.bfloat16).tiny).to(torch.bfloat16)
    values = (weight / scales.float()[..., None]).round().clamp(-127, 127).to(torch.int8)
    return values.contiguous(), scales.contiguous()


def dequantize_rows(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 matrix [..., out, in] that int8 `values` with row `scales` stand for."""
    return values.float() * scales.float()[..., None]


class _Int8Product(torch.autograd.Function):
    """x @ W^T for an int8 W, differentiable in x only; saves the int8 matrix, not a float copy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(values, scales)
        device = x.device.type  # under autocast, in its dtype as any Linear (int8 casts exactly)
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        out = F.linear(x.to(dtype), values.to(dtype))
        return out * scales.to(dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        values, scales = ctx.saved_tensors
        return (grad * scales.to(grad.dtype)) @ values.to(grad.dtype), None, None


def int8_linear(x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] times the int8 matrix `values` [out, in] with row `scales`, plus `bias`: [..., out].
    Under no_grad, a few rows on a CPU (decoding) take torch's int8 weight-only kernel, in bfloat16."""
    if _decode_kernel_fits(x, values):
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
        out = torch.ops.aten._weight_int8pack_mm(rows, values, scales).to(x.dtype).view(*x.shape[:-1], -1)
    else:
        out = _Int8Product.apply(x, values, scales)
    return out if bias is None else out + bias.to(out.dtype)


def _decode_kernel_fits(x: torch.Tensor, values: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and not torch.is_grad_enabled()
            and x.numel() < KERNEL_ROWS * x.shape[-1] and values.shape[-1] % KERNEL_BLOCK == 0
            and hasattr(torch.ops.aten, "_weight_int8pack_mm"))


class FrozenLinear(nn.Linear):
    """A Linear whose weight may be held as int8 (`quantize_`): then `weight` is an int8 buffer beside
    `weight_scales`. LoRA's modules (model/lora.py) build on it, so an adapter can sit on an int8 base."""

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        scales = getattr(self, "weight" + SCALES, None)
        if scales is None:
            return F.linear(x, self.weight, self.bias)
        return int8_linear(x, self.weight, scales, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_forward(x)

    def __init__(self, base: nn.Linear):
        """A FrozenLinear sharing `base`'s weight and bias (and their int8 scales, if any) under the
        same names, so a state dict still finds every base tensor where it was."""
        nn.Module.__init__(self)  # not Linear's: the weight is the base's, not a new one
        self.in_features, self.out_features = base.in_features, base.out_features
        for name, tensor in base.named_parameters(recurse=False):
            self.register_parameter(name, tensor)
        for name, tensor in base.named_buffers(recurse=False):
            self.register_buffer(name, tensor)
        if "bias" not in self._parameters:
            self.register_parameter("bias", None)

    @classmethod
    def of(cls, linear: nn.Linear) -> FrozenLinear:
        """`linear` itself if it is one already, else a FrozenLinear sharing its weight and bias."""
        return linear if isinstance(linear, FrozenLinear) else cls(linear)

    @torch.no_grad()
    def quantize_(self) -> tuple[int, int]:
        """Hold the weight as int8 from now on (frozen: it has no gradient any more); (bytes before, after)."""
        return _replace_with_int8(self, "weight", self.weight)


def _replace_with_int8(module: nn.Module, name: str, weight: torch.Tensor) -> tuple[int, int]:
    """Replace `module.<name>` by int8 values of `weight` [..., out, in] and their scales: (bytes before, after)."""
    before = getattr(module, name).nbytes
    values, scales = quantize_rows(weight)
    delattr(module, name)  # the float parameter goes, its memory with it
    module.register_buffer(name, values)
    module.register_buffer(name + SCALES, scales)
    return before, values.nbytes + scales.nbytes


def stack_scales(experts: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The scales of an Experts' two stacks when they are int8 (then stored [E, out, in]), else None."""
    return tuple(getattr(experts, stack + SCALES, None) for stack in EXPERT_STACKS)


def expert_product(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """x @ W for one expert's matrix: float [in, out], or int8 [out, in] with `scales`."""
    return x @ weight if scales is None else int8_linear(x, weight, scales)


@torch.no_grad()
def quantize_frozen_base(model: Transformer) -> tuple[int, int]:
    """Hold every frozen projection and expert stack of `model`'s layers as int8, in place (adapters,
    embeddings, norms, router and head stay as they are). Returns (bytes before, bytes after) of
    the weights converted."""
    sizes = []
    for layer in model.model.layers:
        owners: list[tuple[nn.Module, str]] = [(layer.self_attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        feed_forward = layer.feed_forward
        mlp = feed_forward.shared_expert if layer.is_moe else feed_forward
        owners += [(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")]
        for owner, attr in owners:
            linear = FrozenLinear.of(getattr(owner, attr))
            if linear.weight.dtype != torch.int8:
                sizes.append(linear.quantize_())
            setattr(owner, attr, linear)
        if layer.is_moe:
            experts = feed_forward.experts
            sizes += [_replace_with_int8(experts, stack, getattr(experts, stack).transpose(1, 2))
                      for stack in EXPERT_STACKS if getattr(experts, stack).dtype != torch.int8]
    return sum(before for before, _ in sizes), sum(after for _, after in sizes)


def is_quantized(model: nn.Module) -> bool:
    """Whether any weight of `model` is held as int8 by `quantize_frozen_base`."""
    return any(name.endswith(SCALES) for name, _ in model.named_buffers())


def float_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with every int8 weight back in float32, in its trained name and layout
    (expert stacks [E, in, out] again), and no scales: what a model directory holds."""
    state = model.state_dict()
    out = {}
    for name, tensor in state.items():
        if name.endswith(SCALES):
            continue
        scales = state.get(name + SCALES)
        if scales is not None:
            tensor = dequantize_rows(tensor, scales)
            if name.rsplit(".", 1)[-1] in EXPERT_STACKS:
                tensor = tensor.transpose(1, 2)
        out[name] = tensor
    return out
