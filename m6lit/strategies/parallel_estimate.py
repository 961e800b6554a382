"""Per-rank memory and step time of the many-GPU strategies, from parameter shapes only (works on the meta device).

Strategies, by their registered names:
- `ddp`: a full replica per rank (the single-device resident estimate) plus DDP's gradient buckets (a copy of the
  fp32 gradients).
- `m6_offload_ddp`: per rank what the single-device offload holds for the same offloaded units (the host engine's
  layout, `m6lit.strategies.estimate.estimate`), plus gradient all-reduce buffers: DDP's buckets for the resident
  gradients and, for the offloaded units, two units' gradients in the reduce dtype (one reducing, one landing).
- `m6_fsdp`: parameters (fp32), gradients (fp32) and optimizer state sharded over the ranks; per rank also the
  gathered working copies in the compute dtype (the root, which FSDP2 keeps gathered between forward and
  backward, plus two blocks: the one running and the one prefetched) and one block's plus the root's unsharded
  gradients before their reduce-scatter. With `offload` (FSDP2's `CPUOffloadPolicy` per block) the named units'
  shards, gradients and optimizer step live on the host instead.
- `m6_ep`: dense parameters replicated under DDP (with its buckets), the experts of every MoE layer split over
  `ep` ranks, plus the all-to-all buffers of one MoE layer (dispatched rows and their outputs, sent and received).
Activations, logits, buffers and the CUDA context are the single-device estimate's (per rank tokens).

Step time per optimizer step, each term at an assumed rate (the rates are arguments): compute = 6 (8 with
activation recomputation) × active parameters × tokens / FLOP/s; collectives at a per-GPU bandwidth in the
bus-bandwidth convention (ring all-reduce moves 2(N−1)/N of the bytes, all-gather and reduce-scatter (N−1)/N,
all-to-all (e−1)/e); PCIe and the host AdamW as the single-device plan counts them. The step is reported as a range:
every term overlapped (the largest) to none overlapped (the sum).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from torch import nn

from m6lit.model.moe import MoELayer
from m6lit.strategies.estimate import active_params, apply_units, estimate, find_config, measure_rows

STRATEGIES = ("ddp", "m6_offload_ddp", "m6_fsdp", "m6_fsdp+offload", "m6_ep")
PCIE_BYTES_PER_S = 55e9
CPU_ADAM_PARAMS_PER_S = 4.26e9
ASSUMED_FLOPS = 400e12
LINK_BYTES_PER_S = 50e9


@dataclass
class ParallelEstimate:
    """Bytes per rank on the GPU and the host, and seconds per optimizer step by term, for one strategy."""

    strategy: str
    gpus: int
    ep: int
    gpu: dict[str, float]
    host: dict[str, float] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)

    @property
    def gpu_total(self) -> float:
        return sum(self.gpu.values())

    @property
    def host_total(self) -> float:
        return sum(self.host.values())

    @property
    def step_range(self) -> tuple[float, float]:
        """(every term overlapped, none overlapped) seconds per optimizer step."""
        values = [v for v in self.times.values() if v]
        return (max(values, default=0.0), sum(values))

    @property
    def state_bytes(self) -> float:
        """Parameter and optimizer-state bytes per rank, GPU and host together (what a run's module parameters and
        optimizer state hold; gradients, copies and activations excluded)."""
        keys = ("parameters", "fp32 masters", "optimizer state")
        return sum(v for part in (self.gpu, self.host) for k, v in part.items() if k.startswith(keys))


def _ring(n: int) -> float:
    return 2 * (n - 1) / n if n > 1 else 0.0


def _gather(n: int) -> float:
    return (n - 1) / n if n > 1 else 0.0


def parallel_estimate(root: nn.Module, strategy: str, gpus: int, *, ep: Optional[int] = None,
                      offload: Sequence[str] = (), precision: str = "bf16-mixed", micro_batch_tokens: int = 8192,
                      accumulate_grad_batches: int = 1, optimizer_state_bytes: int = 8, prefetch: int = 1,
                      activation_checkpointing: bool = False, reshard_after_forward: bool = True,
                      reduce_bytes: int = 4, reserve_bytes: int = 2 * 2**30, flops: float = ASSUMED_FLOPS,
                      link_bytes_per_s: float = LINK_BYTES_PER_S) -> ParallelEstimate:
    """The estimate of `strategy` (one of `STRATEGIES`) on `gpus` ranks for `root` (see the module docstring).

    `offload`: module names (or patterns) of the units `m6_offload_ddp` streams and `m6_fsdp+offload` keeps on the
    host. `ep`: the expert-parallel size of `m6_ep` (default: all ranks; must divide the ranks and the experts).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: choose one of {STRATEGIES}")
    if gpus < 1:
        raise ValueError(f"gpus={gpus}: must be >= 1")
    config = find_config(root)
    rows = measure_rows(root, precision, 1)
    buffers = sum(b.numel() * b.element_size() for b in root.buffers())
    kwargs: dict[str, Any] = dict(precision=precision, micro_batch_tokens=micro_batch_tokens, prefetch=prefetch,
                                  optimizer_state_bytes=optimizer_state_bytes,
                                  accumulate_grad_batches=accumulate_grad_batches, reserve_bytes=reserve_bytes,
                                  buffer_bytes=buffers)
    if activation_checkpointing and config is not None:
        config = config.replace(activation_checkpointing="all")
    resident = estimate(rows, config, **kwargs)
    total = resident.resident_params
    tokens = micro_batch_tokens * max(accumulate_grad_batches, 1)
    compute_s = 0.0
    if config is not None:
        compute_s = (8 if activation_checkpointing else 6) * active_params(config, rows) * tokens / flops
    state = float(optimizer_state_bytes)
    common = {k: resident.gpu[k] for k in ("activations", "logits and loss", "buffers", "CUDA context and workspace")}
    ep_size = 1

    if strategy == "ddp":
        gpu = {**resident.gpu, "gradient buckets (fp32)": 4.0 * total}
        times = {"compute": compute_s, "gradient all-reduce": _ring(gpus) * 4 * total / link_bytes_per_s}
        return ParallelEstimate(strategy, gpus, 1, gpu, {}, times)

    if strategy == "m6_offload_ddp":
        names = _names(root, offload)
        placed = apply_units(root, measure_rows(root, precision, 1), names, precision, 1)
        est = estimate(placed, config, **kwargs)
        biggest = max((r.numel for r in placed if r.offloaded), default=0)
        gpu = {**est.gpu, "gradient buckets (fp32)": 4.0 * est.resident_params,
               "offloaded-gradient all-reduce buffers": 2.0 * reduce_bytes * biggest}
        times = {"compute": compute_s,
                 "gradient all-reduce": _ring(gpus) * (4 * est.resident_params + reduce_bytes * est.offloaded_params)
                 / link_bytes_per_s,
                 "PCIe": est.h2d_per_step / PCIE_BYTES_PER_S,
                 "host AdamW": est.offloaded_params / CPU_ADAM_PARAMS_PER_S}
        return ParallelEstimate(strategy, gpus, 1, gpu, dict(est.host), times)

    if strategy in ("m6_fsdp", "m6_fsdp+offload"):
        names = _names(root, offload) if strategy == "m6_fsdp+offload" else []
        placed = apply_units(root, measure_rows(root, precision, 1), names, precision, 1)
        n_off = sum(r.numel for r in placed if r.offloaded)
        n_res = total - n_off
        blocks = [r for r in placed if r.is_block or r.layers]
        biggest = max((r.numel for r in blocks), default=0)
        root_numel = total - sum(r.numel for r in blocks)
        param_bytes = 2 if precision == "bf16-mixed" else 4
        gpu = {"parameters (fp32 shards)": 4.0 * n_res / gpus, "gradients (fp32 shards)": 4.0 * n_res / gpus,
               "optimizer state (shards)": state * n_res / gpus,
               "gathered parameters (root + 2 blocks)": float(param_bytes * (root_numel + 2 * biggest)),
               "unsharded gradients (root + 1 block)": float(reduce_bytes * (root_numel + biggest)), **common}
        host = {"parameters (fp32 shards)": 4.0 * n_off / gpus, "gradients (fp32 shards)": 4.0 * n_off / gpus,
                "optimizer state (shards)": state * n_off / gpus} if n_off else {}
        gathers = 2 if reshard_after_forward else 1
        times = {"compute": compute_s,
                 "all-gather + reduce-scatter": (gathers * param_bytes + reduce_bytes) * total * _gather(gpus)
                 / link_bytes_per_s}
        if n_off:
            times["PCIe"] = (4 * gathers + 4) * n_off / gpus / PCIE_BYTES_PER_S
            times["host AdamW"] = n_off / gpus / CPU_ADAM_PARAMS_PER_S
        return ParallelEstimate(strategy, gpus, 1, gpu, host, times)

    # m6_ep
    ep_size = gpus if ep is None else ep
    if ep_size < 1 or gpus % ep_size:
        raise ValueError(f"ep={ep_size}: the expert-parallel size must divide the number of GPUs ({gpus})")
    counts = {m.num_experts for m in root.modules() if isinstance(m, MoELayer)}
    bad = sorted(c for c in counts if c % ep_size)
    if bad:
        raise ValueError(f"ep={ep_size}: does not divide the expert count(s) {bad}")
    experts = sum(r.expert_numel for r in rows)
    dense = total - experts
    local_experts = experts / ep_size
    lp = resident.gpu["autocast copies (bf16)"] / 2
    lp_local = lp - (experts - local_experts) if lp >= experts else lp  # experts' autocast copies are split too
    moe_layers = sum(1 for layer in range(config.num_layers) if config.is_moe_layer(layer)) if config else 0
    act_bytes = 2 if precision == "bf16-mixed" else 4
    a2a = 4.0 * micro_batch_tokens * config.top_k * config.d_model * act_bytes if moe_layers else 0.0
    gpu = {"parameters (fp32)": 4.0 * (dense + local_experts), "gradients (fp32)": 4.0 * (dense + local_experts),
           "optimizer state": state * (dense + local_experts), "autocast copies (bf16)": 2.0 * lp_local,
           "gradient buckets (fp32, dense)": 4.0 * dense, "all-to-all buffers (one MoE layer)": a2a, **common}
    replicas = gpus // ep_size
    times = {"compute": compute_s,
             "dense all-reduce": _ring(gpus) * 4 * dense / link_bytes_per_s,
             "expert all-reduce (expert_data)": _ring(replicas) * 4 * local_experts / link_bytes_per_s,
             # dispatch and combine, forward and backward: the a2a buffer's bytes per MoE layer and micro-batch
             "all-to-all": a2a * _gather(ep_size) * moe_layers * max(accumulate_grad_batches, 1) / link_bytes_per_s}
    return ParallelEstimate(strategy, gpus, ep_size, gpu, {}, times)


def _names(root: nn.Module, offload: Sequence[str]) -> list[str]:
    from m6lit.strategies.patterns import resolve_offload

    return resolve_offload(root, list(offload)) if offload else []


def plan_offload_ddp(root: nn.Module, gpu_budget: float, gpus: int, **kwargs: Any) -> list[str]:
    """The units `m6_offload_ddp` streams so that a rank's estimate, all-reduce buffers included, fits
    `gpu_budget`: the single-device offload planner's choice for the budget less what the buffers add (a few
    rounds, since the buffers shrink as more units stream). Raises ValueError when no choice fits."""
    from m6lit.strategies.planner import plan_offload

    keys = ("precision", "micro_batch_tokens", "prefetch", "optimizer_state_bytes", "accumulate_grad_batches",
            "reserve_bytes")
    planner = {k: v for k, v in kwargs.items() if k in keys}
    budget = float(gpu_budget)
    total = 0.0
    for _ in range(8):
        plan = plan_offload(root, gpu_memory_budget=max(int(budget), 1), num_gpus=1, **planner)
        total = parallel_estimate(root, "m6_offload_ddp", gpus, offload=plan.offload, **kwargs).gpu_total
        if total <= gpu_budget:
            return plan.offload
        overhead = total - plan.estimate.gpu_total
        budget = min(budget - (total - gpu_budget), gpu_budget - overhead)
    raise ValueError(f"m6_offload_ddp: no offload choice fits {gpu_budget:.0f} bytes per GPU with its all-reduce "
                     f"buffers (the last needed {total:.0f})")


def min_gpus_experts_offloaded(root: nn.Module, gpu_budget: float, host_budget: Optional[float] = None, *,
                               limit: int = 2**20, **kwargs: Any) -> Optional[tuple[int, Any]]:
    """The fewest GPUs (a power of two) over which the experts can be split with the offload planner's placement
    fitting `gpu_budget` (and `host_budget` per GPU, when given) — the single-device offload plan with
    `num_gpus` = N, i.e. expert parallelism combined with offload, which no m6lit strategy implements yet — with
    that plan, or None."""
    from m6lit.strategies.planner import plan_offload

    n = 1
    while n <= limit:
        try:
            plan = plan_offload(root, gpu_memory_budget=int(gpu_budget), num_gpus=n, **kwargs)
        except ValueError:
            plan = None
        if plan is not None and (host_budget is None or plan.estimate.host_total <= host_budget):
            return n, plan
        n *= 2
    return None


def min_gpus(root: nn.Module, strategy: str, gpu_budget: float, *, limit: int = 2**20,
             **kwargs: Any) -> Optional[int]:
    """The fewest GPUs (a power of two, up to `limit`) on which `strategy`'s per-rank GPU estimate fits
    `gpu_budget`, or None. `m6_ep` uses all ranks as its expert-parallel size (it stops where that no longer
    divides the experts)."""
    kwargs = {k: v for k, v in kwargs.items() if k != "ep"}
    n = 1
    while n <= limit:
        try:
            est = parallel_estimate(root, strategy, n, **kwargs)
        except ValueError:
            return None
        if est.gpu_total <= gpu_budget:
            return n
        if strategy in ("ddp", "m6_offload_ddp"):
            return None  # a replica per rank: more ranks do not lower it
        n *= 2
    return None


def parallel_table(root: nn.Module, gpus: int, *, ep: Optional[int] = None, offload: Sequence[str] = (),
                   offload_ddp: Optional[Sequence[str]] = None, gpu_budget: Optional[float] = None,
                   strategies: Sequence[str] = STRATEGIES, **kwargs: Any) -> str:
    """One line per strategy: GPU and host bytes per rank, step-time terms and range, whether it fits the budget,
    and the fewest GPUs it needs for it. `offload_ddp`: the units `m6_offload_ddp` streams (default `offload`)."""
    from m6lit.strategies.sizes import format_bytes

    lines = [f"{'strategy':<17} {'GPU/rank':>10} {'host/rank':>10} {'compute':>8} {'comm':>8} {'PCIe':>8} "
             f"{'host opt':>8} {'step s (overlap..serial)':>25} {'fits':>5} {'min GPUs':>8}"]
    for strategy in strategies:
        if strategy == "m6_fsdp+offload" and not offload:
            continue
        units = offload_ddp if strategy == "m6_offload_ddp" and offload_ddp is not None else offload
        try:
            est = parallel_estimate(root, strategy, gpus, ep=ep, offload=units, **kwargs)
        except ValueError as err:
            lines.append(f"{strategy:<17} no estimate: {err}")
            continue
        comm = sum(v for k, v in est.times.items() if k not in ("compute", "PCIe", "host AdamW"))
        low, high = est.step_range
        fits = "-" if gpu_budget is None else ("yes" if est.gpu_total <= gpu_budget else "no")
        need = "-" if gpu_budget is None else min_gpus(root, strategy, gpu_budget, offload=units, **kwargs)
        name = f"{strategy} (ep {est.ep})" if strategy == "m6_ep" else strategy
        lines.append(f"{name:<17} {format_bytes(est.gpu_total):>10} {_fb(est.host_total):>10} "
                     f"{est.times.get('compute', 0):>8.3f} {comm:>8.3f} {est.times.get('PCIe', 0):>8.3f} "
                     f"{est.times.get('host AdamW', 0):>8.3f} {f'{low:.3f}..{high:.3f}':>25} {fits:>5} "
                     f"{'never' if need is None else need:>8}")
    return "\n".join(lines)


def _fb(n: float) -> str:
    from m6lit.strategies.sizes import format_bytes

    return format_bytes(n) if n else "-"


__all__ = ["ASSUMED_FLOPS", "LINK_BYTES_PER_S", "STRATEGIES", "ParallelEstimate", "min_gpus", "parallel_estimate",
           "min_gpus_experts_offloaded", "parallel_table", "plan_offload_ddp"]
