"""Expert parallelism: the routed experts of each MoE layer are split over the "ep" ranks, and
tokens travel to the rank holding their expert and back.

Each rank routes its own tokens, sorts the slots by expert, exchanges per-expert counts, sends
each rank the slots of its experts (an uneven all-to-all whose backward is the reverse exchange),
runs `grouped_experts` on them regrouped by local expert, and sends the outputs back to be summed
per token. Within an expert, slots arrive by source rank, then token: the order of one process
holding the whole batch. The weights are DTensors sharded on dim 0 over "ep", so state dicts see
whole [E, ...] tensors under their Hugging Face names.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from behemoth.model import Transformer
from behemoth.model.moe import Experts, combine, grouped_experts, sort_by_expert


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over rows with uneven splits; the backward sends gradients back."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, output_splits: list[int], input_splits: list[int],
                group: dist.ProcessGroup) -> torch.Tensor:
        ctx.splits, ctx.group = (output_splits, input_splits), group
        return _exchange(rows, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        output_splits, input_splits = ctx.splits
        return _exchange(grad, input_splits, output_splits, ctx.group), None, None, None


class _ScaleGradient(torch.autograd.Function):
    """The identity, whose backward multiplies the gradient by `factor`."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def _exchange(rows: torch.Tensor, output_splits: list[int], input_splits: list[int],
              group: dist.ProcessGroup) -> torch.Tensor:
    out = rows.new_empty((sum(output_splits), *rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), output_splits, input_splits, group=group)
    return out


class ExpertParallelExperts(nn.Module):
    """Drop-in replacement for `Experts` holding E / ep experts per rank, with `Experts`' parameter
    names and global shapes."""

    def __init__(self, experts: Experts, ep_mesh: DeviceMesh):
        super().__init__()
        self.num_experts = experts.num_experts
        self.ep_size = ep_mesh.size()
        self.local_experts = self.num_experts // self.ep_size
        self.group = ep_mesh.get_group()
        # Every rank built the same full weights (same seed or same file), so each one takes its
        # slice locally (src_data_rank=None): no broadcast needed.
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name).detach()
            shard = distribute_tensor(full, ep_mesh, [Shard(0)], src_data_rank=None)
            self.register_parameter(name, nn.Parameter(shard))

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """x [tokens, hidden]; expert_ids, gates [tokens, top_k] -> summed expert outputs [tokens, hidden];
        every rank of the ep group calls this together."""
        routed_in, token_of_slot, counts = sort_by_expert(x, expert_ids, gates, self.num_experts)
        sent, received = self._counts(counts)
        send_per_rank = [sum(row) for row in sent]
        receive_per_rank = [sum(row) for row in received]
        arrived = _AllToAll.apply(routed_in, receive_per_rank, send_per_rank, self.group)
        by_expert, local_counts, block_sizes = self._group_by_expert(arrived, received)
        # An expert's gradient sums the tokens of every ep rank, each rank's loss a mean over its own
        # share: dividing by the ep size here (and by the replicas in FSDP's reduction) gives the
        # mean over the whole batch.
        gate_up, down = (_ScaleGradient.apply(weight.to_local(), 1 / self.ep_size)
                         for weight in (self.gate_up_proj, self.down_proj))
        outputs = grouped_experts(by_expert, local_counts, gate_up, down,
                                  skip_empty=False)  # an expert with no tokens still gets a (zero) gradient
        returned = self._group_by_source(outputs, block_sizes)
        routed_out = _AllToAll.apply(returned, send_per_rank, receive_per_rank, self.group)
        return combine(x, token_of_slot, routed_out)

    def _counts(self, counts: torch.Tensor) -> tuple[list[list[int]], list[list[int]]]:
        """(slots this rank sends, per destination rank and local expert there;
        slots it receives, per source rank and local expert here), as [ep][local] lists."""
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=self.group)  # equal splits: local_experts each
        # The layer's one host sync: split sizes must be known on the host.
        both = torch.stack([counts, received]).view(2, self.ep_size, self.local_experts).tolist()
        return both[0], both[1]

    def _group_by_expert(self, arrived: torch.Tensor, received: list[list[int]]
                         ) -> tuple[torch.Tensor, list[int], list[int]]:
        """Arrived slots are grouped by source rank, then local expert; the experts need them grouped
        by local expert, then source rank. Returns (regrouped, slots per local expert, block sizes
        in expert-major order)."""
        blocks = arrived.split([n for row in received for n in row])
        order = [source * self.local_experts + e for e in range(self.local_experts) for source in range(self.ep_size)]
        local_counts = [sum(received[source][e] for source in range(self.ep_size)) for e in range(self.local_experts)]
        return torch.cat([blocks[i] for i in order]), local_counts, [blocks[i].shape[0] for i in order]

    def _group_by_source(self, outputs: torch.Tensor, block_sizes: list[int]) -> torch.Tensor:
        """The inverse of `_group_by_expert`'s regrouping."""
        blocks = outputs.split(block_sizes)
        order = [e * self.ep_size + source for source in range(self.ep_size) for e in range(self.local_experts)]
        return torch.cat([blocks[i] for i in order])


def apply_expert_parallel(model: Transformer, ep_mesh: DeviceMesh) -> None:
    """Replace the routed experts of every MoE layer by their expert-parallel version, in place."""
    for layer in model.model.layers:
        if layer.is_moe:
            layer.feed_forward.experts = ExpertParallelExperts(layer.feed_forward.experts, ep_mesh)
