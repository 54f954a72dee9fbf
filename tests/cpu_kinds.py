"""The two kinds of x86 CPU the suite must hold on, simulated: an AVX2-only machine and one with
native bfloat16 (AVX-512 BF16). `behemoth.hardware` decides every fast path from a `CpuFeatures`,
so a test passes one of these to check the paths of the kind of machine it is not running on."""

from __future__ import annotations

import dataclasses

import pytest

from behemoth.hardware import CpuFeatures, detect_cpu

KINDS = ("avx2-only", "avx512-bf16")


def simulated_cpu(kind: str) -> CpuFeatures:
    here = detect_cpu()
    if kind == "avx2-only":
        return dataclasses.replace(here, avx2=True, avx512=False, avx512_bf16=False, amx=False,
                                   torch_kernels="AVX2", onednn_bf16=False)
    if kind == "avx512-bf16":
        return dataclasses.replace(here, avx2=True, avx512=True, avx512_bf16=True, torch_kernels="AVX512",
                                   onednn_bf16=True)
    raise ValueError(kind)


def runnable_cpu(kind: str) -> CpuFeatures:
    """`simulated_cpu(kind)` for a test that runs its kernels: the native-bfloat16 kind's need this
    CPU to have them (the AVX2-only kind's run everywhere)."""
    if kind == "avx512-bf16" and not detect_cpu().onednn_bf16:
        pytest.skip("this CPU's oneDNN has no bfloat16 products (no AVX-512): the native-bfloat16 kernels "
                    "cannot run here; their choice is checked by test_paths_follow_the_cpu")
    return simulated_cpu(kind)
