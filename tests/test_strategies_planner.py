"""OffloadPlan: module patterns (ranges, lists, globs, containers, typos), memory sizes, the budget plan (what stays
resident, what streams first, too-small budgets), the estimate against real tensors, and `m6lit plan` on the
10-trillion-parameter config without allocating it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _fakes import tiny_config
from torch import nn

from m6lit.model import M6Model
from m6lit.strategies.planner import (
    _meta_root,
    estimate,
    find_config,
    parse_bytes,
    plan_offload,
    resident_params,
    resolve_offload,
)

ROOT = Path(__file__).resolve().parents[1]
M6_10T = ROOT / "configs" / "m6-10t.yaml"


def _root(**overrides) -> nn.Module:
    torch.manual_seed(0)
    root = nn.Module()
    root.model = M6Model(tiny_config(**overrides))
    return root


def test_patterns_ranges_lists_globs_and_containers() -> None:
    root = _root(num_layers=6, num_unique_blocks=6)
    assert resolve_offload(root, ["model.blocks.[1-3]"]) == ["model.blocks.1", "model.blocks.2", "model.blocks.3"]
    assert resolve_offload(root, ["model.blocks.[0,5]"]) == ["model.blocks.0", "model.blocks.5"]
    assert resolve_offload(root, ["*.experts"]) == [f"model.blocks.{i}.ffn.experts" for i in (1, 3, 5)]
    assert resolve_offload(root, ["model.blocks"]) == [f"model.blocks.{i}" for i in range(6)], \
        "a container without a forward stands for its children"
    assert resolve_offload(root, ["model.blocks.1", "model.blocks.1.attn"]) == ["model.blocks.1"], "outermost wins"
    assert resolve_offload(root, ["model.blocks.[6-9]"]) == [], "blocks a later delink creates are not a typo"


def test_unknown_pattern_lists_the_closest_names() -> None:
    root = _root()
    with pytest.raises(ValueError, match=r"'model\.blcks\.1' matches no module\. Closest names: \['model\.blocks\.1'"):
        resolve_offload(root, ["model.blcks.1"])
    with pytest.raises(ValueError, match=r"must be an integer range"):
        resolve_offload(root, ["model.blocks.[a-b]"])
    with pytest.raises(TypeError, match="list of patterns"):
        resolve_offload(root, "model.blocks.1")


def test_tied_weights_stay_resident() -> None:
    root = _root()
    keep = resident_params(root, ["model.lm_head"])
    assert keep == {id(root.model.lm_head.weight)}, "the head's weight is the embedding's: it cannot stream"
    assert resident_params(root, ["model.blocks.1"]) == set()


@pytest.mark.parametrize("text,expected", [("80GB", 80 * 10**9), ("96GiB", 96 * 2**30), ("1.5e11", 150_000_000_000),
                                           (4096, 4096), ("512 MB", 512 * 10**6)])
def test_parse_bytes(text, expected: int) -> None:
    assert parse_bytes(text) == expected


def test_parse_bytes_rejects_nonsense() -> None:
    for bad in ("eighty", "-5GB", "0", "12 parsecs"):
        with pytest.raises(ValueError, match="memory size"):
            parse_bytes(bad)


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


def test_m6_10t_plans_on_the_meta_device_without_allocating() -> None:
    root = _meta_root({"vocab_size": 21128, "d_model": 1024, "n_heads": 16, "num_layers": 48, "moe_layers": "all",
                       "num_experts": 10240, "top_k": 4, "router": "prototype", "expert_d_ff": 6656,
                       "image_size": 224, "patch_size": 16, "max_seq_len": 512})
    assert all(p.is_meta for p in root.parameters())
    total = sum(p.numel() for p in root.parameters())
    assert 9.9e12 < total < 10.2e12, total
    script = ("import resource, sys\n"
              "from m6lit.strategies.planner import main\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              f"main(['--config', {str(M6_10T)!r}, '--gpu_memory_budget', '80GB', '--num_gpus', '512'])\n"
              "print('RSS_GROWTH_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    out = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "(as configured): 209.42B parameters" in text and "(after delink to 48 blocks): 10.05T parameters" in text
    assert "per GPU with experts split over 512 GPUs" in text and "per host (8 GPUs)" in text
    assert "model.blocks.0                     GPU" in text, "the first layer's block stays resident"
    growth_kb = int(text.split("RSS_GROWTH_KB")[1].split()[0])
    assert growth_kb < 300_000, f"planning grew the process by {growth_kb} KB"


def test_plan_command_needs_a_budget_or_patterns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from m6lit.strategies.planner import main

    bare = tmp_path / "bare.yaml"
    bare.write_text("model:\n  config:\n    num_layers: 4\n")
    with pytest.raises(SystemExit):
        main(["--config", str(bare)])
    assert "--gpu_memory_budget" in capsys.readouterr().err
    main(["--config", str(bare), "--offload", "model.blocks.[1-2]"])
    assert "model.blocks.[1-2]" in capsys.readouterr().out


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


def test_host_budget_that_cannot_fit_names_the_budget_and_the_shortfall() -> None:
    root = _root()
    need = plan_offload(root, offload=["model.blocks.[1-2]"], micro_batch_tokens=64).estimate.host_total
    with pytest.raises(ValueError, match=r"host_memory_budget=1.00 KB is exceeded by .*KB: .*nothing was allocated"):
        plan_offload(root, offload=["model.blocks.[1-2]"], micro_batch_tokens=64, host_memory_budget=1000)
    assert plan_offload(root, offload=["model.blocks.[1-2]"], micro_batch_tokens=64,
                        host_memory_budget=int(need)).estimate.host_total == need


@pytest.mark.parametrize("precision,per_d,per_ff", [("bf16-mixed", 22, 8), ("32-true", 36, 16)])
def test_activation_estimate_follows_checkpointing(precision: str, per_d: int, per_ff: int) -> None:
    """A dense layer saves per_d·d + per_ff·d_ff bytes per token; checkpointed, it keeps its fp32 input (4d) and
    re-creates the rest during its own backward, after the layers behind it have freed theirs."""
    from m6lit.strategies.planner import activation_bytes_per_token

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


def test_the_12b_recipe_plans_on_the_meta_device_and_fits_its_budgets(capsys: pytest.CaptureFixture[str]) -> None:
    """configs/offload-12b.yaml: ≥ 12 B parameters, one 32k-token micro-batch per step, every block checkpointed,
    and the budget plan fits the GPU and host budgets it states (`m6lit plan` prints it without a warning)."""
    import yaml

    from m6lit.strategies.planner import main

    path = ROOT / "configs" / "offload-12b.yaml"
    cfg = yaml.safe_load(path.read_text())
    strategy = cfg["trainer"]["strategy"]["init_args"]
    root = _meta_root(cfg["model"]["config"])
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
    plain = plan_offload(_meta_root({**cfg["model"]["config"], "activation_checkpointing": None}), offload=plan.offload,
                         precision="bf16-mixed", micro_batch_tokens=tokens).estimate
    assert est.gpu["activations"] < plain.gpu["activations"] / 5, "checkpointing is what makes it fit"
    main(["--config", str(path)])
    out = capsys.readouterr().out
    assert "offload-12b.yaml (as configured): 12.07B parameters" in out and "32768 tokens per micro-batch" in out
    assert "(budget 130.00 GB)" in out and "(budget 128.00 GB)" in out
    assert "WARNING" not in out and "no plan" not in out
