"""Mixture-of-Experts FFN: fp32 router, sort-based dispatch, grouped SwiGLU experts, aux losses.

Dispatch (per layer, tokens flattened to [N, D]): the router picks k experts per token; the N*k token-slots are
sorted by expert (stable argsort), the experts run as one grouped matmul over contiguous row ranges
(`torch._grouped_mm` on CUDA bf16, an exact per-expert fallback elsewhere), and the outputs are un-permuted, scaled
by their gates in fp32 and summed over the k slots. No Python loop over experts and no host synchronisation on the
CUDA grouped path; the combine is a gather plus a sum, so it is deterministic.

Aux losses are returned in `MoEAux`, never stored on the module or in globals.

`Router`, `GroupedExperts` and `MoELayer` initialise themselves (`reset_parameters`, PyTorch's convention: normal
weights with `init_std`, expert output projections with `out_init_std`), take `device` / `dtype` like `nn.Linear`,
and work on the meta device: build with `device="meta"`, then `to_empty(device=...)` and `reset_parameters()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ExpertShape

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@dataclass
class MoEAux:
    """What one MoE layer reports besides its output; all tensors stay on the compute device.

    balance_loss: Switch-normalised load-balancing loss (1.0 = perfectly uniform routing, any k).
    z_loss: router z-loss, mean over tokens of logsumexp(logits)^2.
    expert_counts: [E] long, token-slots each expert computed (after capacity dropping; padding excluded).
    dropped_fraction: share of routed token-slots dropped by capacity (0 when dropless).
    router_entropy: mean entropy of the routing distribution (within-group for the prototype router).
    """

    balance_loss: Tensor
    z_loss: Tensor
    expert_counts: Tensor
    dropped_fraction: Tensor
    router_entropy: Tensor


class Router(nn.Module):
    """fp32 router: logits = x W^T + offset, then top-k ("topk") or k-top-1 ("prototype") selection.

    `logit_offset` is a per-expert buffer (zero by default) that expert split/merge uses to keep the softmax mass of
    cloned experts; it is saved with the model. `reset_parameters` draws the weight from N(0, init_std²) and zeroes
    the offset.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, kind: str = "topk",
                 norm_topk: bool = True, init_std: float = 0.02, device: Optional[torch.device | str] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if kind not in ("topk", "prototype"):
            raise ValueError(f"Router kind={kind!r}: must be 'topk' or 'prototype'")
        try:
            ExpertShape(num_experts, top_k, 1).check(kind)
        except ValueError as err:
            raise ValueError(f"Router: {err}") from None
        self.num_experts = num_experts
        self.top_k = top_k
        self.kind = kind
        self.norm_topk = norm_topk
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(num_experts, d_model, device=device, dtype=dtype))
        self.register_buffer("logit_offset", torch.empty(num_experts, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)
        nn.init.zeros_(self.logit_offset)

    def logits(self, x: Tensor) -> Tensor:
        """fp32 router logits [N, E] (a bf16 softmax merges near-ties and flips choices)."""
        dtype = _accumulate_dtype(x.dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.to(dtype), self.weight.to(dtype)) + self.logit_offset.to(dtype)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return (logits [N,E], probs [N,E] or [N,k,E/k], expert ids [N,k], gates [N,k] fp32)."""
        logits = self.logits(x)
        if self.kind == "topk":
            probs = logits.softmax(dim=-1)
            gates, ids = probs.topk(self.top_k, dim=-1)
            if self.norm_topk:
                gates = gates / gates.sum(dim=-1, keepdim=True)
            return logits, probs, ids, gates
        group = self.num_experts // self.top_k
        probs = logits.view(-1, self.top_k, group).softmax(dim=-1)
        gates, local = probs.max(dim=-1)
        ids = local + torch.arange(self.top_k, device=x.device).mul_(group)
        return logits, probs, ids, gates


class GroupedExperts(nn.Module):
    """E SwiGLU experts as 3-D weights: w_gate, w_up [E, d_ff, D]; w_down [E, D, d_ff]. `reset_parameters` draws
    w_gate and w_up from N(0, init_std²) and w_down from N(0, out_init_std²) (default: init_std)."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int, init_std: float = 0.02,
                 out_init_std: Optional[float] = None, device: Optional[torch.device | str] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.init_std = init_std
        self.out_init_std = init_std if out_init_std is None else out_init_std
        factory = {"device": device, "dtype": dtype}
        self.w_gate = nn.Parameter(torch.empty(num_experts, d_ff, d_model, **factory))
        self.w_up = nn.Parameter(torch.empty(num_experts, d_ff, d_model, **factory))
        self.w_down = nn.Parameter(torch.empty(num_experts, d_model, d_ff, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_gate, std=self.init_std)
        nn.init.normal_(self.w_up, std=self.init_std)
        nn.init.normal_(self.w_down, std=self.out_init_std)

    def forward(self, x: Tensor, counts: Tensor, scale: Optional[Tensor] = None) -> Tensor:
        """Apply expert e to its contiguous rows of `x` (rows sorted by expert; `counts[e]` rows each).

        `scale` [M] multiplies each row's hidden activation before the down projection (the routing gate):
        W_down (g·h) = g·W_down h, applied where the tensor is smallest ([M, d_ff] rather than [M, D] in fp32).
        """
        dtype = _compute_dtype(x)
        if _can_group(x, self.w_gate, dtype):
            return self._grouped(x, counts, dtype, scale)
        return self._looped(x, counts, dtype, scale)

    def _grouped(self, x: Tensor, counts: Tensor, dtype: torch.dtype, scale: Optional[Tensor] = None) -> Tensor:
        offs = counts.cumsum(0).to(torch.int32)
        x = x.to(dtype)
        gate = _grouped_mm(x, self.w_gate.to(dtype).transpose(-2, -1), offs=offs)
        up = _grouped_mm(x, self.w_up.to(dtype).transpose(-2, -1), offs=offs)
        hidden = F.silu(gate) * up
        if scale is not None:
            hidden = hidden * scale.to(dtype).unsqueeze(-1)
        return _grouped_mm(hidden, self.w_down.to(dtype).transpose(-2, -1), offs=offs)

    def _looped(self, x: Tensor, counts: Tensor, dtype: torch.dtype, scale: Optional[Tensor] = None) -> Tensor:
        """Exact reference path for CPU / fp32: one matmul chain per expert's row range (syncs the counts)."""
        x = x.to(dtype)
        pieces = []
        start = 0
        for e, n in enumerate(counts.tolist()):
            rows = x[start:start + n]
            h = F.silu(rows @ self.w_gate[e].to(dtype).t()) * (rows @ self.w_up[e].to(dtype).t())
            if scale is not None:
                h = h * scale[start:start + n].to(dtype).unsqueeze(-1)
            start += n
            pieces.append(h @ self.w_down[e].to(dtype).t())
        if not pieces:
            return x.new_zeros(x.shape)
        return torch.cat(pieces, dim=0)


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for low-precision inputs, the input's own dtype for fp32/fp64 (so fp64 checks stay exact)."""
    return torch.promote_types(dtype, torch.float32)


def _compute_dtype(x: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _can_group(x: Tensor, weight: Tensor, dtype: torch.dtype) -> bool:
    """grouped_mm needs CUDA, bf16, SM80+ and 16-byte aligned rows (dims multiple of 8)."""
    if _grouped_mm is None or not x.is_cuda or dtype != torch.bfloat16:
        return False
    if torch.cuda.get_device_capability(x.device)[0] < 8:
        return False
    return weight.shape[-1] % 8 == 0 and weight.shape[-2] % 8 == 0


def expert_capacity(capacity_factor: float, num_tokens: Tensor, top_k: int, num_experts: int) -> Tensor:
    """Slots per expert, ceil(cf * tokens * k / E): Switch's formula generalised to top-k (DeepSpeed).

    Computed in integers with cf as the nearest fraction p/q (q <= 10^6), so 1.5 * 25 * 2 / 5 is exactly 15 (a float
    product gives 15.000001 and a capacity of 16). Stays on the tokens' device (no host sync).
    """
    ratio = max(Fraction(capacity_factor).limit_denominator(10**6), Fraction(1, 10**6))
    numerator = num_tokens.long() * (top_k * ratio.numerator)
    denominator = num_experts * ratio.denominator
    return torch.div(numerator + (denominator - 1), denominator, rounding_mode="floor")


class MoELayer(nn.Module):
    """Sparse SwiGLU FFN with top-k or k-top-1 (prototype) routing; forward(x [B,T,D]) -> (y, MoEAux).

    Dropless by default; with `capacity_factor`, each expert keeps at most ceil(cf*N*k/E) token-slots, first
    choices before second choices and earlier tokens first (GShard priority); a dropped slot contributes nothing
    (the residual carries the token). Padding tokens (`token_mask` False) are computed but excluded from the
    statistics, the aux losses and the capacity count.

    `segments` records how many pieces `segment_experts` cut each original expert into (1 = never segmented), so
    `merge_experts` knows the layout it has to undo; it does not change the forward.
    Initialised on construction (`reset_parameters`: router, then experts; see `Router` and `GroupedExperts`).
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int, top_k: int, router: str = "topk",
                 capacity_factor: Optional[float] = None, norm_topk: bool = True, segments: int = 1,
                 init_std: float = 0.02, out_init_std: Optional[float] = None,
                 device: Optional[torch.device | str] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if router not in ("topk", "prototype"):
            raise ValueError(f"MoELayer router={router!r}: must be 'topk' or 'prototype'")
        try:
            ExpertShape(num_experts, top_k, d_ff, segments).check(router)
        except ValueError as err:
            raise ValueError(f"MoELayer: {err}") from None
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"MoELayer capacity_factor={capacity_factor}: must be > 0 or None")
        self.num_experts = num_experts
        self.top_k = top_k
        self.segments = segments
        self.capacity_factor = capacity_factor
        factory = {"device": device, "dtype": dtype}
        self.router = Router(d_model, num_experts, top_k, router, norm_topk, init_std, **factory)
        self.experts = GroupedExperts(num_experts, d_model, d_ff, init_std, out_init_std, **factory)
        # set by expert_parallel.shard_experts: the experts then hold this rank's slice and run over its group
        self.expert_parallel: Optional[Any] = None

    def reset_parameters(self) -> None:
        """Router weight, then w_gate, w_up, w_down (this order is part of M6Model's seeded initialisation)."""
        self.router.reset_parameters()
        self.experts.reset_parameters()

    @property
    def router_kind(self) -> str:
        return self.router.kind

    def forward(self, x: Tensor, token_mask: Optional[Tensor] = None) -> tuple[Tensor, MoEAux]:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        n, k, num_experts = x2.shape[0], self.top_k, self.num_experts
        valid = (torch.ones(n, device=x.device, dtype=torch.bool) if token_mask is None
                 else token_mask.reshape(-1).to(torch.bool))
        logits, probs, ids, gates = self.router(x2)

        flat = ids.reshape(-1)
        sorted_ids, order = torch.sort(flat, stable=True)
        bounds = torch.searchsorted(sorted_ids, torch.arange(num_experts + 1, device=x.device, dtype=flat.dtype))
        counts = bounds[1:] - bounds[:-1]
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=x.device)
        slot_valid = valid.unsqueeze(1).expand(n, k).reshape(-1)
        keep = slot_valid
        if self.capacity_factor is not None:
            keep = slot_valid & (self._slot_positions(ids, valid) < expert_capacity(
                self.capacity_factor, valid.sum(), k, num_experts))
            gates = gates * keep.view(n, k)

        rows = _DispatchRows.apply(x2, order, inverse, k)
        if self.expert_parallel is None:
            out_sorted = self.experts(rows, counts, gates.reshape(-1)[order])
        else:
            out_sorted = self.expert_parallel.run_experts(self.experts, rows, counts, gates.reshape(-1)[order])
        y = _PermuteRows.apply(out_sorted, inverse, order).view(n, k, -1).sum(dim=1, dtype=_accumulate_dtype(x.dtype))
        y = y.to(x.dtype)

        routed = _segment_sums(slot_valid[order], bounds)
        kept = routed if keep is slot_valid else _segment_sums(keep[order], bounds)
        aux = self._aux(logits, probs, valid, routed, kept)
        return y.view(shape), aux

    def _slot_positions(self, ids: Tensor, valid: Tensor) -> Tensor:
        """Position of each (token, choice) slot in its expert's queue, in GShard priority (choice-major, then
        token order); padding slots queue last. Returns [N*k] in token-major order."""
        n, k = ids.shape
        priority_ids = ids.t().reshape(-1)
        slot_valid = valid.unsqueeze(0).expand(k, n).reshape(-1)
        key = priority_ids + (~slot_valid).long() * self.num_experts
        order = torch.argsort(key, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=ids.device)
        per_key = torch.zeros(2 * self.num_experts, device=ids.device, dtype=torch.long)
        per_key.scatter_add_(0, key, torch.ones_like(key))
        starts = per_key.cumsum(0) - per_key
        position = rank - starts[key]
        return position.view(k, n).t().reshape(-1)

    def _aux(self, logits: Tensor, probs: Tensor, valid: Tensor, routed: Tensor, kept: Tensor) -> MoEAux:
        weight = valid.float()
        lse = torch.logsumexp(logits, dim=-1)
        k = self.top_k
        if self.router.kind == "topk":
            prob_sum = (probs * weight.unsqueeze(-1)).sum(0)
            entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1)
        else:
            prob_sum = (probs * weight.view(-1, 1, 1)).sum(0)
            entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1).mean(-1)
        sums = [weight.sum(), (lse.square() * weight).sum(), (entropy * weight).sum(), prob_sum, routed, kept]
        if self.expert_parallel is not None:  # statistics of the expert-parallel group's global batch
            sums = _all_reduce_sums(sums, self.expert_parallel)
        n_valid, z_sum, entropy_sum, prob_sum, routed, kept = sums
        n_valid = n_valid.clamp(min=1.0)
        z_loss = z_sum / n_valid
        mean_prob = prob_sum / n_valid
        if self.router.kind == "topk":
            assign = routed.float() / (n_valid * k)
            balance = self.num_experts * (assign * mean_prob).sum()
        else:
            group = self.num_experts // k
            assign = routed.float().view(k, group) / n_valid
            balance = group * (assign * mean_prob).sum(-1).mean()
        entropy = entropy_sum / n_valid
        total = routed.sum().clamp(min=1)
        dropped = 1.0 - kept.sum().float() / total.float()
        return MoEAux(balance_loss=balance, z_loss=z_loss, expert_counts=kept, dropped_fraction=dropped,
                      router_entropy=entropy)


def _all_reduce_sums(sums: list[Tensor], expert_parallel: Any) -> list[Tensor]:
    """Sum the routing statistics over the expert-parallel group in one (differentiable) fp64 all-reduce; fp64
    keeps token counts exact."""
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in sums])
    flat = expert_parallel.all_reduce(flat)
    out = []
    start = 0
    for t in sums:
        out.append(flat[start:start + t.numel()].view(t.shape).to(t.dtype))
        start += t.numel()
    return out


class _DispatchRows(torch.autograd.Function):
    """rows = x[order // k] (each token copied to its k expert slots, sorted by expert) with a deterministic
    backward: gather the slot gradients back to token-major order and sum the k copies (no atomics)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, order: Tensor, inverse: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, order // k)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], None, None, None]:
        (inverse,) = ctx.saved_tensors
        per_token = grad.index_select(0, inverse).view(-1, ctx.k, grad.shape[-1])
        return per_token.sum(dim=1, dtype=_accumulate_dtype(grad.dtype)).to(grad.dtype), None, None, None


class _PermuteRows(torch.autograd.Function):
    """out = src[index] for a permutation `index`, whose backward is the gather by the inverse permutation
    (autograd's default for index_select is an atomic index_add, slow in bf16 and non-deterministic)."""

    @staticmethod
    def forward(ctx: Any, src: Tensor, index: Tensor, inverse_index: Tensor) -> Tensor:
        ctx.save_for_backward(inverse_index)
        return src.index_select(0, index)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (inverse_index,) = ctx.saved_tensors
        return grad.index_select(0, inverse_index), None, None


def _segment_sums(flags_sorted: Tensor, bounds: Tensor) -> Tensor:
    """Per-expert count of True flags, given flags in expert-sorted order and the experts' [E+1] row bounds."""
    csum = F.pad(flags_sorted.long().cumsum(0), (1, 0))
    return csum[bounds[1:]] - csum[bounds[:-1]]


def init_moe_(layer: MoELayer, std: float, out_std: float) -> None:
    """Re-initialise `layer` with other standard deviations (weights `std`, expert output projections `out_std`):
    records them on the layer and calls its `reset_parameters`."""
    layer.router.init_std = layer.experts.init_std = std
    layer.experts.out_init_std = out_std
    layer.reset_parameters()

