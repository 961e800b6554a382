"""Per-rank estimates of the many-GPU strategies: the sharding arithmetic of each strategy (exact, on the tiny
model), the step-time terms follow the stated rates, bad sizes are clear errors, and the fewest-GPU search."""

from __future__ import annotations

import pytest
from _fakes import tiny_config

from m6lit.module import M6LitModule
from m6lit.strategies.parallel_estimate import STRATEGIES, min_gpus, parallel_estimate, parallel_table

KW = dict(precision="32-true", micro_batch_tokens=48)


@pytest.fixture(scope="module")
def module() -> M6LitModule:
    return M6LitModule(tiny_config())


def _counts(module: M6LitModule) -> tuple[int, int]:
    experts = sum(p.numel() for n, p in module.named_parameters() if ".experts." in n)
    return sum(p.numel() for p in module.parameters()), experts


def test_sharding_arithmetic_per_strategy(module: M6LitModule) -> None:
    total, experts = _counts(module)
    assert experts > 0
    assert parallel_estimate(module, "ddp", 4, **KW).state_bytes == 12 * total  # fp32 weight + AdamW m, v
    for n in (1, 2, 4):
        assert parallel_estimate(module, "m6_fsdp", n, **KW).state_bytes == 12 * total / n
    ep = parallel_estimate(module, "m6_ep", 4, ep=2, **KW)
    assert ep.state_bytes == 12 * (total - experts + experts / 2) and ep.ep == 2
    # FSDP2 CPU offload moves the named units' shards to the host; the GPU keeps the rest
    off = parallel_estimate(module, "m6_fsdp+offload", 2, offload=["model.blocks.[1-2]"], **KW)
    blocks = sum(p.numel() for n, p in module.named_parameters() if n.startswith(("model.blocks.1.",
                                                                                  "model.blocks.2.")))
    assert off.host["parameters (fp32 shards)"] == 4 * blocks / 2
    assert off.gpu["parameters (fp32 shards)"] == 4 * (total - blocks) / 2
    assert off.state_bytes == 12 * total / 2


def test_step_time_terms_follow_the_rates(module: M6LitModule) -> None:
    total, _ = _counts(module)
    slow = parallel_estimate(module, "ddp", 8, link_bytes_per_s=1e9, **KW)
    fast = parallel_estimate(module, "ddp", 8, link_bytes_per_s=2e9, **KW)
    assert slow.times["gradient all-reduce"] == pytest.approx(2 * 7 / 8 * 4 * total / 1e9)
    assert fast.times["gradient all-reduce"] == pytest.approx(slow.times["gradient all-reduce"] / 2)
    assert parallel_estimate(module, "ddp", 1, **KW).times["gradient all-reduce"] == 0
    low, high = slow.step_range
    assert low == max(slow.times.values()) and high == pytest.approx(sum(slow.times.values()))
    ckpt = parallel_estimate(module, "m6_fsdp", 2, activation_checkpointing=True, **KW)
    assert ckpt.times["compute"] == pytest.approx(parallel_estimate(module, "m6_fsdp", 2, **KW).times["compute"]
                                                  * 8 / 6)
    offload = parallel_estimate(module, "m6_offload_ddp", 2, offload=["model.blocks.1"], **KW)
    assert offload.times["PCIe"] > 0 and offload.times["host AdamW"] > 0 and offload.host


def test_bad_sizes_are_clear_errors(module: M6LitModule) -> None:
    with pytest.raises(ValueError, match=r"strategy='zero3': choose one of"):
        parallel_estimate(module, "zero3", 2)
    with pytest.raises(ValueError, match=r"ep=3: the expert-parallel size must divide the number of GPUs \(4\)"):
        parallel_estimate(module, "m6_ep", 4, ep=3)
    with pytest.raises(ValueError, match=r"ep=8: does not divide the expert count\(s\) \[4\]"):
        parallel_estimate(module, "m6_ep", 8)
    assert "m6_ep" in parallel_table(module, 8, **KW) and "no estimate: ep=8" in parallel_table(module, 8, **KW)


def test_min_gpus(module: M6LitModule) -> None:
    one = parallel_estimate(module, "m6_fsdp", 1, **KW).gpu_total
    four = parallel_estimate(module, "m6_fsdp", 4, **KW).gpu_total
    assert min_gpus(module, "m6_fsdp", one, **KW) == 1
    need = min_gpus(module, "m6_fsdp", (one + four) / 2, **KW)
    assert need in (2, 4) and parallel_estimate(module, "m6_fsdp", need, **KW).gpu_total <= (one + four) / 2
    assert min_gpus(module, "ddp", one / 2, **KW) is None  # a replica per rank: more ranks never help
    assert min_gpus(module, "m6_ep", 1.0, **KW) is None  # stops where the ranks no longer divide the experts
    assert set(STRATEGIES) >= {"ddp", "m6_offload_ddp", "m6_fsdp", "m6_ep"}


def test_offload_ddp_plan_leaves_room_for_the_all_reduce_buffers() -> None:
    from m6lit.strategies.parallel_estimate import plan_offload_ddp
    from m6lit.strategies.planner import plan_offload

    module = M6LitModule(tiny_config(num_layers=8, num_unique_blocks=8))
    kw = dict(KW, reserve_bytes=0)
    full = parallel_estimate(module, "ddp", 2, **kw).gpu_total
    budget = 0.75 * full
    # the single-device choice for this budget overflows once DDP's buffers are added ...
    single = plan_offload(module, gpu_memory_budget=int(budget), num_gpus=1, **kw).offload
    assert parallel_estimate(module, "m6_offload_ddp", 2, offload=single, **kw).gpu_total > budget
    # ... the DDP plan streams more units and fits
    units = plan_offload_ddp(module, budget, 2, **kw)
    assert len(units) > len(single)
    assert parallel_estimate(module, "m6_offload_ddp", 2, offload=units, **kw).gpu_total <= budget
    assert plan_offload_ddp(module, 2 * full, 2, **kw) == []
    with pytest.raises(ValueError, match="too small even for the resident minimum"):
        plan_offload_ddp(module, 0.3 * full, 2, **kw)


def test_fewest_gpus_for_experts_split_and_offloaded() -> None:
    from m6lit.strategies.parallel_estimate import min_gpus_experts_offloaded
    from m6lit.strategies.planner import plan_offload

    module = M6LitModule(tiny_config(num_layers=8, num_unique_blocks=8, num_experts=16))
    kw = dict(KW, reserve_bytes=0)
    resident = plan_offload(module, gpu_memory_budget=10**12, num_gpus=1, **kw).estimate.gpu_total
    n, plan = min_gpus_experts_offloaded(module, resident, **kw)
    assert n == 1 and plan.offload == []
    n, plan = min_gpus_experts_offloaded(module, 0.6 * resident, **kw)
    assert plan.estimate.gpu_total <= 0.6 * resident and plan.num_gpus == n
    # a host budget below what that plan offloads needs more GPUs (fewer experts per GPU to hold)
    tight = 0.5 * plan.estimate.host_total
    more, fitted = min_gpus_experts_offloaded(module, 0.6 * resident, tight, **kw)
    assert more > n and fitted.estimate.host_total <= tight
    assert min_gpus_experts_offloaded(module, 1.0, limit=64, **kw) is None
