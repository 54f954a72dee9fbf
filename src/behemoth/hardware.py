"""What this machine's processor offers (`detect_cpu`), and the fast paths that follow (`choose_paths`).

With AVX2 only, a bfloat16 product converts to float32 and back, slower than float32 itself, and
oneDNN has no bfloat16 kernels; with AVX-512 BF16 or AMX, bfloat16 runs in hardware at about twice
float32's speed. A choice changes nothing but the rounding of the chosen kernel.
"""

from __future__ import annotations

import platform
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

AVX512_BASE = ("avx512f", "avx512bw", "avx512vl", "avx512dq")  # what oneDNN's AVX-512 bfloat16 path needs
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class CpuFeatures:
    """The instruction sets that decide which kernels are fast here."""

    model: str
    avx2: bool
    avx512: bool  # AVX-512 F, BW, VL and DQ
    avx512_bf16: bool
    amx: bool  # AMX tiles with bfloat16
    torch_kernels: str  # the vector instruction set torch's own kernels were dispatched to ("AVX512", "AVX2", ...)
    onednn_bf16: bool  # torch's oneDNN runs bfloat16 products on this CPU (a trial product succeeded)

    @property
    def native_bf16(self) -> bool:
        """bfloat16 products run in hardware (AVX-512 BF16 or AMX), not by conversion to float32."""
        return self.onednn_bf16 and (self.avx512_bf16 or self.amx)

    def as_dict(self) -> dict:
        return {**asdict(self), "native_bf16": self.native_bf16}


def detect_cpu(cpuinfo: Path = CPUINFO) -> CpuFeatures:
    """This machine's CPU. Without /proc/cpuinfo (not Linux), the flags come from torch's dispatch level."""
    flags, model = _cpuinfo(cpuinfo)
    capability = torch.backends.cpu.get_cpu_capability()
    if not flags:  # no /proc/cpuinfo: what torch chose is the best we know
        flags = {"avx2"} if capability.startswith(("AVX2", "AVX512")) else set()
        flags |= set(AVX512_BASE) if capability.startswith("AVX512") else set()
    return CpuFeatures(
        model=model or platform.processor() or platform.machine(),
        avx2="avx2" in flags,
        avx512=all(flag in flags for flag in AVX512_BASE),
        avx512_bf16="avx512_bf16" in flags,
        amx="amx_bf16" in flags and "amx_tile" in flags,
        torch_kernels=capability,
        onednn_bf16=onednn_bf16_works(),
    )


def _cpuinfo(path: Path) -> tuple[set[str], str]:
    """(flags, model name) of the first processor in a /proc/cpuinfo file; empty where there is none."""
    try:
        text = path.read_text()
    except OSError:
        return set(), ""
    fields: dict[str, str] = {}  # the first non-empty value of each key
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if value.strip():
            fields.setdefault(key.strip(), value.strip())
    return set(fields.get("flags", "").split()), fields.get("model name", "")


def onednn_bf16_works() -> bool:
    """Whether torch's oneDNN multiplies bfloat16 weights here: some builds list the operators, then
    refuse them on a CPU without AVX-512 or AVX-NE-CONVERT, so a trial product decides."""
    mkldnn = torch.ops.mkldnn
    ops = ("_reorder_linear_weight", "_linear_pointwise", "_is_mkldnn_bf16_supported")
    if not (torch.backends.mkldnn.is_available() and all(hasattr(mkldnn, op) for op in ops)
            and mkldnn._is_mkldnn_bf16_supported()):
        return False
    try:
        weight = torch.zeros(16, 16, dtype=torch.bfloat16)
        mkldnn._linear_pointwise(weight[:1], mkldnn._reorder_linear_weight(weight, 1), None, "none", [], "")
    except RuntimeError:
        return False
    return True


@dataclass(frozen=True)
class FastPaths:
    """The kernels chosen for this CPU (measured in bench/RESULTS.md, "Decode matrix products")."""

    lm_head: str  # in the int8 serving format: "bfloat16 packed" or "float32"
    int8_prompt_dtype: torch.dtype  # int8 products of a prompt run on the matrix cast to this type
    training_bf16: str  # what `run.dtype = "bfloat16"` gets: "native" or "emulated"
    compiled_decode: bool  # `--compile` can build its C++ programs (a compiler is on PATH)

    def as_dict(self) -> dict:
        return {**asdict(self), "int8_prompt_dtype": str(self.int8_prompt_dtype).removeprefix("torch.")}

    def lines(self) -> list[str]:
        bf16_training = ("native bfloat16 products" if self.training_bf16 == "native"
                         else "bfloat16 emulated in float32: slower than float32 here, use float32")
        return [
            f"serve --weights int8: LM head     {self.lm_head}",
            f"serve --weights int8: prompts     the int8 matrix cast to {str(self.int8_prompt_dtype).removeprefix('torch.')}",
            "serve --weights int8: decoding    torch's int8 weight-only kernel",
            f"serve --compile                   {'available' if self.compiled_decode else 'no C++ compiler found'}",
            f"train run.dtype=bfloat16          {bf16_training}",
        ]


def choose_paths(cpu: CpuFeatures) -> FastPaths:
    """The fastest measured kernels on a CPU like `cpu`: without native bfloat16 the LM head and a
    prompt's int8 products are float32; decode steps keep torch's int8 kernel on every CPU."""
    native = cpu.native_bf16
    return FastPaths(lm_head="bfloat16 packed" if native else "float32",
                     int8_prompt_dtype=torch.bfloat16 if native else torch.float32,
                     training_bf16="native" if native else "emulated",
                     compiled_decode=any(shutil.which(cc) for cc in ("c++", "g++", "clang++")))


def describe_machine(cpu: CpuFeatures | None = None) -> str:
    """What `behemoth info --machine` prints: the CPU's features and the paths chosen from them."""
    cpu = cpu or detect_cpu()
    yes = {True: "yes", False: "no"}
    rows = [
        f"CPU                 {cpu.model}",
        f"  AVX2              {yes[cpu.avx2]}",
        f"  AVX-512           {yes[cpu.avx512]}",
        f"  AVX-512 BF16      {yes[cpu.avx512_bf16]}",
        f"  AMX               {yes[cpu.amx]}",
        f"  torch kernels     {cpu.torch_kernels} (torch {torch.__version__}, {torch.get_num_threads()} threads)",
        f"  oneDNN bfloat16   {yes[cpu.onednn_bf16]}",
        f"  native bfloat16   {yes[cpu.native_bf16]}",
    ]
    if torch.cuda.is_available():
        rows.append(f"GPU                 {torch.cuda.get_device_name()} (CUDA {torch.version.cuda}): "
                    f"training and serving on it use bfloat16 where asked")
    rows += ["Paths chosen", *(f"  {line}" for line in choose_paths(cpu).lines())]
    return "\n".join(rows)
