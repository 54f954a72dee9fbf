"""Weight formats for serving: as trained (float32), bfloat16, or int8 weight-only (`prepare_weights`).

A CPU decode step's speed is set by the bytes of weights it reads (bench/RESULTS.md). int8 stores
every projection and expert matrix with a scale per output channel; embeddings, norms, the router,
the KV cache and layers whose input width is not a multiple of 16 stay as trained. The int8 LM head
is a packed `BFloat16Linear` on a CPU with native bfloat16 (`hardware.choose_paths`), else float32.
Modules are swapped for ones with the same call signature. A model carrying LoRA adapters keeps
its modules instead, each holding its weight as int8 (model/int8.py), since an adapter sits on one
projection where the fused int8 modules join several.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from behemoth.errors import ConfigError
from behemoth.hardware import CpuFeatures, choose_paths, detect_cpu
from behemoth.model import Transformer
from behemoth.model.int8 import KERNEL_BLOCK, KERNEL_ROWS, quantize_frozen_base, quantize_rows
from behemoth.model.lora import carries_adapters
from behemoth.model.moe import MLP, Experts, combine, sort_by_expert

WEIGHT_FORMATS: tuple[str, ...] = ("float32", "bfloat16", "int8")
# the int8 kernel's input width must be a multiple of INT8_BLOCK; from DEQUANTIZED_ROWS rows on
# (prompts), int8 products run on the cast matrix instead
INT8_BLOCK, DEQUANTIZED_ROWS = KERNEL_BLOCK, KERNEL_ROWS


def prepare_weights(model: Transformer, weights: str = "float32", cpu: CpuFeatures | None = None) -> Transformer:
    """Convert `model` in place to the serving format `weights`, with the kernels chosen for `cpu` (default: here)."""
    if weights not in WEIGHT_FORMATS:
        raise ConfigError(f"unknown weight format {weights!r} (choose from {', '.join(WEIGHT_FORMATS)})")
    paths = choose_paths(cpu or detect_cpu())
    model.eval()
    if weights == "bfloat16":
        model.to(torch.bfloat16)
    elif weights == "int8":
        if next(model.parameters()).device.type != "cpu":  # checked before any weight is converted
            raise ConfigError("int8 weights run on the CPU only (torch's int8 weight-only kernel has no "
                              f"{next(model.parameters()).device.type} version); use bfloat16 there")
        if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            raise ConfigError(f"int8 weights need torch's _weight_int8pack_mm kernel, which torch "
                              f"{torch.__version__} does not have; use bfloat16")
        model.float()
        if carries_adapters(model):  # each adapter sits on one projection: int8 inside the modules
            quantize_frozen_base(model)
        else:
            _quantize_int8(model, paths.int8_prompt_dtype)
    else:
        model.float()
    bfloat16_head = weights == "bfloat16" or (weights == "int8" and paths.lm_head != "float32")
    if bfloat16_head and isinstance(model.lm_head, nn.Linear):  # a tied head gets its own copy
        model.lm_head = BFloat16Linear(model.lm_head, pack=paths.lm_head == "bfloat16 packed")
    # RoPE frequencies back to float32: cast to bfloat16 they are off by a radian at a few
    # thousand positions
    model.reset_buffers()
    return model


def _quantize_int8(model: Transformer, prompt_dtype: torch.dtype) -> None:
    """Swap every eligible projection, MLP and expert bank for its int8 twin; projections of the same
    input (q, k and v; gate and up) are fused into one matrix, one kernel call."""
    for layer in model.model.layers:
        attention = layer.self_attn
        if all(_eligible(getattr(attention, name)) for name in ("q_proj", "k_proj", "v_proj")):
            # float out: keys and values go into the float KV cache
            attention.qkv_proj = Int8Linear.fused([attention.q_proj, attention.k_proj, attention.v_proj],
                                                  prompt_dtype, float_output=True)
            del attention.q_proj, attention.k_proj, attention.v_proj
        if _eligible(attention.o_proj):
            attention.o_proj = Int8Linear.fused([attention.o_proj], prompt_dtype)
        feed_forward = layer.feed_forward
        if layer.is_moe:
            if Int8MLP.eligible(feed_forward.shared_expert):
                feed_forward.shared_expert = Int8MLP(feed_forward.shared_expert, prompt_dtype)
            if Int8Experts.eligible(feed_forward.experts):
                feed_forward.experts = Int8Experts(feed_forward.experts, prompt_dtype)
        elif Int8MLP.eligible(feed_forward):
            layer.feed_forward = Int8MLP(feed_forward, prompt_dtype)


def _eligible(linear: nn.Module) -> bool:
    return isinstance(linear, nn.Linear) and linear.in_features % INT8_BLOCK == 0


def int8_matmul(x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor,
                prompt_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x [..., in] (bfloat16) times int8 values [out, in] with per-row scales: [..., out] bfloat16. Decode
    steps take torch's int8 weight-only kernel; a prompt (DEQUANTIZED_ROWS rows or more, eager) multiplies
    the matrix cast to `prompt_dtype` (exact for int8 values; float32 on an AVX2-only CPU), 1.5-3x faster;
    in bfloat16 its output is rounded before the scaling, not after."""
    rows = x.reshape(-1, x.shape[-1])
    if not torch.compiler.is_compiling() and rows.shape[0] >= DEQUANTIZED_ROWS:
        out = (F.linear(rows.to(prompt_dtype), values.to(prompt_dtype)) * scales).to(x.dtype)
    else:
        out = torch.ops.aten._weight_int8pack_mm(rows.contiguous(), values, scales)
    return out.view(*x.shape[:-1], values.shape[0])


class Int8Linear(nn.Module):
    """One or more nn.Linear of the same input, fused into int8 weights [sum of outputs, in], biases
    as trained. Out in bfloat16, the kernel's type (promoted for free by a residual add or the logits
    cast), or in the input's type with `float_output`."""

    def __init__(self, values: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 prompt_dtype: torch.dtype = torch.bfloat16, float_output: bool = False):
        super().__init__()
        self.register_buffer("weight", values)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.prompt_dtype = prompt_dtype
        self.float_output = float_output

    @classmethod
    def fused(cls, linears: list[nn.Linear], prompt_dtype: torch.dtype = torch.bfloat16,
              float_output: bool = False) -> Int8Linear:
        values, scales = quantize_rows(torch.cat([linear.weight for linear in linears]))
        biases = [linear.bias for linear in linears]
        bias = None if all(b is None for b in biases) else torch.cat([
            b.detach() if b is not None else torch.zeros(linear.out_features) for b, linear in zip(biases, linears)])
        return cls(values, scales, bias, prompt_dtype, float_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = int8_matmul(x.to(torch.bfloat16), self.weight, self.scales, self.prompt_dtype)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(x.dtype) if self.float_output else out


class BFloat16Linear(nn.Module):
    """An nn.Linear computed in bfloat16 (any float in, bfloat16 out). With `pack` (a CPU whose oneDNN
    runs bfloat16) the weight is also reordered once into oneDNN's blocked layout, an opaque tensor
    no compiled program can take: eager calls use it, a compiled program the plain weight. (Not
    `torch.compiler.disable`: as a decorator it imports dynamo with this module, 1.5 s and 80 MiB
    for every process that serves, compiled or not.)"""

    def __init__(self, linear: nn.Linear, pack: bool = False):
        super().__init__()
        self.register_buffer("weight", linear.weight.detach().to(torch.bfloat16).contiguous())
        self.bias = (None if linear.bias is None
                     else nn.Parameter(linear.bias.detach().to(torch.bfloat16), requires_grad=False))
        # laid out for 16 rows; any row count gives the same products
        self._packed = (torch.ops.mkldnn._reorder_linear_weight(self.weight, 16)
                        if pack and self.weight.device.type == "cpu" else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16)
        if self._packed is not None and x.device.type == "cpu" and not torch.compiler.is_compiling():
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class Int8MLP(nn.Module):
    """The SwiGLU `MLP` with gate and up fused into one int8 matrix; bfloat16 activations and output."""

    def __init__(self, mlp: MLP, prompt_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        _register_int8(self, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), mlp.down_proj.weight,
                       prompt_dtype)

    @staticmethod
    def eligible(mlp: nn.Module) -> bool:
        return isinstance(mlp, MLP) and _eligible(mlp.gate_proj) and _eligible(mlp.down_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu_int8(x.to(torch.bfloat16), self.gate_up, self.gate_up_scales, self.down, self.down_scales,
                           self.prompt_dtype)


def _register_int8(module: nn.Module, gate_up: torch.Tensor, down: torch.Tensor, prompt_dtype: torch.dtype) -> None:
    """Quantise a SwiGLU's [.., 2I, hidden] and [.., hidden, I] matrices into the module's buffers
    gate_up, gate_up_scales, down and down_scales."""
    module.prompt_dtype = prompt_dtype
    for name, weight in (("gate_up", gate_up), ("down", down)):
        values, scales = quantize_rows(weight)
        module.register_buffer(name, values)
        module.register_buffer(f"{name}_scales", scales)


def swiglu_int8(x: torch.Tensor, gate_up: torch.Tensor, gate_up_scales: torch.Tensor, down: torch.Tensor,
                down_scales: torch.Tensor, prompt_dtype: torch.dtype) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) with int8 matrices, bfloat16 in and out."""
    gate, up = int8_matmul(x, gate_up, gate_up_scales, prompt_dtype).chunk(2, dim=-1)
    return int8_matmul(F.silu(gate) * up, down, down_scales, prompt_dtype)


class Int8Experts(nn.Module):
    """`Experts` with int8 weights: the same routing arithmetic (the gate scales the input, outputs
    summed in expert order), bfloat16 activations and output."""

    def __init__(self, experts: Experts, prompt_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.num_experts = experts.num_experts
        # Stored [E, out, in], as the kernel wants each matrix (Hugging Face's layout is [E, in, out]).
        _register_int8(self, experts.gate_up_proj.transpose(1, 2), experts.down_proj.transpose(1, 2), prompt_dtype)

    @staticmethod
    def eligible(experts: Experts) -> bool:
        hidden, intermediate = experts.down_proj.shape[2], experts.down_proj.shape[1]
        return hidden % INT8_BLOCK == 0 and intermediate % INT8_BLOCK == 0

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """x [tokens, hidden] through its picked experts: [tokens, hidden] bfloat16."""
        x = x.to(torch.bfloat16)
        if x.shape[0] != 1:
            return self._grouped(x, expert_ids, gates)
        if torch.compiler.is_compiling():  # a program for one row (sizes 1 are specialised)
            return self._one_token_in_graph(x, expert_ids[0], gates[0])
        # in expert order, as Experts sums; a 0-d float32 gate keeps x's bfloat16
        return sum(self._expert(e, x * gate) for e, gate in sorted(zip(expert_ids[0].tolist(), gates[0].unbind())))

    def _expert(self, e: int, tokens: torch.Tensor) -> torch.Tensor:
        return swiglu_int8(tokens, self.gate_up[e], self.gate_up_scales[e], self.down[e], self.down_scales[e],
                           self.prompt_dtype)

    def _one_token_in_graph(self, x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """One token's experts, their weights picked by tensor indexing rather than a host read,
        so that the compiler sees (and fuses around) every product."""
        out = None
        for k in range(expert_ids.shape[0]):
            picked = (bank.index_select(0, expert_ids[k:k + 1])[0]
                      for bank in (self.gate_up, self.gate_up_scales, self.down, self.down_scales))
            y = swiglu_int8(x * gates[k].to(x.dtype), *picked, self.prompt_dtype)
            out = y if out is None else out + y
        return out

    def _grouped(self, x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Rows grouped by expert, one product per expert (possibly of zero rows). In a compiled step
        the group sizes enter the program as unbacked sizes (`capture_scalar_outputs`), bounded by
        the checks below, so one program serves every routing."""
        routed_in, token_of_slot, counts = sort_by_expert(x, expert_ids, gates, self.gate_up.shape[0])
        sizes = counts.tolist()
        for size in sizes:
            torch._check(size >= 0)
            torch._check(size <= routed_in.shape[0])
        torch._check(sum(sizes) == routed_in.shape[0])
        outputs = [self._expert(e, tokens) for e, tokens in enumerate(routed_in.split(sizes))]
        return combine(x, token_of_slot, torch.cat(outputs))
