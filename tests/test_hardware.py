"""CPU capability detection (behemoth.hardware) and `behemoth info --machine`."""

from __future__ import annotations

import json

import pytest
import torch
from cpu_kinds import simulated_cpu

from behemoth.cli import main
from behemoth.hardware import choose_paths, describe_machine, detect_cpu

# Shortened /proc/cpuinfo of the two kinds of machine the project runs on.
AVX2_ONLY = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi2
processor\t: 1
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi2
"""
AVX512_BF16 = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8481C
flags\t\t: fpu sse avx avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni avx512_bf16 amx_bf16 amx_tile
"""


def test_flags_are_read_from_cpuinfo(tmp_path) -> None:
    (tmp_path / "avx2").write_text(AVX2_ONLY)
    (tmp_path / "sapphire").write_text(AVX512_BF16)
    avx2 = detect_cpu(tmp_path / "avx2")
    assert (avx2.model, avx2.avx2, avx2.avx512, avx2.avx512_bf16, avx2.amx) == (
        "AMD EPYC 7B12", True, False, False, False)
    sapphire = detect_cpu(tmp_path / "sapphire")
    assert (sapphire.avx2, sapphire.avx512, sapphire.avx512_bf16, sapphire.amx) == (True, True, True, True)
    # native bfloat16 needs both the instructions and a torch whose oneDNN runs them here
    assert sapphire.native_bf16 == sapphire.onednn_bf16
    assert not avx2.native_bf16


def test_without_cpuinfo_the_flags_come_from_torch(tmp_path) -> None:
    cpu = detect_cpu(tmp_path / "missing")
    assert cpu.torch_kernels == torch.backends.cpu.get_cpu_capability()
    assert cpu.avx2 == cpu.torch_kernels.startswith(("AVX2", "AVX512"))


@pytest.mark.parametrize("kind", ["avx2-only", "avx512-bf16"])
def test_describe_machine_names_the_features_and_the_paths(kind) -> None:
    text = describe_machine(simulated_cpu(kind))
    native = kind == "avx512-bf16"
    assert f"AVX-512 BF16      {'yes' if native else 'no'}" in text
    assert f"LM head     {'bfloat16 packed' if native else 'float32'}" in text
    assert ("native bfloat16 products" if native else "slower than float32 here") in text


def test_info_machine_prints_what_was_detected(capsys) -> None:
    assert main(["info", "--machine", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    cpu = detect_cpu()
    assert printed["cpu"] == cpu.as_dict()
    assert printed["paths"] == choose_paths(cpu).as_dict()
    assert main(["info", "--machine"]) == 0
    assert cpu.model in capsys.readouterr().out


def test_info_without_a_model_or_machine_says_what_it_needs(capsys) -> None:
    assert main(["info"]) == 2
    assert "info needs a preset or model directory (or --machine)" in capsys.readouterr().err
