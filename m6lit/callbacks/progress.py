"""M6ProgressBar: Lightning's RichProgressBar with a step counter and readable small numbers.

With `max_steps` set, Lightning runs with `max_epochs=-1` and the rich bar would read "Epoch 0/-2"; this one names the step
budget instead ("Train (max_steps 300)"). Metrics use three significant digits, so a learning rate of 3e-4 does not print as 0.000.
The training loss is shown from the logged metrics and refreshed on logging steps only, so the bar reads nothing
back from the GPU between them.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme


class M6ProgressBar(RichProgressBar):
    """RichProgressBar that counts optimizer steps when the run is bounded by `max_steps`.

    Args:
        refresh_rate: redraw every this many batches.
        leave: keep the finished bar of each epoch on screen.
        metrics_format: format of the metric values shown beside the bar.
    """

    def __init__(self, refresh_rate: int = 1, leave: bool = True, metrics_format: str = ".3g") -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave,
                         theme=RichProgressBarTheme(metrics_format=metrics_format))
        self._loss: float | None = None

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None and (self._loss is None or trainer._logger_connector.should_update_logs):
            self._loss = float(loss)
        if self._loss is not None:
            items["train/loss"] = self._loss
        return items

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return f"Train (max_steps {trainer.max_steps})"
        return super()._get_train_description(current_epoch)
