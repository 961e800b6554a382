"""Expert parallelism for MoELayer: each rank of a process group holds a contiguous slice of the experts.

Per layer and step (tokens stay data-parallel; the router is replicated):
1. the layer routes and sorts its local token-slots by global expert id (as without EP), so the rows bound for
   each rank are contiguous;
2. per-expert counts are exchanged with one equal-split `all_to_all_single`, then the per-rank totals are read on
   the host — the one host sync per layer that variable splits need;
3. the rows (and their gates) go to the experts' owners with a differentiable `all_to_all_single`
   (`torch.distributed.nn.functional`), are regrouped from source-major to expert-major order, run through the
   local grouped experts (the same dropless grouped GEMM / exact fallback), and come back the same way.
Every rank runs every collective and the expert path even with no tokens, so the autograd graphs stay aligned.

Routing statistics (balance loss, z-loss, counts, entropy) are summed over the group with one differentiable
all-reduce, so the losses equal the single-process values over the group's global batch; their gradient reaches
each rank's local router probabilities scaled as data-parallel averaging expects (the all-reduce's backward sums).
Pure torch.distributed; nothing here knows Lightning.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn

from .moe import GroupedExperts, MoELayer, _PermuteRows

EXPERT_PARAMS = ("w_gate", "w_up", "w_down")

# torch 2.13 marks these autograd-aware collectives deprecated in favour of functional collectives, which have no
# differentiable all-reduce yet; they remain the library's own differentiable all-to-all and all-reduce
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_(to_all_single|reduce) is "
                        r"deprecated", category=FutureWarning)


class ExpertParallel:
    """Runs one MoELayer's local experts over `group`; the layer keeps `num_experts` global experts of which this
    rank holds rows [start, stop) of the expert weights."""

    def __init__(self, group: Any, num_experts: int) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if num_experts % self.size:
            raise ValueError(f"expert parallel: num_experts={num_experts} is not divisible by the expert-parallel "
                             f"size {self.size}")
        self.num_experts = num_experts
        self.num_local = num_experts // self.size

    @property
    def start(self) -> int:
        return self.rank * self.num_local

    @property
    def stop(self) -> int:
        return self.start + self.num_local

    def __deepcopy__(self, memo: dict) -> "ExpertParallel":
        # a cloned layer (delink) runs over the same group with the same expert slice
        return self

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """Sum over the group; differentiable (the backward sums the gradients, as data-parallel averaging needs)."""
        if tensor.requires_grad:
            return dist_fn.all_reduce(tensor, group=self.group)
        out = tensor.clone()
        dist.all_reduce(out, group=self.group)
        return out

    def run_experts(self, experts: GroupedExperts, rows: Tensor, counts: Tensor, scale: Optional[Tensor]) -> Tensor:
        """Expert outputs for `rows` [M, D] (sorted by global expert, `counts` [E] rows each), computed by the
        experts' owners; returns [M, D] in the same order."""
        if counts.numel() != self.num_experts:
            raise ValueError(f"expert parallel: the router produced counts for {counts.numel()} experts, the layer "
                             f"was sharded for {self.num_experts}; re-shard after changing the experts")
        send_counts = counts.view(self.size, self.num_local)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        splits = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()  # the one host sync per layer
        send_splits, recv_splits = splits
        received = sum(recv_splits)
        x = _exchange(rows, received, recv_splits, send_splits, self.group)
        gate = None if scale is None else _exchange(scale, received, recv_splits, send_splits, self.group)
        # received rows are source-major ([source][local expert]); the experts want expert-major order
        expert_of_row = torch.arange(self.num_local, device=rows.device).repeat(self.size)
        expert_of_row = expert_of_row.repeat_interleave(recv_counts.reshape(-1), output_size=received)
        order = torch.argsort(expert_of_row, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=rows.device)
        x = _PermuteRows.apply(x, order, inverse)
        if gate is not None:
            gate = _PermuteRows.apply(gate, order, inverse)
        out = experts(x, recv_counts.sum(0), gate)
        out = _PermuteRows.apply(out, inverse, order)
        return _exchange(out, rows.shape[0], send_splits, recv_splits, self.group)


def _exchange(t: Tensor, rows_out: int, out_splits: list[int], in_splits: list[int], group: Any) -> Tensor:
    """Differentiable variable-split all-to-all along dim 0."""
    out = t.new_empty((rows_out, *t.shape[1:]))
    return dist_fn.all_to_all_single(out, t.contiguous(), output_split_sizes=out_splits,
                                     input_split_sizes=in_splits, group=group)


def moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]


@torch.no_grad()
def shard_experts(model: nn.Module, group: Any) -> list[str]:
    """Keep only this rank's slice of every MoELayer's experts (full weights in, local rows out) and attach the
    expert-parallel runner. Returns the names of the expert parameters (local now). Idempotent for layers that are
    already sharded over `group`."""
    names = []
    for name, layer in moe_layers(model):
        ep = layer.expert_parallel
        if ep is None or ep.num_experts != layer.num_experts or ep.group is not group:
            if ep is not None:
                raise RuntimeError(f"{name}: its experts are sharded for {ep.num_experts} experts; gather them "
                                   f"(gather_experts) before re-sharding")
            ep = ExpertParallel(group, layer.num_experts)
            for pname in EXPERT_PARAMS:
                full = getattr(layer.experts, pname)
                if full.shape[0] != layer.num_experts:
                    raise ValueError(f"{name}.experts.{pname} has {full.shape[0]} experts, the layer "
                                     f"{layer.num_experts}")
                setattr(layer.experts, pname, nn.Parameter(full[ep.start:ep.stop].clone(),
                                                           requires_grad=full.requires_grad))
            layer.expert_parallel = ep
        names.extend(f"{name}.experts.{p}" if name else f"experts.{p}" for p in EXPERT_PARAMS)
    return names



def gather_expert_tensor(local: Tensor, ep: ExpertParallel) -> Tensor:
    """Full [E, ...] tensor from every rank's [E/ep, ...] slice (a collective: all ranks call it in the same order)."""
    parts = [torch.empty_like(local) for _ in range(ep.size)]
    dist.all_gather(parts, local.contiguous(), group=ep.group)
    return torch.cat(parts, dim=0)


def expert_slice(full: Tensor, ep: ExpertParallel) -> Tensor:
    """This rank's rows of a full [E, ...] expert tensor (a checkpoint written at any expert-parallel size)."""
    if full.shape[0] != ep.num_experts:
        raise ValueError(f"expert tensor has {full.shape[0]} experts; the layer is sharded for {ep.num_experts}")
    return full[ep.start:ep.stop]


__all__ = ["EXPERT_PARAMS", "ExpertParallel", "expert_slice", "gather_expert_tensor", "moe_layers",
           "shard_experts"]
