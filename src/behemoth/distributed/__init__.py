"""Multi-process training, applied to the model from outside: launch (torchrun), mesh, expert and
data parallelism, distributed checkpoints. The model code knows nothing of it, and this package
nothing of training: the loop reaches it through `train/parallelism.py`.

    config.py           ParallelConfig, the [parallel] settings
    mesh.py             process group from torchrun's environment; the ("dp_mod_ep", "ep") mesh
    expert_parallel.py  routed experts split over "ep" ranks; tokens travel by all-to-all
    parallelize.py      parallelize(model, mesh, config): expert parallel, then FSDP2 or DDP
    step.py             batch sharding, step all-reduce, gradient clipping across meshes
    checkpoint.py       DCP checkpoints (save, resume on any world size, consolidate for release)

Names are imported on first use: torch.distributed.checkpoint alone takes most of a second to
import, which single-process runs should not pay.
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
