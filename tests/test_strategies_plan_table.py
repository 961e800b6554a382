"""The placement table: consecutive blocks of one placement share a line, each line's bytes are the estimate's,
budgets are stated, and the PCIe/host lines appear only when something is offloaded."""

from __future__ import annotations

import torch
from _fakes import tiny_config
from torch import nn

from m6lit.model import M6Model
from m6lit.strategies.planner import plan_offload
from m6lit.strategies.sizes import format_bytes


def _root(**overrides) -> nn.Module:
    torch.manual_seed(0)
    root = nn.Module()
    root.model = M6Model(tiny_config(**overrides))
    return root


def test_table_groups_block_runs_and_states_the_estimate_and_budgets() -> None:
    root = _root(num_layers=6, num_unique_blocks=6, moe_layers="none")
    plan = plan_offload(root, offload=["model.blocks.[1-3]"], precision="32-true", micro_batch_tokens=64,
                        host_memory_budget="1GB")
    lines = plan.table().splitlines()
    est = plan.estimate
    assert lines[0].split() == ["module", "placement", "params", "GPU", "bytes", "host", "bytes", "PCIe/step"]
    by_name = {line.split()[0]: line.split() for line in lines[1:] if line.startswith("model.")}
    assert {"model.blocks.0", "model.blocks.[1-3]", "model.blocks.[4-5]"} <= set(by_name)
    offloaded = [r for r in plan.rows if r.offloaded]
    host_bytes = format_bytes(sum(est.row_bytes(r) for r in offloaded)).split()
    assert by_name["model.blocks.[1-3]"][1] == "host" and by_name["model.blocks.[1-3]"][3] == "-"
    assert by_name["model.blocks.[1-3]"][4:6] == host_bytes
    assert by_name["model.blocks.[4-5]"][1] == "GPU" and by_name["model.blocks.[4-5]"][-1] == "-"
    assert f"= {format_bytes(est.host_total)}, of which pinned {format_bytes(est.pinned)} (budget 1.00 GB)" in lines[-2]
    assert lines[-1].startswith("PCIe per optimizer step: ") and "CPU AdamW on" in lines[-1]

    resident = plan_offload(root, offload=[], precision="32-true", micro_batch_tokens=64).table().splitlines()
    assert resident[-1] == "host memory estimate per GPU: nothing offloaded"
    assert "model.blocks.[0-5]                 GPU" in "\n".join(resident)
