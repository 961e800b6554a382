"""The placement table `m6lit plan` and the offload strategy print: one line per block run or module, then the
memory estimate per GPU and host and the time a step's transfers, host AdamW and compute take at assumed rates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from m6lit.strategies.estimate import Row, active_params
from m6lit.strategies.sizes import format_bytes, format_count

if TYPE_CHECKING:
    from m6lit.strategies.planner import OffloadPlan

PCIE_BYTES_PER_S = 55e9
CPU_ADAM_PARAMS_PER_S = 4.26e9
ASSUMED_FLOPS = 400e12


def plan_table(plan: OffloadPlan) -> str:
    """The placement and the memory estimate as text (consecutive blocks of one placement share a line)."""
    header = (f"{'module':<34} {'placement':<9} {'params':>9} {'GPU bytes':>11} {'host bytes':>11} "
              f"{'PCIe/step':>11}")
    lines = [header]
    est = plan.estimate
    for group in _group_rows(plan.rows):
        first = group[0]
        name = first.name if len(group) == 1 else _range_name(group)
        numel = sum(r.numel for r in group)
        where = "host" if first.offloaded else "GPU"
        size = sum(est.row_bytes(r) for r in group)
        gpu_b, host_b = (0, size) if first.offloaded else (size, 0)
        pcie = sum(r.stream_bytes * (2 * r.runs + 1) for r in group) * est.micro_batches if first.offloaded else 0
        lines.append(f"{name:<34} {where:<9} {format_count(numel):>9} {_fb(gpu_b):>11} {_fb(host_b):>11} "
                     f"{_fb(pcie):>11}")
    total = est.resident_params + est.offloaded_params
    lines.append(f"parameters: {format_count(total)} ({format_count(est.resident_params)} on the GPU, "
                 f"{format_count(est.offloaded_params)} in host memory)"
                 + (f"; per GPU with experts split over {plan.num_gpus} GPUs" if plan.num_gpus > 1 else ""))
    lines.append("GPU memory estimate per GPU: " + ", ".join(f"{k} {format_bytes(v)}" for k, v in est.gpu.items()
                                                              if v) + f" = {format_bytes(est.gpu_total)}"
                 + (f" (budget {format_bytes(plan.gpu_memory_budget)})" if plan.gpu_memory_budget else ""))
    if est.offloaded_params:
        lines.append("host memory estimate per GPU: " + ", ".join(f"{k} {format_bytes(v)}" for k, v in
                                                                   est.host.items() if v)
                     + f" = {format_bytes(est.host_total)}, of which pinned {format_bytes(est.pinned)}"
                     + (f" (budget {format_bytes(plan.host_memory_budget)})" if plan.host_memory_budget else ""))
    else:
        lines.append("host memory estimate per GPU: nothing offloaded")
    if est.offloaded_params:
        lines.append(_timing(plan))
    return "\n".join(lines)


def _timing(plan: OffloadPlan) -> str:
    """PCIe, host AdamW and compute time per optimizer step, at the assumed rates."""
    est = plan.estimate
    h2d_s = est.h2d_per_step / PCIE_BYTES_PER_S
    d2h_s = est.d2h_per_step / PCIE_BYTES_PER_S
    opt_s = est.offloaded_params / CPU_ADAM_PARAMS_PER_S
    text = (f"PCIe per optimizer step: {format_bytes(est.h2d_per_step)} H2D ({h2d_s:.3f} s at 55 GB/s), "
            f"{format_bytes(est.d2h_per_step)} D2H ({d2h_s:.3f} s); CPU AdamW on "
            f"{format_count(est.offloaded_params)} params ≈ {opt_s:.3f} s at 4.26 G params/s")
    if plan.config is not None:
        flops = 6 * active_params(plan.config, plan.rows) * est.tokens
        compute_s = flops / ASSUMED_FLOPS
        text += (f"; compute ≈ {compute_s:.3f} s at an assumed 400 TFLOP/s ({format_count(est.tokens)} tokens "
                 f"per step): streaming is {'hidden' if h2d_s <= compute_s else 'NOT hidden'} behind compute")
    return text


def _fb(n: float) -> str:
    return format_bytes(n) if n else "-"


def _group_rows(rows: Sequence[Row]) -> list[list[Row]]:
    groups: list[list[Row]] = []
    for row in rows:
        prev = groups[-1][-1] if groups else None
        if (prev is not None and row.is_block and prev.is_block and row.offloaded == prev.offloaded
                and row.numel == prev.numel and row.is_moe == prev.is_moe):
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


def _range_name(group: Sequence[Row]) -> str:
    prefix = group[0].name.rsplit(".", 1)[0]
    idx = [int(r.name.rsplit(".", 1)[1]) for r in group]
    return f"{prefix}.[{idx[0]}-{idx[-1]}]"


__all__ = ["plan_table"]
