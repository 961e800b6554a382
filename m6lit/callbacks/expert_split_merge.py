"""ExpertSplitMerge: segment, split or merge MoE experts at configured optimizer steps inside one fit.

At an optimizer-step boundary (right after step N, before that step's checkpoint) the callback calls the pure
`m6lit.model.experts` functions on the MoE blocks of the named layers, rewrites the optimizer's groups in place
(state carried through the ParamMap: sliced for segments, copied for split clones, averaged for merges — or rescaled
or reset per `optimizer_state`), tells the strategy, records the new expert shapes in the module's structural
hyperparameters (so checkpoints rebuild them) and logs the event. It composes with `PseudoToReal` at the same step:
whichever runs first, the other sees the changed model (a delinked clone keeps its source block's expert shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from m6lit.model import lm_loss
from m6lit.model.experts import (
    MERGE_HOW,
    MERGE_WEIGHTS,
    OPS,
    apply_expert_op,
    moe_blocks_of,
)

from .structure import STATE_POLICIES, notify_strategy, rewrite_optimizer


@dataclass
class ExpertEvent:
    """After optimizer step `step`, apply `op` ("segment" | "split" | "merge") with `factor` to the MoE blocks of
    `layers` (logical layer indices, or "all"). `noise` (split) and `weights` / `how` (merge) override the
    callback's defaults for this entry."""

    step: int
    op: str
    factor: int
    layers: list[int] | str = "all"
    noise: float | None = None
    weights: str | None = None
    how: str = "auto"


def _event(entry: Any, i: int) -> ExpertEvent:
    where = f"ExpertSplitMerge.schedule[{i}]"
    if isinstance(entry, ExpertEvent):
        event = entry
    else:
        data = dict(entry)
        known = {"step", "op", "factor", "layers", "noise", "weights", "how"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(known)}")
        missing = sorted({"step", "op", "factor"} - set(data))
        if missing:
            raise ValueError(f"{where}: missing key(s) {missing}")
        event = ExpertEvent(**data)
    if isinstance(event.step, bool) or not isinstance(event.step, int) or event.step < 1:
        raise ValueError(f"{where}: step={event.step!r} must be an integer >= 1")
    if event.op not in OPS:
        raise ValueError(f"{where}: op={event.op!r} must be one of {OPS}")
    if isinstance(event.factor, bool) or not isinstance(event.factor, int) or event.factor < 2:
        raise ValueError(f"{where}: factor={event.factor!r} must be an integer >= 2")
    if event.noise is not None and event.noise < 0:
        raise ValueError(f"{where}: noise={event.noise} must be >= 0")
    if event.weights is not None and event.weights not in MERGE_WEIGHTS:
        raise ValueError(f"{where}: weights={event.weights!r} must be one of {MERGE_WEIGHTS}")
    if event.how not in MERGE_HOW:
        raise ValueError(f"{where}: how={event.how!r} must be one of {MERGE_HOW}")
    if isinstance(event.layers, str) and event.layers != "all":
        raise ValueError(f"{where}: layers={event.layers!r} must be 'all' or a list of logical layer indices")
    if not isinstance(event.layers, str):
        event.layers = list(event.layers)
    return event


class ExpertSplitMerge(Callback):
    """Change the MoE expert structure at scheduled optimizer steps.

    Args:
        schedule: list of `{step, op, factor, layers}` (optionally `noise`, `weights`, `how`); steps in
            non-decreasing order (entries at one step run in list order). `op`: "split" clones each expert into
            `factor` copies (more parameters, top_k unchanged); "segment" cuts each expert into `factor` finer ones
            (top_k × factor, same function); "merge" joins `factor` experts into one (undoing a segment exactly,
            averaging split copies otherwise). `layers`: logical layers, or "all" MoE layers; a block shared by
            several layers changes once, for all of them.
        optimizer_state: "copy" (state moved through the ParamMap as is: sliced, copied or averaged), "rescale"
            (additionally first moments / n and second moments / n², n = the link's fan_out: the copies of a split,
            1/factor for a merge), "reset" (the changed parameters start with fresh state).
        noise: default symmetry-breaking noise for splits, relative to the router weight's RMS.
        merge_weights: default merge weights — "load" (the experts' token counts on the current batch) or
            "uniform".
        seed: seeds the split noise (with the step and entry index), so a resumed run draws the same noise.
        log_loss: compute the loss of the current batch just before and after each op (two extra forwards).
    """

    def __init__(self, schedule: list[dict[str, Any]], optimizer_state: Literal["copy", "rescale", "reset"] = "copy",
                 noise: float = 0.01, merge_weights: Literal["load", "uniform"] = "load", seed: int = 0,
                 log_loss: bool = True) -> None:
        if not schedule:
            raise ValueError("ExpertSplitMerge.schedule is empty")
        if optimizer_state not in STATE_POLICIES:
            raise ValueError(f"ExpertSplitMerge.optimizer_state={optimizer_state!r}: must be one of {STATE_POLICIES}")
        if noise < 0:
            raise ValueError(f"ExpertSplitMerge.noise={noise}: must be >= 0")
        if merge_weights not in MERGE_WEIGHTS:
            raise ValueError(f"ExpertSplitMerge.merge_weights={merge_weights!r}: must be one of {MERGE_WEIGHTS}")
        events: list[ExpertEvent] = []
        for i, entry in enumerate(schedule):
            event = _event(entry, i)
            if events and event.step < events[-1].step:
                raise ValueError(f"ExpertSplitMerge.schedule[{i}]: step={event.step} comes before the previous "
                                 f"entry's step={events[-1].step}; list the entries in step order")
            events.append(event)
        self.events = events
        self.optimizer_state = optimizer_state
        self.noise = noise
        self.merge_weights = merge_weights
        self.seed = seed
        self.log_loss = log_loss
        self.done: list[int] = []
        self.history: list[dict[str, Any]] = []
        self._restored = False

    # ------------------------------------------------------------------ setup and resume
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        model = pl_module.model
        for i, event in enumerate(self.events):
            try:
                moe_blocks_of(model, event.layers)
            except ValueError as err:
                raise ValueError(f"ExpertSplitMerge.schedule[{i}]: {err}") from None
        self._check_shapes(model)
        last = self.events[-1].step
        if trainer.max_steps is not None and 0 < trainer.max_steps <= last:
            rank_zero_warn(f"ExpertSplitMerge: the last scheduled step {last} >= trainer.max_steps="
                           f"{trainer.max_steps}; no training step follows it")

    def _check_shapes(self, model: Any) -> None:
        """Dry-run the schedule on the layers' expert shapes so a bad entry fails at setup, not mid-run. Sharing
        is taken as it is now (an op on a shared block changes every layer that runs it)."""
        config = model.config
        shapes = {layer: config.expert_shape(block) for layer, block in enumerate(model.layer_to_block)}
        for i, event in enumerate(self.events):
            where = f"ExpertSplitMerge.schedule[{i}]"
            touched = [layer for runs in moe_blocks_of(model, event.layers).values() for layer in runs]
            for layer in touched:
                s = shapes[layer]
                n = event.factor
                if event.op == "segment":
                    if s.expert_d_ff % n:
                        raise ValueError(f"{where}: layer {layer} has expert_d_ff={s.expert_d_ff}, not divisible by "
                                         f"factor={n}")
                    s = s._replace(num_experts=s.num_experts * n, top_k=s.top_k * n, expert_d_ff=s.expert_d_ff // n,
                                   segments=s.segments * n)
                elif event.op == "split":
                    s = s._replace(num_experts=s.num_experts * n)
                else:
                    concat = event.how == "concat" or (event.how == "auto" and s.segments % n == 0)
                    if concat:
                        if s.segments % n:
                            raise ValueError(f"{where}: layer {layer}'s experts are {s.segments} segment piece(s) "
                                             f"each; how='concat' needs a multiple of factor={n}")
                        s = s._replace(num_experts=s.num_experts // n, top_k=s.top_k // n,
                                       expert_d_ff=s.expert_d_ff * n, segments=s.segments // n)
                    else:
                        if s.top_k * n > s.num_experts:
                            raise ValueError(f"{where}: layer {layer} has top_k={s.top_k} × factor={n} > num_experts="
                                             f"{s.num_experts}; merging would leave fewer experts than each token "
                                             f"picks")
                        groups = s.top_k if config.router == "prototype" else 1
                        unit = s.segments if config.router == "topk" else 1
                        if (s.num_experts // groups) % (n * unit):
                            raise ValueError(f"{where}: layer {layer} has {s.num_experts // groups} experts per "
                                             f"routing group, not divisible into merges of factor={n}")
                        s = s._replace(num_experts=s.num_experts // n)
                shapes[layer] = s

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.ckpt_path is None or self._restored:
            return
        # resumed from a checkpoint that holds no state of this callback: entries at or before its step are past
        past = [i for i, e in enumerate(self.events) if e.step <= trainer.global_step]
        if past:
            rank_zero_warn(f"ExpertSplitMerge: schedule entries {past} are at or before the checkpoint's step "
                           f"{trainer.global_step} and the checkpoint does not record them; they are skipped")
            self.done = past

    def state_dict(self) -> dict[str, Any]:
        return {"done": list(self.done)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.done = [int(i) for i in state_dict.get("done", [])]
        self._restored = True

    # ------------------------------------------------------------------ the event
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        for i, event in enumerate(self.events):
            if i not in self.done and trainer.global_step >= event.step:
                self._apply(trainer, pl_module, i, event, batch)

    @torch.no_grad()
    def _measure(self, pl_module: LightningModule, batch: dict[str, Tensor]) -> tuple[float, dict[int, Tensor]]:
        """(LM + aux loss, per-layer expert token counts) of `batch` with dropout off."""
        was_training = pl_module.training
        pl_module.eval()
        try:
            out = pl_module.model(batch)
            loss = float(lm_loss(out.logits, batch["labels"]) + out.aux_loss)
            return loss, {layer: aux.expert_counts for layer, aux in out.moe_stats.items()}
        finally:
            pl_module.train(was_training)

    def _apply(self, trainer: Trainer, pl_module: LightningModule, index: int, event: ExpertEvent,
               batch: Any) -> None:
        model = pl_module.model
        weights = event.weights or self.merge_weights
        needs_load = event.op == "merge" and weights == "load"
        loss_before, loads = float("nan"), None
        if self.log_loss or needs_load:
            loss_before, loads = self._measure(pl_module, batch)
        params_before = model.num_parameters(unique=True)
        blocks = moe_blocks_of(model, event.layers)
        shapes_before = {b: model.config.expert_shape(b) for b in blocks}
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + event.step * 1_009 + index)
        noise = self.noise if event.noise is None else event.noise
        param_map = apply_expert_op(model, event.op, event.factor, event.layers, noise=noise, generator=generator,
                                    weights=weights, loads=loads, how=event.how)
        pl_module.sync_structure_hparams()
        for optimizer in trainer.optimizers:
            rewrite_optimizer(optimizer, pl_module.build_param_groups(), param_map, self.optimizer_state)
        notify_strategy(trainer, param_map)
        self.done.append(index)
        loss_after = self._measure(pl_module, batch)[0] if self.log_loss else float("nan")
        shapes_after = {b: model.config.expert_shape(b) for b in blocks}
        record = {"experts/step": float(trainer.global_step), "experts/factor": float(event.factor),
                  "experts/num_experts": float(max(s.num_experts for s in shapes_after.values())),
                  "experts/unique_params_before": float(params_before),
                  "experts/unique_params_after": float(model.num_parameters(unique=True)),
                  "experts/loss_before": loss_before, "experts/loss_after": loss_after}
        self.history.append({**record, "op": event.op, "blocks": sorted(blocks),
                             "shapes_before": {b: s._asdict() for b, s in shapes_before.items()},
                             "shapes_after": {b: s._asdict() for b, s in shapes_after.items()}})
        for logger in trainer.loggers:
            logger.log_metrics(record, step=trainer.global_step)
        changes = ", ".join(f"block {b} (layers {blocks[b]}): {_shape_text(shapes_before[b])} → "
                            f"{_shape_text(shapes_after[b])}" for b in blocks)
        rank_zero_info(f"ExpertSplitMerge: {event.op} ×{event.factor} at step {trainer.global_step}: {changes}; "
                       f"parameters {params_before:,} → {model.num_parameters(unique=True):,}, loss "
                       f"{loss_before:.6f} → {loss_after:.6f} (optimizer state: {self.optimizer_state})")


def _shape_text(shape: Any) -> str:
    return f"{shape.num_experts} experts top-{shape.top_k} d_ff {shape.expert_d_ff}"
