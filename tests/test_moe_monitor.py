"""MoEMonitor: warnings on a collapsed router and silence on uniform routing, the logged statistics, W&B media,
hooks that follow delink and expert splits."""

from __future__ import annotations

import types
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from _fakes import loader, tiny_config
from _wandb import offline_runs, read_history
from lightning.pytorch.loggers import Logger, WandbLogger
from m6lit.callbacks import ExpertSplitMerge, MoEMonitor, PseudoToReal
from m6lit.callbacks.moe_monitor import load_heatmap

from m6lit.model import MoELayer, delink
from m6lit.module import M6LitModule


class MemoryLogger(Logger):
    """Keeps every `log_metrics` call."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, Any]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))


def _module(top_k: int = 1, **overrides: Any) -> M6LitModule:
    torch.manual_seed(0)
    config = {"moe_layers": "all", "num_experts": 4, "top_k": top_k, **overrides}
    return M6LitModule(tiny_config(**config), warmup_steps=2)


def _moe_layers(module: M6LitModule) -> list[MoELayer]:
    return [b.ffn for b in module.model.blocks if b.is_moe]


def _round_robin(router: Any, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Token t → expert t mod E, gate 1, uniform probabilities: exactly uniform routing."""
    n, e = x.shape[0], router.num_experts
    logits = torch.zeros(n, e, dtype=torch.float32)
    ids = (torch.arange(n) % e).view(n, 1)
    return logits, logits.softmax(-1), ids, torch.ones(n, 1)


def _run(module: M6LitModule, monitor: MoEMonitor, steps: int = 6, logger: Any = False,
         callbacks: tuple = ()) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, callbacks=[*callbacks, monitor], logger=logger, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, deterministic=True,
                        accelerator="cpu", devices=1, log_every_n_steps=1)
    trainer.fit(module, loader())
    return trainer


def test_collapsed_router_warns_once_per_expert_and_kind() -> None:
    module = _module()
    with torch.no_grad():
        for layer in _moe_layers(module):
            layer.router.logit_offset[0] = 30.0  # every token picks expert 0 (a buffer: training cannot undo it)
    monitor = MoEMonitor(log_every_n_steps=2, patience=4)
    with pytest.warns(UserWarning, match=r"layer 0 expert 0 dominates: .* \(now 100.0%\).* for 4 steps \(step 4\)"):
        _run(module, monitor, steps=6)
    dominant = [w for w in monitor.warnings if "dominates" in w]
    starving = [w for w in monitor.warnings if "starving" in w]
    assert len(dominant) == 4 and all("expert 0 " in w for w in dominant)  # one per layer, not repeated at step 6
    assert len(starving) == 4 * 3 and all("(step 4)" in w for w in starving)
    assert [s.load for s in monitor.last] == [[4.0, 0.0, 0.0, 0.0]] * 4


def test_uniform_routing_does_not_warn() -> None:
    module = _module()
    for layer in _moe_layers(module):
        layer.router.forward = types.MethodType(_round_robin, layer.router)
    monitor = MoEMonitor(log_every_n_steps=2, patience=2, starve_load=0.5, dominant_fraction=0.3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(module, monitor, steps=6)
    assert not [w for w in caught if "MoEMonitor" in str(w.message)]
    assert monitor.warnings == []
    assert [s.load for s in monitor.last] == [[1.0] * 4] * 4
    assert [s.token_fraction for s in monitor.last] == [[0.25] * 4] * 4


def test_scalars_are_logged_every_n_steps_with_sane_values() -> None:
    logger = MemoryLogger()
    _run(_module(top_k=2), MoEMonitor(log_every_n_steps=2), steps=6, logger=logger)
    rows = {step: m for step, m in logger.rows if "moe/load_max" in m}
    assert sorted(rows) == [2, 4, 6]
    for metrics in rows.values():
        for layer in range(4):
            p = f"moe/layer{layer}"
            assert metrics[f"{p}/load_min"] <= 1.0 <= metrics[f"{p}/load_max"]
            assert metrics[f"{p}/dropped_fraction"] == 0.0
            assert 0.0 < metrics[f"{p}/router_entropy"] <= np.log(4) + 1e-6
            assert metrics[f"{p}/balance_loss"] >= 1.0 - 1e-6 and metrics[f"{p}/z_loss"] >= 0.0
        assert metrics["moe/starved_experts"] == 0.0


def test_hooks_follow_delink_and_a_split() -> None:
    module = _module(num_unique_blocks=2)
    monitor = MoEMonitor(log_every_n_steps=1)
    callbacks = (PseudoToReal(delink_step=2), ExpertSplitMerge([{"step": 3, "op": "split", "factor": 2}]))
    _run(module, monitor, steps=5, callbacks=callbacks)
    assert [s.layer for s in monitor.last] == [0, 1, 2, 3]
    assert [len(s.load) for s in monitor.last] == [8] * 4
    assert all(not b._forward_hooks for b in module.model.blocks)  # removed at the end of training


def test_wandb_gets_a_heatmap_and_per_layer_histograms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"}.items():
        monkeypatch.setenv(var, value)
    logger = WandbLogger(project="m6lit-test", save_dir=str(tmp_path), offline=True)
    _run(_module(moe_layers=2), MoEMonitor(log_every_n_steps=2), steps=4, logger=logger)
    logger.experiment.finish()
    rows = read_history(offline_runs(tmp_path)[-1])  # media values arrive flattened: "key/_type", "key/bins", ...
    heat = [r for r in rows if "moe/load_heatmap/_type" in r]
    assert [int(r["trainer/global_step"]) for r in heat] == [2, 4]
    assert {r["moe/load_heatmap/_type"] for r in heat} == {"image-file"}
    hist = [r for r in rows if "moe/load/layer1/_type" in r]
    assert len(hist) == 2 and hist[0]["moe/load/layer1/_type"] == "histogram"
    assert hist[0]["moe/load/layer1/bins"] == [0, 1, 2, 3, 4]  # one bar per expert, height = its load
    assert sum(hist[0]["moe/load/layer1/values"]) == pytest.approx(4.0)
    keys = set().union(*rows)
    assert "moe/load/layer0/_type" not in keys  # layer 0 is dense
    assert {"moe/layer3/load_max", "moe/layer1/router_entropy"} <= keys


def test_load_heatmap_colours_and_padding() -> None:
    image = load_heatmap([[0.0, 1.0, 2.0, 5.0], [1.0, 1.0]], cell=2)
    assert image.shape == (4, 8, 3) and image.dtype == np.uint8
    assert image[0, 0].tolist() == [20, 20, 80] and image[0, 2].tolist() == [40, 160, 120]
    assert image[0, 4].tolist() == image[0, 6].tolist() == [250, 230, 40]  # clipped at 2× uniform
    assert image[2, 4].tolist() == [128, 128, 128]  # the second layer has only two experts


def test_bad_arguments() -> None:
    for kwargs, match in (({"starve_load": -1}, "starve_load"), ({"dominant_fraction": 0}, "dominant_fraction"),
                          ({"patience": 0}, "patience"), ({"log_every_n_steps": 0}, "log_every_n_steps")):
        with pytest.raises(ValueError, match=f"MoEMonitor.{match}"):
            MoEMonitor(**kwargs)


def test_monitor_counts_optimizer_steps_under_accumulation() -> None:
    module = _module()
    monitor = MoEMonitor(log_every_n_steps=2)
    logger = MemoryLogger()
    trainer = L.Trainer(max_steps=4, callbacks=[monitor], logger=logger, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", devices=1,
                        accumulate_grad_batches=2, log_every_n_steps=1)
    trainer.fit(module, loader())
    assert sorted(step for step, m in logger.rows if "moe/load_max" in m) == [2, 4]
    assert monitor.last and all(abs(sum(s.token_fraction) - 1.0) < 1e-9 for s in monitor.last)


def test_delink_does_not_copy_what_a_hook_refers_to() -> None:
    class Uncopyable:
        def __deepcopy__(self, memo: dict) -> Any:
            raise RuntimeError("deep-copied a hook's owner")

        def hook(self, module: Any, args: Any, output: Any) -> None:
            pass

    module = _module(num_unique_blocks=2)
    owner = Uncopyable()
    module.model.blocks[0].register_forward_hook(owner.hook)
    delink(module.model)
    assert all(not b._forward_hooks for b in module.model.blocks)


@pytest.mark.parametrize("early_stop", [True, False])
def test_checkpointed_blocks_are_counted_once(early_stop: bool) -> None:
    """The re-run of a checkpointed block in backward is not another batch: the tallies equal those without
    checkpointing, whether or not the recompute stops early (with early stop off it reaches the block's forward
    hook)."""
    from torch.utils.checkpoint import set_checkpoint_early_stop

    def tallies(spec: Any) -> dict[int, tuple[list[int], list[float], int]]:
        monitor = MoEMonitor(log_every_n_steps=100)  # no flush within the run: the raw sums stay readable
        with set_checkpoint_early_stop(early_stop):
            _run(_module(top_k=2, activation_checkpointing=spec), monitor, steps=3)
        return {layer: (t.counts.tolist(), t.scalars.tolist(), t.batches) for layer, t in monitor._tallies.items()}

    plain = tallies(None)
    assert sorted(plain) == [0, 1, 2, 3] and all(batches == 3 for _, _, batches in plain.values())
    assert tallies("all") == plain
