"""The memory model: bytes counted against real tensors, host and pinned bytes equal to what the streamer
allocates, and the activation estimate under activation checkpointing."""

from __future__ import annotations

import pytest
import torch
from _fakes import tiny_config
from torch import nn

from m6lit.model import M6Model
from m6lit.strategies.estimate import activation_bytes_per_token
from m6lit.strategies.planner import plan_offload


def _root(**overrides) -> nn.Module:
    torch.manual_seed(0)
    root = nn.Module()
    root.model = M6Model(tiny_config(**overrides))
    return root


def test_estimate_counts_the_real_bytes() -> None:
    root = _root(moe_layers="none")
    plan = plan_offload(root, offload=["model.blocks.[1-2]"], precision="32-true", micro_batch_tokens=64)
    off = sum(p.numel() for i in (1, 2) for p in root.model.blocks[i].parameters())
    res = sum(p.numel() for p in root.parameters()) - off
    est = plan.estimate
    assert (est.offloaded_params, est.resident_params) == (off, res)
    assert est.gpu["parameters (fp32)"] == 4 * res and est.host["optimizer state"] == 8 * off
    padded = sum(-(-p.numel() // 64) * 64 for i in (1, 2) for p in root.model.blocks[i].parameters())
    assert est.host["fp32 masters"] == 4 * padded, "masters are laid out 64-element aligned"
    legacy = plan_offload(root, offload=["model.blocks.[1-2]"], precision="32-true", micro_batch_tokens=64,
                          host_layout="legacy").estimate
    assert legacy.host["fp32 masters"] == 4 * off and legacy.host["gradients (fp32)"] == 4 * off
    assert est.h2d_per_step == 2 * 4 * off and est.d2h_per_step == 4 * off, "fp32 weights there and back, grads back"
    bf16 = plan_offload(root, offload=["model.blocks.[1-2]"], precision="bf16-mixed", micro_batch_tokens=64).estimate
    assert bf16.d2h_per_step < 0.6 * est.d2h_per_step, "matmul weights stream and return gradients in bf16"


@pytest.mark.parametrize("precision,accumulate,shared,layout", [
    ("bf16-mixed", 1, False, "engine"), ("32-true", 1, False, "engine"), ("bf16-mixed", 2, False, "engine"),
    ("bf16-mixed", 1, True, "engine"), ("bf16-mixed", 1, False, "engine-delayed")])
def test_host_and_pinned_estimate_equal_what_the_streamer_allocates(precision: str, accumulate: int,
                                                                     shared: bool, layout: str) -> None:
    from m6lit.strategies.streaming import ParamStreamer

    root = _root(num_unique_blocks=2) if shared else _root()
    units = ["model.blocks.1"] if shared else ["model.blocks.1", "model.blocks.2"]
    plan = plan_offload(root, offload=units, precision=precision, micro_batch_tokens=64,
                        accumulate_grad_batches=accumulate, host_layout=layout)
    shared_names = {r.name for r in plan.rows if len(r.layers) > 1}
    assert bool(shared_names) == shared
    streamer = ParamStreamer([(n, root.get_submodule(n)) for n in units], torch.device("cpu"),
                             low_precision=torch.bfloat16 if precision == "bf16-mixed" else None,
                             shared=shared_names, lean=True, accumulate=accumulate > 1,
                             delayed=layout == "engine-delayed")
    host = plan.estimate.host
    streamer_estimate = plan.estimate.host_total - host["optimizer state"] - host["engine scratch"]
    assert streamer_estimate == streamer.host_bytes(), (host, streamer.host_bytes())
    assert plan.estimate.pinned == streamer.copied_bytes()
    biggest = max((g.numel for u in streamer.units for g in u.groups if g.low_precision), default=0)
    assert host["engine scratch"] == (0 if accumulate > 1 else 4 * biggest)
    if precision == "bf16-mixed" and accumulate == 1 and not shared:
        n_off = plan.estimate.offloaded_params
        assert plan.estimate.pinned < 2.6 * n_off, "lean layout: about 2 pinned bytes per offloaded parameter"
        assert "fp32 accumulators" not in {k for k, v in host.items() if v}, "no fp32 accumulator without accumulation"


@pytest.mark.parametrize("precision,per_d,per_ff", [("bf16-mixed", 22, 8), ("32-true", 36, 16)])
def test_activation_estimate_follows_checkpointing(precision: str, per_d: int, per_ff: int) -> None:
    """A dense layer saves per_d·d + per_ff·d_ff bytes per token; checkpointed, it keeps its fp32 input (4d) and
    re-creates the rest during its own backward, after the layers behind it have freed theirs."""
    config = tiny_config(moe_layers="none")
    d, p = config.d_model, per_d * config.d_model + per_ff * config.d_ff

    def act(spec) -> float:
        return activation_bytes_per_token(config.replace(activation_checkpointing=spec), precision)[0]

    assert act(None) == 4 * p
    assert act("all") == 3 * 4 * d + p, "three kept inputs while the last layer's recompute is live"
    assert act([0]) == act([1]) == 3 * p + 4 * d
    assert act([3]) == 4 * p, "the last layer re-runs at once: nothing saved"
    assert act([0, 1, 2]) == 3 * 4 * d + p
    assert activation_bytes_per_token(config.replace(activation_checkpointing="all"), precision)[1] == \
        activation_bytes_per_token(config, precision)[1], "the head is not checkpointed"
