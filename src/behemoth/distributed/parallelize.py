"""`parallelize(model, mesh, config)`: spread a built model over the ranks, from outside it.

Expert parallelism first, then data parallelism bottom-up: FSDP2 with one unit per decoder layer
and the root holding embeddings, final norm and LM head (expert-parallel weights are their own
unit on "dp_mod_ep", as "ep" already splits them); or DDP (`replicate`), cheaper for models that
fit one device. Parameter names do not change.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard

from behemoth.distributed.config import ParallelConfig
from behemoth.distributed.expert_parallel import ExpertParallelExperts, apply_expert_parallel
from behemoth.distributed.mesh import ParallelMesh
from behemoth.model import Transformer


def parallelize(model: Transformer, mesh: ParallelMesh, config: ParallelConfig) -> Transformer:
    """Apply expert and data parallelism to `model` in place (it must be identical on every rank)."""
    model.to(mesh.device)
    if mesh.expert_parallel > 1:
        apply_expert_parallel(model, mesh.ep)
    if config.data_parallel == "fsdp":
        _apply_fsdp(model, mesh)
    else:
        _apply_ddp(model, mesh)
    return model


def _apply_fsdp(model: Transformer, mesh: ParallelMesh) -> None:
    for layer in model.model.layers:
        experts = getattr(layer.feed_forward, "experts", None)
        if isinstance(experts, ExpertParallelExperts):
            _shard_experts(experts, mesh)
        fully_shard(layer, mesh=mesh.dp)
    fully_shard(model, mesh=mesh.dp)


def _shard_experts(experts: ExpertParallelExperts, mesh: ParallelMesh) -> None:
    """FSDP over the ranks that hold the same experts ("dp_mod_ep")."""
    ranks = mesh.dp_mod_ep.size()

    def placement(param: nn.Parameter) -> Shard:
        # Dim 0 (local experts) when it splits evenly, else dim 1 (hidden / intermediate size):
        # uneven expert shards would pad whole experts.
        return Shard(0) if experts.local_experts % ranks == 0 else Shard(1)

    # FSDP averages the gradients over the dp_mod_ep ranks; the experts' forward divides them by
    # the ep ranks (not set_gradient_divide_factor: in torch 2.13 it divides twice for float64
    # gradients on a one-rank mesh, as dp_mod_ep is when ep spans every rank).
    fully_shard(experts, mesh=mesh.dp_mod_ep, shard_placement_fn=placement)


def _apply_ddp(model: Transformer, mesh: ParallelMesh) -> None:
    from torch.distributed._composable.replicate_with_fsdp import replicate

    for layer in model.model.layers:
        replicate(layer, mesh=mesh.dp)
    replicate(model, mesh=mesh.dp)
