"""MoEMonitor: per-layer expert load, dropped fraction, router entropy, balance and z loss during training; a warning
when an expert starves or one expert takes (nearly) every token.

Statistics come from forward hooks on the physical blocks (each call reports its logical layer), accumulate on the
compute device and are read back once per logging interval (no host sync per step). Hooks are re-installed when
blocks are replaced (delink), and a layer whose expert count changes (split, merge) starts a fresh tally.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from m6lit.model import MoEAux
from m6lit.model.block import checkpoint_phase


@dataclass
class _Tally:
    """Sums of one logical layer's MoEAux over the batches of the current interval."""

    counts: Tensor
    scalars: Tensor  # [dropped_fraction, router_entropy, balance_loss, z_loss]
    batches: int = 0
    top_k: int = 1


@dataclass
class _Streak:
    steps: int = 0
    warned: bool = False


@dataclass
class LayerLoad:
    """One logical layer's statistics over a logging interval (host values)."""

    layer: int
    load: list[float]  # per expert: share of routed token-slots × num_experts (1.0 = uniform)
    token_fraction: list[float]  # per expert: share of tokens that chose it
    dropped_fraction: float
    router_entropy: float
    balance_loss: float
    z_loss: float


class MoEMonitor(Callback):
    """Log MoE routing statistics and warn about starving or dominating experts.

    Every `log_every_n_steps` optimizer steps (default: the trainer's), per MoE layer i: `moe/layer{i}/load_max`,
    `load_min` (expert load ÷ uniform load), `dropped_fraction`, `router_entropy`, `balance_loss`, `z_loss`; and
    `moe/starved_experts` (experts below `starve_load` in the interval). With a WandbLogger also a load heatmap
    (`moe/load_heatmap`: rows = MoE layers, columns = experts) and a per-layer load histogram (`moe/load/layer{i}`).

    Args:
        starve_load: an expert starves when its load ÷ uniform load stays below this ...
        dominant_fraction: ... and dominates when it receives at least this share of the tokens ...
        patience: ... for this many optimizer steps (counted over whole logging intervals). Each warning fires once
            until the condition clears.
        log_every_n_steps: interval (default: `trainer.log_every_n_steps`).
        histograms: send the W&B heatmap and histograms (scalars are always logged).
    """

    def __init__(self, starve_load: float = 0.1, dominant_fraction: float = 0.9, patience: int = 50,
                 log_every_n_steps: int | None = None, histograms: bool = True) -> None:
        if starve_load < 0:
            raise ValueError(f"MoEMonitor.starve_load={starve_load}: must be >= 0")
        if not 0 < dominant_fraction <= 1:
            raise ValueError(f"MoEMonitor.dominant_fraction={dominant_fraction}: must be in (0, 1]")
        if patience < 1:
            raise ValueError(f"MoEMonitor.patience={patience}: must be >= 1")
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"MoEMonitor.log_every_n_steps={log_every_n_steps}: must be >= 1")
        self.starve_load = starve_load
        self.dominant_fraction = dominant_fraction
        self.patience = patience
        self.log_every_n_steps = log_every_n_steps
        self.histograms = histograms
        self.last: list[LayerLoad] = []
        self.warnings: list[str] = []
        self._tallies: dict[int, _Tally] = {}
        self._streaks: dict[tuple[str, int, int], _Streak] = {}
        self._hooked: dict[int, Any] = {}
        self._last_flush_step = 0
        self._step_seen = 0

    # ------------------------------------------------------------------ hooks
    def _install(self, pl_module: LightningModule) -> None:
        blocks = list(pl_module.model.blocks)
        live = {id(b) for b in blocks}
        for key in [k for k in self._hooked if k not in live]:
            self._hooked.pop(key).remove()
        for block in blocks:
            if id(block) not in self._hooked and block.is_moe:
                self._hooked[id(block)] = block.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not module.training or not torch.is_grad_enabled() or checkpoint_phase() == "recompute":
            return  # the re-run of a checkpointed block in backward is not another batch
        aux = output[1]
        if not isinstance(aux, MoEAux):
            return
        layer = int(kwargs["layer"] if "layer" in kwargs else args[4] if len(args) > 4 else 0)
        counts = aux.expert_counts.detach()
        scalars = torch.stack([aux.dropped_fraction.detach().float(), aux.router_entropy.detach().float(),
                               aux.balance_loss.detach().float(), aux.z_loss.detach().float()])
        tally = self._tallies.get(layer)
        if tally is None or tally.counts.shape != counts.shape:
            tally = self._tallies[layer] = _Tally(torch.zeros_like(counts), torch.zeros_like(scalars))
            self._reset_streaks(layer)
        tally.counts += counts
        tally.scalars += scalars
        tally.batches += 1
        tally.top_k = module.ffn.top_k

    def _reset_streaks(self, layer: int) -> None:
        for key in [k for k in self._streaks if k[1] == layer]:
            del self._streaks[key]

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_flush_step = trainer.global_step
        self._step_seen = trainer.global_step

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._install(pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._step_seen:
            return  # inside a gradient-accumulation window
        self._step_seen = step
        every = self.log_every_n_steps or trainer.log_every_n_steps or 1
        if step - self._last_flush_step >= every:
            self._flush(trainer, step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for handle in self._hooked.values():
            handle.remove()
        self._hooked.clear()

    # ------------------------------------------------------------------ reading out
    def _flush(self, trainer: Trainer, step: int) -> None:
        steps = step - self._last_flush_step
        self._last_flush_step = step
        tallies = {layer: t for layer, t in sorted(self._tallies.items()) if t.batches}
        self._tallies = {layer: _Tally(torch.zeros_like(t.counts), torch.zeros_like(t.scalars))
                         for layer, t in self._tallies.items()}
        if not tallies:
            return
        flat = torch.cat([torch.cat([t.counts.float(), t.scalars / t.batches]) for t in tallies.values()]).tolist()
        loads: list[LayerLoad] = []
        pos = 0
        for layer, t in tallies.items():
            e = t.counts.numel()
            counts, (dropped, entropy, balance, z) = flat[pos:pos + e], flat[pos + e:pos + e + 4]
            pos += e + 4
            total = sum(counts) or 1.0
            loads.append(LayerLoad(layer=layer, load=[c * e / total for c in counts],
                                   token_fraction=[c * t.top_k / total for c in counts], dropped_fraction=dropped,
                                   router_entropy=entropy, balance_loss=balance, z_loss=z))
        self.last = loads
        self._check(loads, steps, step)
        self._log(trainer, loads, step)

    def _check(self, loads: list[LayerLoad], steps: int, step: int) -> None:
        for stats in loads:
            for e, (load, frac) in enumerate(zip(stats.load, stats.token_fraction)):
                self._streak("starve", stats.layer, e, load < self.starve_load, steps, step,
                             f"layer {stats.layer} expert {e} is starving: its load has been below "
                             f"{self.starve_load}× the uniform load (now {load:.3f}×)")
                self._streak("dominate", stats.layer, e, frac >= self.dominant_fraction, steps, step,
                             f"layer {stats.layer} expert {e} dominates: it has received at least "
                             f"{self.dominant_fraction:.0%} of the tokens (now {frac:.1%}) — the router has "
                             f"collapsed onto it")

    def _streak(self, kind: str, layer: int, expert: int, bad: bool, steps: int, step: int, message: str) -> None:
        streak = self._streaks.setdefault((kind, layer, expert), _Streak())
        if not bad:
            streak.steps, streak.warned = 0, False
            return
        streak.steps += steps
        if streak.steps >= self.patience and not streak.warned:
            streak.warned = True
            text = f"MoEMonitor: {message} for {streak.steps} steps (step {step})"
            self.warnings.append(text)
            rank_zero_warn(text)

    def _log(self, trainer: Trainer, loads: list[LayerLoad], step: int) -> None:
        metrics: dict[str, float] = {}
        starved = 0
        for s in loads:
            prefix = f"moe/layer{s.layer}"
            metrics[f"{prefix}/load_max"] = max(s.load)
            metrics[f"{prefix}/load_min"] = min(s.load)
            metrics[f"{prefix}/dropped_fraction"] = s.dropped_fraction
            metrics[f"{prefix}/router_entropy"] = s.router_entropy
            metrics[f"{prefix}/balance_loss"] = s.balance_loss
            metrics[f"{prefix}/z_loss"] = s.z_loss
            starved += sum(load < self.starve_load for load in s.load)
        metrics["moe/starved_experts"] = float(starved)
        metrics["moe/load_max"] = max(max(s.load) for s in loads)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if not self.histograms:
            return
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not wandb_loggers:
            return
        import wandb

        media: dict[str, Any] = {
            "moe/load_heatmap": wandb.Image(load_heatmap([s.load for s in loads]),
                                            caption=f"rows: MoE layers {[s.layer for s in loads]}; columns: experts; "
                                                    f"colour: load ÷ uniform load, dark 0 → bright ≥ 2")}
        for s in loads:
            edges = np.arange(len(s.load) + 1, dtype=np.float64)
            media[f"moe/load/layer{s.layer}"] = wandb.Histogram(np_histogram=(np.asarray(s.load), edges))
        for lg in wandb_loggers:
            lg.log_metrics(media, step=step)


def load_heatmap(loads: list[list[float]], cell: int = 12, top: float = 2.0) -> np.ndarray:
    """uint8 RGB image, one `cell`-pixel square per (layer, expert); colour from dark blue (0) through green (1 =
    uniform) to yellow (≥ `top`); layers with fewer experts are padded grey."""
    width = max(len(row) for row in loads)
    stops = np.array([[20, 20, 80], [40, 160, 120], [250, 230, 40]], dtype=np.float64)
    image = np.full((len(loads), width, 3), 128, dtype=np.float64)
    for r, row in enumerate(loads):
        x = np.clip(np.asarray(row, dtype=np.float64) / top, 0.0, 1.0) * 2.0
        low = np.minimum(x.astype(int), 1)
        frac = (x - low)[:, None]
        image[r, :len(row)] = stops[low] * (1 - frac) + stops[low + 1] * frac
    return np.repeat(np.repeat(image, cell, axis=0), cell, axis=1).round().astype(np.uint8)
