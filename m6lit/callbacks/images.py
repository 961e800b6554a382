"""Image generation where users meet it: `ImageWriter` writes `m6lit predict` images (PNG + a JSONL index) and
`ImageSamples` logs prompt → generated image as a W&B table at each validation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torch import Tensor

__all__ = ["ImageSamples", "ImageWriter", "to_pil"]


def to_pil(image: Tensor) -> Image.Image:
    """[3, S, S] pixels in [-1, 1] → an RGB PIL image."""
    array = ((image.detach().float().clamp(-1, 1).cpu().permute(1, 2, 0).numpy() + 1) * 127.5).round()
    return Image.fromarray(array.clip(0, 255).astype(np.uint8))


class ImageWriter(BasePredictionWriter):
    """Writes each generated image as `<output_dir>/<index>.png` and one JSON line per image to
    `<output_dir>/index.jsonl`: `{"index", "prompt", "file", "score"}` (use with `model.predict_task: generate`).

    Args:
        output_dir: the folder (its index is overwritten at the start of each predict run; one index per rank when
            several ranks predict).
    """

    def __init__(self, output_dir: str = "generated") -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self._index: Optional[Path] = None
        self._written = 0

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        folder = Path(self.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        name = "index.jsonl" if trainer.world_size == 1 else f"index.rank{trainer.global_rank}.jsonl"
        self._index = folder / name
        self._index.write_text("")
        self._written = 0

    def write_on_batch_end(self, trainer: Trainer, pl_module: LightningModule, prediction: Any,
                           batch_indices: Optional[Sequence[int]], batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        if "images" not in prediction:
            return  # captions: CaptionWriter's part
        assert self._index is not None
        images, prompts = prediction["images"], prediction["prompts"]
        scores = prediction["scores"].max(1).values.tolist()
        indices = list(batch_indices) if batch_indices else [self._written + i for i in range(len(prompts))]
        with self._index.open("a", encoding="utf-8") as out:
            for index, prompt, image, score in zip(indices, prompts, images, scores):
                file = f"{index:06d}.png"
                to_pil(image).save(Path(self.output_dir) / file)
                out.write(json.dumps({"index": index, "prompt": prompt, "file": file, "score": score},
                                     ensure_ascii=False) + "\n")
        self._written += len(prompts)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rank_zero_info(f"ImageWriter: wrote {self._written} images to {self.output_dir}")


class ImageSamples(Callback):
    """At each `every_n_validations`-th validation, generate an image for each prompt and log prompt / image as a
    W&B table `val/image_samples` (other loggers: nothing). The module needs `data.image_tokenizer`.

    Args:
        prompts: the texts (default: the captions of the first `num_samples` validation rows of the generate task).
        num_samples: prompts taken from the validation data when `prompts` is not given.
    """

    def __init__(self, prompts: Optional[list[str]] = None, num_samples: int = 4,
                 every_n_validations: int = 1) -> None:
        if num_samples < 1 or every_n_validations < 1:
            raise ValueError("ImageSamples: num_samples and every_n_validations must be >= 1")
        self.prompts = prompts
        self.num_samples = num_samples
        self.every_n_validations = every_n_validations
        self._runs = 0
        self._found: list[str] = []
        self.last_rows: list[dict[str, Any]] = []

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.prompts is not None or len(self._found) >= self.num_samples or "task_ids" not in batch:
            return
        from m6lit.data.tasks import PROMPTS, TASKS

        tokenizer = trainer.datamodule.tokenizer
        marker = len(tokenizer.encode(PROMPTS["generate"], add_special_tokens=False))
        for row in (batch["task_ids"] == TASKS.index("generate")).nonzero().flatten().tolist():
            ids = batch["input_ids"][row, marker:int(batch["prefix_len"][row])]
            if ids.numel():  # a caption-dropped row has no prompt text
                self._found.append(tokenizer.decode(ids, skip_special_tokens=True))

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        prompts = self.prompts if self.prompts is not None else self._found[:self.num_samples]
        self._found = []
        if trainer.sanity_checking or not prompts or not trainer.is_global_zero:
            return
        self._runs += 1
        if (self._runs - 1) % self.every_n_validations:
            return
        with torch.no_grad():
            images = pl_module.generate_images(list(prompts))["images"]  # type: ignore[operator]
        self.last_rows = [{"prompt": p, "image": to_pil(im)} for p, im in zip(prompts, images)]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.log_table(key="val/image_samples", columns=["prompt", "image"],
                                 data=[[r["prompt"], wandb.Image(r["image"])] for r in self.last_rows],
                                 step=trainer.global_step)
