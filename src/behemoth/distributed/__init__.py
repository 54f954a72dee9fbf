"""Multi-process training, applied to the model from outside: mesh (torchrun), expert and data
parallelism (`parallelize`), step collectives, DCP checkpoints. The model knows nothing of it,
and it nothing of training, which reaches it through `train/parallelism.py`. Names are imported
on first use: torch.distributed.checkpoint alone takes most of a second to import.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"consolidate": "checkpoint", "is_sharded_checkpoint": "checkpoint", "DistributedError": "mesh",
            "ParallelMesh": "mesh", "build_mesh": "mesh", "init_from_env": "mesh", "parallelize": "parallelize"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
