"""Capacity planner: memory per GPU and training time for a model on a cluster, by arithmetic alone.

Layout (torchtitan's FSDP2 + expert parallelism; no TP, PP or CP): `fsdp` ranks (default all; fewer is
HSDP) shard the dense weights; the routed experts are split over `ep` ranks taken *from* that group and
sharded again over the fsdp/ep ranks holding the same experts, so a rank stores 1/fsdp of them whatever
`ep` is: EP divides what a layer must *gather*. Memory is in GiB, as `torch.cuda` reports, with a reserve
for the CUDA context, NCCL and EP buffers and fragmentation. Compute is 6 x N_active FLOPs per token
(Kaplan et al.'s 6ND), attention's shown apart; MFU is the share of peak spent on the 6N FLOPs. Meta's
"390 TFLOP/s" for Behemoth is an *achieved* rate, so it goes with MFU 1 (README.md, "Capacity
planning"). Not modelled: gradient accumulation, routing imbalance, communication (assumed overlapped).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal

from behemoth.config import ModelConfig, preset
from behemoth.errors import ConfigError
from behemoth.info import attention_params, human, model_size

GIB = 2 ** 30
SECONDS_PER_DAY = 86_400
PEAK_TFLOPS = {"bf16": 989.0, "fp8": 1979.0}  # H100 SXM dense (datasheet, without 2:4 sparsity)
COMPUTE_BYTES = {"bf16": 2, "fp8": 1}  # per gathered weight; torchtitan's float8 keeps fp32 shards
MASTER_BYTES, GRAD_SHARD_BYTES, ADAM_BYTES = 4, 4, 8  # fp32 shard, fp32 gradient, two fp32 moments
UNSHARDED_GRAD_BYTES = 2  # a layer's gradient is produced in bf16 before the reduce-scatter
ACT_BYTES = 2  # activations stay bf16 in both modes (fp8 copies saved for backward: not modelled)
DEFAULT_SEQ_LEN = 8192  # Llama 4's attention chunk: no chunk boundary inside a sequence
_SUFFIXES = {"": 1, "K": 10 ** 3, "M": 10 ** 6, "B": 10 ** 9, "G": 10 ** 9, "T": 10 ** 12}


@dataclass
class PlanInput:
    """A model, a cluster and a layout: `behemoth plan`'s flags (model = --preset), named in errors."""

    model: str | ModelConfig  # a preset name or a config
    gpus: int
    gpu_mem_gb: float  # memory per GPU, GiB
    tokens: int | None = None  # training tokens; None = no total time
    fsdp: int | None = None  # sharding group size; None = all GPUs
    ep: int = 1  # expert-parallel degree, taken from the FSDP group
    activation_checkpointing: bool = False  # full, per decoder layer
    dtype: str = "bf16"  # matmul dtype: bf16 or fp8
    mfu: float = 0.40  # fraction of peak spent on the 6N FLOPs
    peak_tflops: float | None = None  # per GPU; None = H100 SXM dense peak for dtype
    seq_len: int | None = None  # None = min(8192, max_position_embeddings)
    micro_batch: int = 1  # sequences per GPU per step (no gradient accumulation)
    reserve_fraction: float = 0.10  # of gpu_mem_gb, kept free


@dataclass
class MemoryLine:
    """One item of per-GPU memory, in bytes, split into the dense part and the routed experts."""

    name: str
    dense: float
    experts: float = 0.0

    @property
    def total(self) -> float:
        return self.dense + self.experts


@dataclass
class Plan:
    inp: PlanInput
    label: str
    config: ModelConfig
    fsdp: int
    replicas: int  # FSDP groups (HSDP replication degree)
    seq_len: int
    peak_tflops: float
    total_params: int
    active_params: int
    expert_params: int  # all routed experts, all layers
    memory: list[MemoryLine]
    reserve_bytes: float
    train_flops_per_token: float  # 6 x active params
    attention_flops_per_token: float  # training (3 x forward), not in 6N
    tokens_per_gpu: int  # per step
    step_seconds: float  # 6N at the MFU
    ideal_days: float | None = None  # 6ND at MFU 1
    days: float | None = None  # 6ND at the MFU
    days_with_attention: float | None = None
    steps: int | None = None

    @property
    def memory_bytes(self) -> float:
        return sum(line.total for line in self.memory)

    @property
    def headroom_bytes(self) -> float:
        """What is left after the items and the reserve; negative when the plan does not fit."""
        return self.inp.gpu_mem_gb * GIB - self.reserve_bytes - self.memory_bytes

    @property
    def fits(self) -> bool:
        return self.headroom_bytes >= 0

    @property
    def tokens_per_step(self) -> int:
        return self.tokens_per_gpu * self.inp.gpus

    def line(self, name: str) -> MemoryLine:
        return next(line for line in self.memory if line.name == name)


def parse_count(text: str, flag: str = "--tokens") -> int:
    """'30T' -> 30_000_000_000_000, '1.5B' -> 1_500_000_000; also K, M, G (= B), plain and 3e12."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", text)
    if not match:
        raise ConfigError(f"{flag} {text!r}: expected a positive count such as 30T, 1.5B, 500M or 2e12")
    value = Decimal(match[1]) * _SUFFIXES[match[2].upper()]  # exact: 1.5B is 1,500,000,000
    if value < 1:
        raise ConfigError(f"{flag} {text!r}: must be at least 1")
    return int(value.to_integral_value())


def _is_number(value: object, integer: bool = False) -> bool:
    if integer:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value: object, flag: str, integer: bool) -> None:
    if not _is_number(value, integer) or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise ConfigError(f"{flag} must be {kind}, got {value!r}")


def _resolve_model(model: str | ModelConfig) -> tuple[str, ModelConfig]:
    if isinstance(model, ModelConfig):
        return "custom config", model
    try:
        return model, preset(model)
    except ConfigError as err:
        raise ConfigError(f"--preset: {err}") from None


def _check(inp: PlanInput, config: ModelConfig) -> None:
    """One line naming the flag for the first value that cannot work."""
    for flag, value, integer in (("--gpus", inp.gpus, True), ("--micro-batch", inp.micro_batch, True),
                                 ("--gpu-mem", inp.gpu_mem_gb, False), ("--mfu", inp.mfu, False),
                                 ("--tokens", inp.tokens, True), ("--fsdp", inp.fsdp, True),
                                 ("--seq-len", inp.seq_len, True), ("--peak-tflops", inp.peak_tflops, False),
                                 ("--ep", inp.ep, True)):
        if value is not None or flag not in ("--tokens", "--fsdp", "--seq-len", "--peak-tflops"):
            _positive(value, flag, integer)
    if inp.mfu > 1:
        raise ConfigError(f"--mfu is a fraction of peak and must be at most 1, got {inp.mfu}")
    if inp.dtype not in COMPUTE_BYTES:
        raise ConfigError(f"--dtype must be one of {', '.join(COMPUTE_BYTES)}, got {inp.dtype!r}")
    if not _is_number(inp.reserve_fraction) or not 0 <= inp.reserve_fraction < 1:
        raise ConfigError(f"reserve_fraction must be in [0, 1), got {inp.reserve_fraction!r}")
    if inp.seq_len is not None and inp.seq_len > config.max_position_embeddings:
        raise ConfigError(f"--seq-len {inp.seq_len} exceeds the model's context "
                          f"({config.max_position_embeddings})")
    fsdp = inp.fsdp or inp.gpus
    if inp.gpus % fsdp:
        raise ConfigError(f"--fsdp {fsdp} must divide --gpus {inp.gpus}")
    if inp.ep == 1:
        return
    if not config.moe_layers:
        raise ConfigError(f"--ep {inp.ep}: the model has no routed experts (use --ep 1)")
    experts = config.num_local_experts
    if experts % inp.ep:
        raise ConfigError(f"--ep {inp.ep} must divide the number of routed experts ({experts})")
    if inp.gpus % inp.ep:
        raise ConfigError(f"--ep {inp.ep} must divide --gpus {inp.gpus}")
    if fsdp % inp.ep:  # torchtitan takes the EP ranks from the FSDP group
        raise ConfigError(f"--ep {inp.ep} must divide the FSDP degree ({fsdp})")


def _expert_params(c: ModelConfig) -> int:
    return 3 * c.hidden_size * c.intermediate_size  # gate, up, down


def fsdp_units(c: ModelConfig, ep: int) -> list[tuple[int, int]]:
    """(dense, routed-expert) parameters each FSDP unit gathers, in execution order: embedding,
    decoder layers (a MoE layer gathers only its E/ep local experts), LM head with the final norm."""
    embedding = c.vocab_size * c.hidden_size
    attention = attention_params(c) + 2 * c.hidden_size  # + the two RMSNorm weights
    units = [(embedding, 0)]
    for layer in range(c.num_hidden_layers):
        if c.is_moe_layer(layer):
            dense = attention + c.hidden_size * c.num_local_experts + _expert_params(c)  # router, shared
            units.append((dense, c.num_local_experts // ep * _expert_params(c)))
        else:
            units.append((attention + 3 * c.hidden_size * c.intermediate_size_mlp, 0))
    units.append(((0 if c.tie_word_embeddings else embedding) + c.hidden_size, 0))
    return units


def working_copy_bytes(c: ModelConfig, ep: int, fsdp: int, dtype: str) -> tuple[float, float]:
    """(dense, experts) bytes of the largest neighbouring pair of units (one computing, one prefetched),
    each held as compute-dtype weights plus the bf16 gradient produced before the reduce-scatter.
    Unsharded weights (FSDP 1 for dense, fsdp/ep = 1 for experts) are whole on the rank: no gather."""
    gathered = [(d if fsdp > 1 else 0, e if fsdp // ep > 1 else 0) for d, e in fsdp_units(c, ep)]
    pairs = [(a[0] + b[0], a[1] + b[1]) for a, b in zip(gathered, gathered[1:])]
    dense, experts = max(pairs, key=sum)
    per_param = COMPUTE_BYTES[dtype] + UNSHARDED_GRAD_BYTES
    return dense * per_param, experts * per_param


def layer_activation_bytes(c: ModelConfig, layer: int) -> tuple[float, float]:
    """(dense, routed-expert) bytes per token one decoder layer saves for backward, as a fused
    implementation keeps them, bf16 unless noted: each RMSNorm's input and output (2h); attention's
    q, k, v and output and the fp32 log-sum-exp per head (flash attention stores no scores); a
    SwiGLU's gate, up and product (3I); per picked expert the token copy and 3I (balanced routing);
    the router's fp32 logits."""
    h, q = c.hidden_size, c.num_attention_heads * c.head_dim
    kv = c.num_key_value_heads * c.head_dim
    attention = ACT_BYTES * (2 * h + q + 2 * kv + q) + 4 * c.num_attention_heads
    if not c.is_moe_layer(layer):
        return attention + ACT_BYTES * (2 * h + 3 * c.intermediate_size_mlp), 0.0
    shared = ACT_BYTES * (2 * h + 3 * c.intermediate_size) + 4 * c.num_local_experts
    routed = c.num_experts_per_tok * ACT_BYTES * (h + 3 * c.intermediate_size)
    return attention + shared, routed


def activation_bytes_per_token(c: ModelConfig, checkpointing: bool) -> tuple[float, float]:
    """(dense, routed-expert) activation bytes per token of all decoder layers; with full
    checkpointing each layer's input plus the largest layer's, as backward recomputes one at a time."""
    per_layer = [layer_activation_bytes(c, i) for i in range(c.num_hidden_layers)]
    if not checkpointing:
        return sum(d for d, _ in per_layer), sum(e for _, e in per_layer)
    dense, experts = max(per_layer, key=sum)
    return c.num_hidden_layers * ACT_BYTES * c.hidden_size + dense, experts


def head_activation_bytes(c: ModelConfig) -> float:
    """Bytes per token of the final norm (2h) and the loss: bf16 logits plus cross-entropy's fp32 copy,
    6 bytes per vocabulary entry; never checkpointed (torchtitan checkpoints decoder layers only)."""
    return ACT_BYTES * 2 * c.hidden_size + 6 * c.vocab_size


def plan(inp: PlanInput) -> Plan:
    """Memory per GPU, whether it fits, and step and training time for `inp`."""
    label, c = _resolve_model(inp.model)
    _check(inp, c)
    fsdp = inp.fsdp or inp.gpus
    seq_len = inp.seq_len or min(DEFAULT_SEQ_LEN, c.max_position_embeddings)
    peak = inp.peak_tflops or PEAK_TFLOPS[inp.dtype]
    size = model_size(c, seq_len)
    tokens_per_gpu = inp.micro_batch * seq_len
    dense_params = size.total_params - size.expert_params

    def shard(bytes_per_param: int) -> tuple[float, float]:
        return dense_params * bytes_per_param / fsdp, size.expert_params * bytes_per_param / fsdp

    act_dense, act_experts = activation_bytes_per_token(c, inp.activation_checkpointing)
    memory = [
        MemoryLine("parameters", *shard(MASTER_BYTES)),
        MemoryLine("gradients", *shard(GRAD_SHARD_BYTES)),
        MemoryLine("optimizer", *shard(ADAM_BYTES)),
        MemoryLine("working copies", *working_copy_bytes(c, inp.ep, fsdp, inp.dtype)),
        MemoryLine("activations", act_dense * tokens_per_gpu, act_experts * tokens_per_gpu),
        MemoryLine("logits and loss", head_activation_bytes(c) * tokens_per_gpu),
    ]
    flops_6n = 6 * size.active_params
    attention = 3 * size.attention_flops_per_token  # backward does twice the forward's work
    p = Plan(
        inp=inp, label=label, config=c, fsdp=fsdp, replicas=inp.gpus // fsdp, seq_len=seq_len,
        peak_tflops=peak, total_params=size.total_params, active_params=size.active_params,
        expert_params=size.expert_params, memory=memory,
        reserve_bytes=inp.reserve_fraction * inp.gpu_mem_gb * GIB,
        train_flops_per_token=flops_6n, attention_flops_per_token=attention, tokens_per_gpu=tokens_per_gpu,
        step_seconds=flops_6n * tokens_per_gpu / (peak * 1e12 * inp.mfu))
    if inp.tokens is not None:
        # From 6ND directly (not steps x step time), so the training time equals the formula exactly.
        p.ideal_days = flops_6n * inp.tokens / (inp.gpus * peak * 1e12) / SECONDS_PER_DAY
        p.days = p.ideal_days / inp.mfu
        p.days_with_attention = p.days * (1 + attention / flops_6n)
        p.steps = math.ceil(inp.tokens / p.tokens_per_step)
    return p


def _gb(n: float) -> str:
    return f"{n / GIB:10.2f}"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.3g} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * SECONDS_PER_DAY:
        return f"{seconds / 3600:.1f} h"
    days = seconds / SECONDS_PER_DAY
    return f"{days:,.1f} days ({days / 7:,.1f} weeks)"


def _days(days: float) -> str:
    return _duration(days * SECONDS_PER_DAY)


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def _header(p: Plan) -> list[str]:
    i, c = p.inp, p.config
    dense = f"dense weights sharded over FSDP {p.fsdp:,}" if p.fsdp > 1 else "no sharding (FSDP 1)"
    if p.replicas > 1:
        dense += f", {_plural(p.replicas, 'replica')} (HSDP)"
    rows = [f"plan: {p.label} on {_plural(i.gpus, 'GPU')} x {i.gpu_mem_gb:g} GB, {i.dtype}, "
            f"activation checkpointing {'on' if i.activation_checkpointing else 'off'}",
            f"  parameters  {human(p.total_params)} total, {human(p.active_params)} active",
            f"  layout      {dense}"]
    if c.moe_layers and i.ep > 1:
        rows.append(f"  experts     {c.num_local_experts} routed over EP {i.ep}: {c.num_local_experts // i.ep} "
                    f"per rank, each sharded over {p.fsdp // i.ep:,} ranks")
    elif c.moe_layers:
        rows.append(f"  experts     {c.num_local_experts} routed, sharded like the dense weights (EP 1)")
    return rows + [f"  batch       {i.micro_batch} x {p.seq_len:,} tokens per GPU = "
                   f"{p.tokens_per_step:,} tokens per step"]


def _memory_table(p: Plan) -> list[str]:
    rows = ["", f"  {'memory per GPU (GB)':<28}{'dense':>10}{'experts':>10}{'total':>10}"]
    for line in p.memory:
        rows.append(f"  {line.name:<28}{_gb(line.dense)}{_gb(line.experts)}{_gb(line.total)}")
    reserve = f"reserve ({p.inp.reserve_fraction:.0%} of card)"
    rows.append(f"  {reserve:<28}{'':>20}{_gb(p.reserve_bytes)}")
    rows.append(f"  {'total':<28}{'':>20}{_gb(p.memory_bytes + p.reserve_bytes)}")
    verdict = (f"yes, {p.headroom_bytes / GIB:.1f} GB headroom" if p.fits
               else f"NO, {-p.headroom_bytes / GIB:.1f} GB over")
    rows.append(f"  fits in {p.inp.gpu_mem_gb:g} GB: {verdict}")
    return rows


def _compute_table(p: Plan) -> list[str]:
    i = p.inp
    share = p.attention_flops_per_token / p.train_flops_per_token
    per_second = p.tokens_per_step / p.step_seconds
    rows = [
        "",
        f"  {'training FLOPs/token (6N)':<34}{human(p.train_flops_per_token)}",
        f"  {'attention FLOPs/token (not in 6N)':<34}{human(p.attention_flops_per_token)} "
        f"(+{share:.1%} at seq len {p.seq_len:,})",
        f"  {'per-GPU rate':<34}{p.peak_tflops:g} TFLOP/s peak x MFU {i.mfu:.2f} = "
        f"{p.peak_tflops * i.mfu:,.0f} TFLOP/s",
        f"  {'step time':<34}{_duration(p.step_seconds)} "
        f"(with attention {_duration(p.step_seconds * (1 + share))})",
        f"  {'throughput':<34}{human(per_second)} tokens/s ({per_second / i.gpus:,.0f} per GPU)",
    ]
    if p.days is None:
        return rows + [f"  {'training time':<34}pass --tokens to see it"]
    return rows + [
        f"  {'tokens':<34}{human(i.tokens)} in {p.steps:,} steps",
        f"  {'ideal, 6ND at MFU 1':<34}{_days(p.ideal_days)}",
        f"  {f'6ND at MFU {i.mfu:.2f}':<34}{_days(p.days)}",
        f"  {f'with attention, MFU {i.mfu:.2f}':<34}{_days(p.days_with_attention)}",
    ]


def format_plan(p: Plan) -> str:
    """A readable table: layout, memory per GPU by item, fit, step time, throughput, total time."""
    return "\n".join(_header(p) + _memory_table(p) + _compute_table(p))
