"""What a run reports: metrics.jsonl, throughput and MFU, progress on the terminal."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from behemoth.durable import write_atomic


def measure_matmul_peak(size: int = 2048, repeats: int = 6, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> float:
    """Best observed FLOP/s of a square matmul, the denominator of MFU: 2048 reaches a CPU's BLAS peak
    (1024 stays below it); best-of-N skips moments when another process had the cores."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    best = math.inf
    for i in range(repeats + 2):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        if i >= 2:  # warm-up
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def machine_matmul_peak(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """The highest matmul peak ever measured on this machine (device, dtype, threads, torch version),
    measuring again now: a peak taken while other work held the cores would overstate MFU, and the
    best one seen keeps MFU comparable across runs. `dtype`: the one training computes in (against
    the float32 peak, a bfloat16 run's MFU would be several times too high on a GPU)."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    key = (f"{device.type}|{name}|{str(dtype).removeprefix('torch.')}|{torch.get_num_threads()} threads|"
           f"torch {torch.__version__}")
    cache = Path(os.environ.get("BEHEMOTH_CACHE", Path.home() / ".cache" / "behemoth")) / "matmul_peak.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    peak = max(measure_matmul_peak(dtype=dtype, device=device), float(known.get(key, 0.0)))
    known[key] = peak
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cache, json.dumps(known, indent=1))
    except OSError:
        pass  # a read-only home only costs the cache
    return peak


def _sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class MetricsLog:
    """Appends one JSON object per line; on resume, drops lines past the checkpoint's step."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            write_atomic(path, "".join(line + "\n" for line in kept))
        elif resume_step is None and path.exists():
            path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Progress:
    """A tqdm bar on a terminal; plain periodic lines otherwise (logs, CI)."""

    def __init__(self, total: int, start: int, enabled: bool | None = None, every: int = 10):
        interactive = sys.stderr.isatty() if enabled is None else enabled
        self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True) if interactive else None
        self.every = every

    def update(self, step: int, total: int, text: str) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(text, refresh=False)
        elif step % self.every == 0 or step == total:
            print(f"step {step}/{total} {text}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
