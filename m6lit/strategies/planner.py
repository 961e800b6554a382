"""OffloadPlan: which modules live in host memory, and what the GPU and the host need for it.

Two ways to choose: `offload` patterns over module names (`m6lit.strategies.patterns`: globs plus integer ranges,
`model.blocks.[4-11]`, `*.experts`), or a `gpu_memory_budget` for which `plan_offload` keeps embeddings, head, norms
and the first and last layers' blocks resident and streams the other blocks, dense before MoE and every other layer
first (so a prefetch can run ahead across the resident block in between), until the estimate
(`m6lit.strategies.estimate`) fits. Shapes only, so it works on the meta device
(`m6lit plan --config configs/m6-10t.yaml --gpu_memory_budget 80GB --num_gpus 512`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from m6lit.strategies.estimate import (
    PRECISIONS,
    MemoryEstimate,
    Row,
    apply_units,
    estimate,
    find_config,
    measure_rows,
)
from m6lit.strategies.patterns import resolve_offload
from m6lit.strategies.plan_table import plan_table
from m6lit.strategies.sizes import format_bytes, format_count, parse_bytes


@dataclass
class OffloadPlan:
    """A placement (`offload`: the module names that live in host memory) with its rows and memory estimate."""

    offload: list[str]
    rows: list[Row]
    estimate: MemoryEstimate
    gpu_memory_budget: int | None = None
    host_memory_budget: int | None = None
    config: Any = None
    num_gpus: int = 1

    def table(self) -> str:
        """The placement and the memory estimate as text (`m6lit.strategies.plan_table`)."""
        return plan_table(self)


def _interleave_order(rows: Sequence[Row]) -> list[Row]:
    """Offload order: dense blocks before MoE blocks (MoE experts do k/E of the FLOPs per byte), odd layers before
    even ones (every other block first, so prefetch can run ahead across a resident block)."""
    return sorted(rows, key=lambda r: (r.is_moe, min(r.layers or [0]) % 2 == 0, min(r.layers or [0])))


def plan_offload(root: nn.Module, gpu_memory_budget: int | str | None = None,
                 offload: Sequence[str] | None = None, *, precision: str = "bf16-mixed",
                 micro_batch_tokens: int = 8192, prefetch: int = 1, optimizer_state_bytes: int = 8,
                 accumulate_grad_batches: int = 1, host_memory_budget: int | str | None = None,
                 num_gpus: int = 1, reserve_bytes: int = 2 * 2**30, host_layout: str = "engine") -> OffloadPlan:
    """Placement for `root` (a LightningModule or any module; meta tensors are fine) from `offload` patterns or a
    `gpu_memory_budget`, with its memory estimate. Raises ValueError when the budget cannot hold even the resident
    minimum (everything but the streamable blocks, plus the first and last layers' blocks) or the host budget is
    exceeded."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: offload supports {PRECISIONS}")
    if offload is not None and gpu_memory_budget is not None:
        raise ValueError("give either offload patterns or gpu_memory_budget, not both")
    rows = measure_rows(root, precision, num_gpus)
    config = find_config(root)
    buffers = sum(b.numel() * b.element_size() for b in root.buffers())
    kwargs: dict[str, Any] = {"precision": precision, "micro_batch_tokens": micro_batch_tokens, "prefetch": prefetch,
                              "optimizer_state_bytes": optimizer_state_bytes,
                              "accumulate_grad_batches": accumulate_grad_batches, "reserve_bytes": reserve_bytes,
                              "buffer_bytes": buffers, "host_layout": host_layout}
    budget = parse_bytes(gpu_memory_budget) if gpu_memory_budget is not None else None
    host_budget = parse_bytes(host_memory_budget) if host_memory_budget is not None else None
    if offload is not None:
        names = resolve_offload(root, list(offload))
        rows = apply_units(root, rows, names, precision, num_gpus)
    elif budget is not None:
        names = _fit(rows, budget, config, kwargs)
    else:
        names = []
    est = estimate(rows, config, **kwargs)
    if host_budget is not None and est.host_total > host_budget:
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in est.host.items() if v)
        raise ValueError(f"host_memory_budget={format_bytes(host_budget)} is exceeded by "
                         f"{format_bytes(est.host_total - host_budget)}: the offloaded "
                         f"{format_count(est.offloaded_params)} parameters need {format_bytes(est.host_total)} of host "
                         f"memory ({parts}); offload fewer modules or raise the host budget (nothing was allocated)")
    return OffloadPlan(offload=names, rows=rows, estimate=est, gpu_memory_budget=budget,
                       host_memory_budget=host_budget, config=config, num_gpus=num_gpus)


def _fit(rows: list[Row], budget: int, config: Any, kwargs: dict[str, Any]) -> list[str]:
    blocks = [r for r in rows if r.is_block]
    for row in rows:
        row.offloaded = False
    if estimate(rows, config, **kwargs).gpu_total <= budget:
        return []
    if blocks:
        first = min(blocks, key=lambda r: min(r.layers or [0]))
        last = max(blocks, key=lambda r: max(r.layers or [0]))
        keep = {first.name, last.name}
    else:
        keep = set()
    candidates = _interleave_order([r for r in blocks if r.name not in keep])
    for row in candidates:
        row.offloaded = True
    minimum = estimate(rows, config, **kwargs)
    if minimum.gpu_total > budget:
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in minimum.gpu.items() if v)
        raise ValueError(f"gpu_memory_budget={format_bytes(budget)} is too small even for the resident minimum "
                         f"(embeddings, head, norms and the first and last layers' blocks on the GPU, every other "
                         f"block streamed): {format_bytes(minimum.gpu_total)} needed ({parts}); raise the budget or "
                         f"use smaller micro-batches")
    for row in candidates:
        row.offloaded = False
    for row in candidates:
        row.offloaded = True
        if estimate(rows, config, **kwargs).gpu_total <= budget:
            break
    return [r.name for r in rows if r.offloaded]


__all__ = ["OffloadPlan", "plan_offload"]
