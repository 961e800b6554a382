"""PseudoToReal: train a Pseudo Giant (layers sharing K physical blocks), then delink it mid-fit into the Real Giant.

At an optimizer-step boundary (right after step N, before that step's checkpoint) the callback runs the delink
through `m6lit.structure.apply_structure_change` (the pure `delink()`, the module's structural hyperparameter, the
optimizer's groups rewritten in place with state carried per `optimizer_state`, the strategy's re-plan, the log),
then optionally re-warms the LR and changes gradient accumulation. The same logger, checkpoints and progress bar
continue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from m6lit.model.sharing import layer_to_block
from m6lit.structure import STATE_POLICIES, Delink, apply_structure_change


@dataclass
class DelinkEvent:
    """After optimizer step `step`, go to `num_unique_blocks` physical blocks."""

    step: int
    num_unique_blocks: int


class Rewarmup:
    """LR multiplier ramping linearly from 1/steps to 1 over `steps` optimizer steps after `start`."""

    def __init__(self, start: int, steps: int) -> None:
        self.start = start
        self.steps = steps

    def __call__(self, step: int) -> float:
        if step < self.start:
            return 1.0
        return min(1.0, (step - self.start + 1) / self.steps)


class PseudoToReal(Callback):
    """Delink shared layers at a step (or a progressive schedule) inside one fit.

    The CLI always builds one under the top-level key `pseudo_to_real` (`--pseudo_to_real.delink_step 150`); with
    neither `delink_step` nor `schedule` it is inactive and left out of the Trainer.

    Args:
        delink_step: after this optimizer step, give every logical layer its own block.
        schedule: instead of `delink_step`, a list of `{step, num_unique_blocks}` (e.g. 1 → 4 → L); steps strictly
            increasing, each count a multiple of the previous one that divides num_layers.
        optimizer_state: what each new copy's optimizer state starts from — "copy" (the shared state as is),
            "rescale" (first moments / n, second moments / n², n = copies of the block), "reset" (fresh).
        rewarmup_steps: after each delink, multiply the scheduled LR by a linear ramp over this many steps.
        accumulate_grad_batches_after: gradient accumulation once the last delink is done (the pseudo phase can
            run a larger effective batch; keep it a divisor of the pseudo phase's value so windows stay aligned).
        log_loss: compute the loss of the current batch just before and after the delink (two extra forwards).
    """

    def __init__(self, delink_step: Optional[int] = None, schedule: Optional[list[DelinkEvent]] = None,
                 optimizer_state: Literal["copy", "rescale", "reset"] = "copy", rewarmup_steps: int = 0,
                 accumulate_grad_batches_after: Optional[int] = None, log_loss: bool = True) -> None:
        if delink_step is not None and schedule is not None:
            raise ValueError("PseudoToReal: give exactly one of delink_step or schedule")
        if optimizer_state not in STATE_POLICIES:
            raise ValueError(f"PseudoToReal.optimizer_state={optimizer_state!r}: must be one of {STATE_POLICIES}")
        if rewarmup_steps < 0:
            raise ValueError(f"PseudoToReal.rewarmup_steps={rewarmup_steps}: must be >= 0")
        if accumulate_grad_batches_after is not None and accumulate_grad_batches_after < 1:
            raise ValueError(f"PseudoToReal.accumulate_grad_batches_after={accumulate_grad_batches_after}: must be "
                             f">= 1")
        events = []
        if schedule is not None:
            if not schedule:
                raise ValueError("PseudoToReal.schedule is empty")
            for i, entry in enumerate(schedule):
                event = entry if isinstance(entry, DelinkEvent) else DelinkEvent(**dict(entry))
                if event.step < 1:
                    raise ValueError(f"PseudoToReal.schedule[{i}]: step={event.step} must be >= 1")
                if events and event.step <= events[-1].step:
                    raise ValueError(f"PseudoToReal.schedule[{i}]: step={event.step} must be greater than the "
                                     f"previous entry's step={events[-1].step}")
                if events and (event.num_unique_blocks <= events[-1].num_unique_blocks
                               or event.num_unique_blocks % events[-1].num_unique_blocks):
                    raise ValueError(f"PseudoToReal.schedule[{i}]: num_unique_blocks={event.num_unique_blocks} must be "
                                     f"a larger multiple of the previous entry's {events[-1].num_unique_blocks}")
                events.append(event)
        elif delink_step is not None and delink_step < 1:
            raise ValueError(f"PseudoToReal.delink_step={delink_step}: must be >= 1")
        self.delink_step = delink_step
        self.events: list[DelinkEvent] = events
        self.optimizer_state = optimizer_state
        self.rewarmup_steps = rewarmup_steps
        self.accumulate_after = accumulate_grad_batches_after
        self.log_loss = log_loss
        self.done: list[list[int]] = []
        self.history: list[dict[str, float]] = []

    @property
    def active(self) -> bool:
        """Whether a delink is configured (`delink_step` or `schedule`)."""
        return self.delink_step is not None or bool(self.events)

    def _where(self, i: int) -> str:
        return "PseudoToReal.delink_step" if self.delink_step is not None else f"PseudoToReal.schedule[{i}]"

    def check_schedule(self, config: Any, current_map: list[int]) -> None:
        """Raise `ValueError` naming the entry unless every pending delink can run on the model as it is now
        (each count a multiple of the previous one that divides num_layers and refines the layout)."""
        done_steps = {step for step, _ in self.done}
        mapping = list(current_map)
        for i, event in enumerate(self.events):
            if event.step in done_steps:
                continue
            old_k, new_k = len(set(mapping)), event.num_unique_blocks
            where = self._where(i)
            if new_k <= old_k and not self.done and i == 0:
                continue  # reported by on_fit_start (nothing to delink)
            if new_k % old_k or config.num_layers % new_k:
                raise ValueError(f"{where}: cannot delink the model's {old_k} blocks (model.config.num_unique_blocks)"
                                 f" into {new_k}: the new count must be a multiple of {old_k} and divide "
                                 f"model.config.num_layers={config.num_layers}")
            new_map = layer_to_block(config.num_layers, new_k, config.sharing_layout)
            source_of: dict[int, int] = {}
            for layer, (old_b, new_b) in enumerate(zip(mapping, new_map)):
                if source_of.setdefault(new_b, old_b) != old_b:
                    raise ValueError(f"{where}: sharing_layout {config.sharing_layout!r} with {new_k} blocks does not "
                                     f"refine the {old_k}-block sharing before it (layer {layer})")
            mapping = new_map

    # ------------------------------------------------------------------ setup and resume
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or not self.active:
            return
        config = pl_module.model.config
        if self.delink_step is not None:
            self.events = [DelinkEvent(self.delink_step, config.num_layers)]
        for i, event in enumerate(self.events):
            if config.num_layers % event.num_unique_blocks:
                raise ValueError(f"PseudoToReal.schedule[{i}]: num_unique_blocks={event.num_unique_blocks} must "
                                 f"divide num_layers={config.num_layers}")
        last = self.events[-1].step
        if trainer.max_steps is not None and 0 < trainer.max_steps < last:
            rank_zero_warn(f"PseudoToReal: delink step {last} > trainer.max_steps={trainer.max_steps}; the run "
                           f"ends before that delink, so the model does not become real")
        elif trainer.max_steps is not None and trainer.max_steps == last:
            rank_zero_warn(f"PseudoToReal: delink step {last} == trainer.max_steps; the model is delinked after the "
                           f"final step, so the last checkpoint is real but never trained as real")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.active:
            return
        self.check_schedule(pl_module.model.config, list(pl_module.model.layer_to_block))
        current = len(pl_module.model.blocks)
        done_steps = {step for step, _ in self.done}
        pending = [e for e in self.events if e.step not in done_steps]
        if not self.done and trainer.ckpt_path is None and pending and current >= pending[0].num_unique_blocks:
            raise ValueError(f"PseudoToReal: the model already has {current} unique blocks, so the first delink "
                             f"(to {pending[0].num_unique_blocks}) has nothing to do — start from a shared model "
                             f"(model.config.num_unique_blocks < num_layers)")
        for event in pending:
            if event.num_unique_blocks <= current:
                self.done.append([event.step, event.num_unique_blocks])
        for step, _ in self.done:
            self._register_rewarmup(pl_module, step)
        if self._all_done() and self.accumulate_after is not None:
            trainer.accumulate_grad_batches = self.accumulate_after

    def _all_done(self) -> bool:
        return {s for s, _ in self.done} >= {e.step for e in self.events}

    def _register_rewarmup(self, pl_module: LightningModule, step: int) -> None:
        if self.rewarmup_steps > 0:
            pl_module.lr_multipliers.append(Rewarmup(step, self.rewarmup_steps))

    def state_dict(self) -> dict[str, Any]:
        return {"done": [list(x) for x in self.done]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.done = [list(x) for x in state_dict.get("done", [])]

    # ------------------------------------------------------------------ the event
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.active:
            return
        done_steps = {step for step, _ in self.done}
        for event in self.events:
            if event.step not in done_steps and trainer.global_step >= event.step:
                self._delink(trainer, pl_module, event, batch)
                done_steps.add(event.step)

    def _delink(self, trainer: Trainer, pl_module: LightningModule, event: DelinkEvent, batch: Any) -> None:
        apply_structure_change(trainer, pl_module, Delink(event.num_unique_blocks), batch=batch,
                               optimizer_state=self.optimizer_state, log_loss=self.log_loss, history=self.history)
        self.done.append([event.step, event.num_unique_blocks])
        self._register_rewarmup(pl_module, event.step)
        if self.rewarmup_steps > 0:
            pl_module.refresh_lr()
        if self._all_done() and self.accumulate_after is not None:
            trainer.accumulate_grad_batches = self.accumulate_after
