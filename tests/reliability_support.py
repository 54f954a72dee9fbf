"""Helpers for the reliability tests: the figures they report, and a training driver to kill.

Figures: with BEHEMOTH_RELIABILITY_FIGURES=FILE set, each test appends one JSON line of counts
(faults injected, inputs tried, requests served, ...) to FILE; `scripts/reliability.py` sums them
into docs/RELIABILITY.md. Without it, `record` does nothing.

The driver (`python tests/reliability_support.py pretrain ...`) is `behemoth pretrain` with test
hooks added from outside, so the product carries no test switches:
  - every checkpoint-save phase prints `PHASE <name>` on stdout before it runs, and the phase named
    by RELIABILITY_PAUSE_PHASE then waits RELIABILITY_PAUSE_S seconds, so a SIGKILL sent on seeing
    the line lands inside that phase (between its files, before the rename, before pruning);
  - RELIABILITY_FSIZE_AFTER_SAVES=N:BYTES caps the size of any file written after the Nth save
    (RLIMIT_FSIZE, with SIGXFSZ ignored so writes fail with EFBIG as on a full disk);
  - the machine's matmul peak (only used for the MFU figure) is a constant, to save a second per start.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

FIGURES_ENV = "BEHEMOTH_RELIABILITY_FIGURES"
DRIVER = Path(__file__).resolve()
SAVE_PHASES = ("model-files", "manifest", "fsync", "prune")


def record(suite: str, **counts: int | float) -> None:
    """Append one line of figures for `suite` (a single O_APPEND write, so lines never mix)."""
    path = os.environ.get(FIGURES_ENV)
    if not path:
        return
    line = json.dumps({"suite": suite, **counts}, sort_keys=True) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def driver_command(*args: str) -> list[str]:
    return [sys.executable, str(DRIVER), *args]


# ------------------------------------------------------------------------------------------------
# The driver (runs in the child process)
# ------------------------------------------------------------------------------------------------

def _announcing(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    pause = float(os.environ.get("RELIABILITY_PAUSE_S", "0.3"))
    paused = os.environ.get("RELIABILITY_PAUSE_PHASE") == name

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        print(f"PHASE {name}", flush=True)
        if paused:
            time.sleep(pause)
        return function(*args, **kwargs)
    return wrapper


def _cap_file_size_after(saves: int, limit: int, save: Callable[..., Any]) -> Callable[..., Any]:
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the cap then fails with EFBIG
    done = [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = save(*args, **kwargs)
        done[0] += 1
        if done[0] == saves:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        return result
    return wrapper


def _install_hooks() -> None:
    import behemoth.train.checkpointing as checkpointing
    import behemoth.train.loop as loop

    loop.machine_matmul_peak = lambda *_: 1e12
    checkpointing.write_model_files = _announcing("model-files", checkpointing.write_model_files)
    checkpointing.write_manifest = _announcing("manifest", checkpointing.write_manifest)
    checkpointing.fsync_tree = _announcing("fsync", checkpointing.fsync_tree)
    checkpointing.prune_checkpoints = _announcing("prune", checkpointing.prune_checkpoints)
    cap = os.environ.get("RELIABILITY_FSIZE_AFTER_SAVES")
    if cap:
        saves, limit = (int(part) for part in cap.split(":"))
        loop.save_checkpoint = _cap_file_size_after(saves, limit, loop.save_checkpoint)


if __name__ == "__main__":
    _install_hooks()
    from behemoth.cli import main

    sys.exit(main(sys.argv[1:]))
