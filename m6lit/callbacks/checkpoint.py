"""M6ModelCheckpoint: Lightning's ModelCheckpoint that always saves the final step and records the W&B run.

Lightning saves `last.ckpt` only when some checkpoint is saved (at a validation or an epoch end), so a run whose
`max_steps` is not a multiple of the validation interval would keep a stale `last.ckpt`; resuming from it would
repeat steps and an export would ship old weights. This subclass saves `last.ckpt` once more when training ends at
a step not yet saved (never under `fast_dev_run`). It also stores the W&B run id in its state, so a resume can
continue the same W&B run.
"""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger


def wandb_run_id(trainer: Trainer) -> Optional[str]:
    """The id of the trainer's W&B run, if it logs to one."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            return str(logger.version) if logger.version is not None else None
    return None


def checkpoint_wandb_run_id(checkpoint: dict[str, Any]) -> Optional[str]:
    """The W&B run id an `M6ModelCheckpoint` stored in `checkpoint`, if any."""
    for state in checkpoint.get("callbacks", {}).values():
        if isinstance(state, dict) and isinstance(state.get("wandb_run_id"), str):
            return state["wandb_run_id"]
    return None


class M6ModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose `last.ckpt` always holds the final training step (see the module docstring)."""

    _trainer_ref: Optional[Trainer] = None

    @property
    def state_key(self) -> str:
        """Lightning's ModelCheckpoint key (`ModelCheckpoint{...}`), so readers of checkpoints (the export's model
        card, resumes of runs saved by a plain ModelCheckpoint) find the state where they expect it."""
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.save_last or trainer.fast_dev_run or trainer.sanity_checking:
            return
        if self._last_global_step_saved != trainer.global_step or not self._last_checkpoint_saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._trainer_ref is not None:
            state["wandb_run_id"] = wandb_run_id(self._trainer_ref)
        return state

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer_ref = trainer
        super().setup(trainer, pl_module, stage)
