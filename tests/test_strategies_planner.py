"""plan_offload: the budget plan (what stays resident, what streams first, too-small GPU and host budgets) and the
12 B recipe's plan on the meta device within the budgets it states."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from _fakes import tiny_config
from torch import nn

from m6lit.model import M6Config, M6Model
from m6lit.model.flavors import flavor_values
from m6lit.strategies.estimate import estimate, find_config
from m6lit.strategies.planner import plan_offload
from m6lit.strategies.sizes import parse_bytes

ROOT = Path(__file__).resolve().parents[1]


def _root(**overrides) -> nn.Module:
    torch.manual_seed(0)
    root = nn.Module()
    root.model = M6Model(tiny_config(**overrides))
    return root


def _meta_root(values: dict) -> nn.Module:
    """A module holding `model` = M6Model on the meta device (names as in the LightningModule)."""
    root = nn.Module()
    with torch.device("meta"):
        root.model = M6Model(M6Config.from_dict(values).validate())
    return root


def test_budget_plan_keeps_ends_resident_and_streams_dense_odd_layers_first() -> None:
    root = _root(num_layers=8, num_unique_blocks=8, moe_layers=[2, 6])
    config = find_config(root)
    kwargs = {"precision": "32-true", "micro_batch_tokens": 64}
    everything = plan_offload(root, offload=[], **kwargs).estimate.gpu_total
    one = plan_offload(root, gpu_memory_budget=int(everything) - 1, **kwargs)
    assert one.offload == ["model.blocks.1"], "a dense block at an odd layer goes first"
    assert one.estimate.gpu_total <= everything - 1
    most = plan_offload(root, gpu_memory_budget=int(everything * 0.99995), **kwargs)
    assert "model.blocks.0" not in most.offload and "model.blocks.7" not in most.offload
    dense_first = [n for n in most.offload if n not in ("model.blocks.2", "model.blocks.6")]
    assert dense_first, most.offload
    rows = [r for r in one.rows if r.is_block]
    for r in rows:
        r.offloaded = r.name not in ("model.blocks.0", "model.blocks.7")
    minimum = estimate(rows, config, **kwargs, buffer_bytes=0).gpu_total
    with pytest.raises(ValueError, match="too small even for the resident minimum"):
        plan_offload(root, gpu_memory_budget=int(minimum * 0.9), **kwargs)
    with pytest.raises(ValueError, match="host_memory_budget=.* is exceeded"):
        plan_offload(root, gpu_memory_budget=int(everything) - 1, host_memory_budget=100, **kwargs)


def test_host_budget_that_cannot_fit_names_the_budget_and_the_shortfall() -> None:
    root = _root()
    need = plan_offload(root, offload=["model.blocks.[1-2]"], micro_batch_tokens=64).estimate.host_total
    with pytest.raises(ValueError, match=r"host_memory_budget=1.00 KB is exceeded by .*KB: .*nothing was allocated"):
        plan_offload(root, offload=["model.blocks.[1-2]"], micro_batch_tokens=64, host_memory_budget=1000)
    assert plan_offload(root, offload=["model.blocks.[1-2]"], micro_batch_tokens=64,
                        host_memory_budget=int(need)).estimate.host_total == need


def test_the_12b_recipe_plans_on_the_meta_device_and_fits_its_budgets() -> None:
    """configs/offload-12b.yaml: ≥ 12 B parameters, one 32k-token micro-batch per step, every block checkpointed,
    and the budget plan fits the GPU and host budgets it states."""
    path = ROOT / "configs" / "offload-12b.yaml"
    cfg = yaml.safe_load(path.read_text())
    strategy = cfg["trainer"]["strategy"]["init_args"]
    assert cfg["flavor"] == "offload-12b" and "config" not in cfg["model"]
    model_config = flavor_values("offload-12b")
    root = _meta_root(model_config)
    config = root.model.config
    assert all(p.is_meta for p in root.parameters())
    assert config.activation_checkpointing == "all" and config.moe_layers == "none"
    tokens = cfg["data"]["batch_size"] * config.max_seq_len
    assert 30_000 <= tokens <= 34_000 and cfg["trainer"]["accumulate_grad_batches"] == 1
    assert cfg["trainer"]["precision"] == "bf16-mixed"
    plan = plan_offload(root, gpu_memory_budget=strategy["gpu_memory_budget"], precision="bf16-mixed",
                        micro_batch_tokens=tokens, host_memory_budget=strategy["host_memory_budget"])
    est = plan.estimate
    assert est.resident_params + est.offloaded_params == sum(p.numel() for p in root.parameters()) >= 12e9
    assert est.gpu_total <= parse_bytes(strategy["gpu_memory_budget"]) <= parse_bytes("139GiB")
    assert est.host_total <= parse_bytes(strategy["host_memory_budget"]) <= parse_bytes("128GiB")
    assert est.offloaded_params > 0.4 * (est.resident_params + est.offloaded_params)
    assert "model.blocks.0" not in plan.offload and f"model.blocks.{config.num_layers - 1}" not in plan.offload
    plain = plan_offload(_meta_root({**model_config, "activation_checkpointing": None}), offload=plan.offload,
                         precision="bf16-mixed", micro_batch_tokens=tokens).estimate
    assert est.gpu["activations"] < plain.gpu["activations"] / 5, "checkpointing is what makes it fit"
