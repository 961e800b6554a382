"""CaptionWriter: `m6lit predict` writes every generated caption (with its reference, when known) to JSONL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info


class CaptionWriter(BasePredictionWriter):
    """Appends one JSON line per generated caption: `{"index", "origin", "key" | "image_path", "caption",
    "reference"}`, where `origin` is the sample's source (`file:line`, `shard:key`, `dataset[row i]`), `key` a
    WebDataset sample's `__key__` and `image_path` a JSONL sample's image file.

    Args:
        output_path: the JSONL file; a relative path is taken inside the run's log directory (`trainer.log_dir`,
            e.g. the W&B logger's `save_dir`; `trainer.default_root_dir` without a logger). Overwritten at the start
            of each predict run; one file per rank when several ranks predict: `<stem>.rank<N>.jsonl`.
    """

    def __init__(self, output_path: str = "predictions.jsonl") -> None:
        super().__init__(write_interval="batch")
        self.output_path = output_path
        self._path: Optional[Path] = None
        self._written = 0

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        path = Path(self.output_path)
        if not path.is_absolute():
            path = Path(trainer.log_dir or trainer.default_root_dir) / path
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
        self._path, self._written = path, 0

    def write_on_batch_end(self, trainer: Trainer, pl_module: LightningModule, prediction: Any,
                           batch_indices: Optional[Sequence[int]], batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        if "tokens" not in prediction:
            return  # not captions (e.g. images from `predict_task: generate`, written by ImageWriter)
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        if tokenizer is None:
            raise RuntimeError("CaptionWriter needs a data module with a `tokenizer` to decode captions")
        captions = tokenizer.batch_decode(prediction["tokens"], skip_special_tokens=True)
        references = (tokenizer.batch_decode(batch["reference_ids"], skip_special_tokens=True)
                      if "reference_ids" in batch else [None] * len(captions))
        indices = list(batch_indices) if batch_indices else [None] * len(captions)
        sources = batch.get("sources") or [{}] * len(captions)
        assert self._path is not None
        with self._path.open("a", encoding="utf-8") as out:
            for index, source, caption, reference in zip(indices, sources, captions, references):
                record = {"index": index, **source, "caption": caption, "reference": reference}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._written += len(captions)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rank_zero_info(f"CaptionWriter: wrote {self._written} captions to {self._path}")
