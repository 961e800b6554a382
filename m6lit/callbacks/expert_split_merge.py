"""ExpertSplitMerge: segment, split or merge MoE experts at configured optimizer steps inside one fit.

At an optimizer-step boundary (right after step N, before that step's checkpoint) the callback runs the op through
`m6lit.structure.apply_structure_change`: the pure `m6lit.model.experts` functions on the MoE blocks of the named
layers, the new expert shapes in the module's structural hyperparameters (so checkpoints rebuild them), the
optimizer's groups rewritten in place (state carried through the ParamMap: sliced for segments, copied for split
clones, averaged for merges — or rescaled or reset per `optimizer_state`), the strategy's re-plan and the log. It
composes with `PseudoToReal` at the same step: whichever runs first, the other sees the changed model (a delinked
clone keeps its source block's expert shape)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from m6lit.model.experts import MERGE_HOW, MERGE_WEIGHTS, OPS, moe_blocks_of
from m6lit.structure import STATE_POLICIES, ExpertChange, apply_structure_change


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
        """Dry-run the schedule on the layers' expert shapes (`ExpertShape.after`, the rule the ops apply) so a bad
        entry fails at setup, not mid-run. Sharing is taken as it is now (an op on a shared block changes every
        layer that runs it)."""
        config = model.config
        shapes = {layer: config.expert_shape(block) for layer, block in enumerate(model.layer_to_block)}
        for i, event in enumerate(self.events):
            touched = [layer for runs in moe_blocks_of(model, event.layers).values() for layer in runs]
            for layer in touched:
                try:
                    shapes[layer] = shapes[layer].after(event.op, event.factor, config.router, event.how)
                except ValueError as err:
                    raise ValueError(f"ExpertSplitMerge.schedule[{i}]: layer {layer}: {err}") from None

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

    def _apply(self, trainer: Trainer, pl_module: LightningModule, index: int, event: ExpertEvent,
               batch: Any) -> None:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + event.step * 1_009 + index)
        op = ExpertChange(event.op, event.factor, event.layers, generator=generator,
                          noise=self.noise if event.noise is None else event.noise,
                          weights=event.weights or self.merge_weights, how=event.how)
        apply_structure_change(trainer, pl_module, op, batch=batch, optimizer_state=self.optimizer_state,
                               log_loss=self.log_loss, history=self.history)
        self.done.append(index)
