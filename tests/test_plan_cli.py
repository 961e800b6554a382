"""`m6lit plan`: the fit config parsed and instantiated by the CLI (stacked configs, included recipes, options,
the strategy's budgets, the PseudoToReal stages) on the meta device, the 10-trillion-parameter config without
allocating it, and a clear error without a budget."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from m6lit.callbacks.pseudo_to_real import PseudoToReal
from m6lit.cli import main as m6lit_main
from m6lit.model import M6Config, M6Model
from m6lit.plan_cli import delink_target, main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)


def test_delink_target_reads_the_active_pseudo_to_real() -> None:
    assert delink_target([PseudoToReal(delink_step=5)], 24) == 24
    schedule = [{"step": 1, "num_unique_blocks": 6}, {"step": 2, "num_unique_blocks": 12}]
    assert delink_target([object(), PseudoToReal(schedule=schedule)], 24) == 12
    assert delink_target([PseudoToReal()], 24) is None and delink_target([], 24) is None


def test_m6_10t_plans_on_the_meta_device_without_allocating() -> None:
    assert yaml.safe_load((CONFIGS / "m6-10t.yaml").read_text())["flavor"] == "m6-10t"
    with torch.device("meta"):
        real = M6Model(M6Config.from_name("m6-10t", num_unique_blocks=None))
    assert 9.9e12 < sum(p.numel() for p in real.parameters()) < 10.2e12
    script = ("import resource, sys\n"
              "from m6lit.plan_cli import main\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              f"main(['--config', {str(CONFIGS / 'm6-10t.yaml')!r}, '--gpu_memory_budget', '80GB', '--num_gpus', "
              "'512', '--gpus', '512'])\n"
              "print('RSS_GROWTH_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    out = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "WANDB_MODE": "offline"})
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    # the vocabulary is the tokenizer's (ByT5, 384 ids), as `m6lit fit` builds it
    assert "(as configured): 209.40B parameters" in text and "(after delink to 48 blocks): 10.05T parameters" in text
    assert "per GPU with experts split over 512 GPUs" in text and "per host (8 GPUs)" in text
    assert "model.blocks.0                     GPU" in text, "the first layer's block stays resident"
    # the many-GPU table of each stage: the Pseudo Giant fits 80 GB per GPU with experts over 128 GPUs; the Real
    # Giant fits none of the strategies alone on 512 GPUs (experts split and offloaded, the plan above, does)
    pseudo, real = text.split("(after delink to 48 blocks)")
    assert "many GPUs: 512 GPUs" in pseudo and "many GPUs: 512 GPUs" in real
    ep_pseudo = next(line for line in pseudo.splitlines() if line.startswith("m6_ep (ep 512)"))
    ep_real = next(line for line in real.splitlines() if line.startswith("m6_ep (ep 512)"))
    assert ep_pseudo.split()[-2:] == ["yes", "128"] and ep_real.split()[-2:] == ["no", "never"]
    for strategy in ("ddp", "m6_offload_ddp", "m6_fsdp", "m6_fsdp+offload"):
        line = next(line for line in real.splitlines() if line.startswith(strategy + " "))
        assert line.split()[-2:] == ["no", "never"], line
    assert "combines expert parallelism with offload yet): fits 80.00 GB per GPU from 128 GPUs" in pseudo
    assert "combines expert parallelism with offload yet): fits 80.00 GB per GPU from 256 GPUs" in real
    growth_kb = int(text.split("RSS_GROWTH_KB")[1].split()[0])
    assert growth_kb < 300_000, f"planning grew the process by {growth_kb} KB"


def test_plan_command_needs_a_budget_or_patterns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bare = tmp_path / "bare.yaml"
    bare.write_text("model:\n  config:\n    num_layers: 4\n")
    with pytest.raises(SystemExit) as exit_info:
        m6lit_main(["plan", "--config", str(bare)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "m6lit: error: m6lit plan: give --gpu_memory_budget" in err and "Traceback" not in err
    main(["--config", str(bare), "--offload", "model.blocks.[1-2]"])
    assert "model.blocks.[1-2]                 host" in capsys.readouterr().out
    main(["--config", str(bare), "--offload", '["model.blocks.1", "model.blocks.3"]'])
    out = capsys.readouterr().out
    assert "model.blocks.1                     host" in out and "model.blocks.3                     host" in out


def test_the_plan_is_of_the_instantiated_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Stacked files and options reach the plan as they reach `fit`; an included recipe's PseudoToReal schedule
    gives the delinked stage; the tokenizer's vocabulary is linked in."""
    overrides = tmp_path / "o.yaml"
    overrides.write_text("model:\n  config:\n    num_layers: 8\ntrainer:\n  precision: 32-true\n")
    main(["--config", str(CONFIGS / "demo.yaml"), "--config", str(overrides), "--model.config.d_model", "64",
          "--offload", "model.blocks.1"])
    out = capsys.readouterr().out
    assert "== o.yaml (as configured): " in out and "8 layers on 2 blocks, d_model 64, 4 experts top-2" in out
    assert "32-true, 7168 tokens per micro-batch" in out  # data.batch_size 32 x max_seq_len 224
    assert "(after delink to 8 blocks)" in out, "the demo's delink_step makes every layer real"
    main(["--config", str(CONFIGS / "p2r-progressive.yaml"), "--gpu_memory_budget", "80GB"])
    out = capsys.readouterr().out
    assert "== p2r-progressive.yaml (as configured): " in out and "24 layers on 2 blocks" in out
    assert "(after delink to 24 blocks)" in out and "bf16-mixed, 16384 tokens" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.yaml"], "planning writes nothing (no run, no checkpoint)"


def test_the_12b_recipe_plans_within_its_budgets(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--config", str(CONFIGS / "offload-12b.yaml")])
    out = capsys.readouterr().out
    assert "offload-12b.yaml (as configured): 12.07B parameters" in out and "32768 tokens per micro-batch" in out
    assert "38 layers on 38 blocks" in out, "num_layers alone means one block per layer"
    assert "(budget 130.00 GB)" in out and "(budget 128.00 GB)" in out
    assert "WARNING" not in out and "no plan" not in out
