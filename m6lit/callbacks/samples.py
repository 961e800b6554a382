"""CaptionSamples: generated captions beside their images, logged as a W&B table at each validation."""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from m6lit.model import IGNORE_INDEX


def prompts_from_batch(batch: dict[str, Tensor], limit: int, pad_token_id: int = 0) -> Optional[dict[str, Tensor]]:
    """Cut each training-format row back to its prompt (image + first `prefix_len` tokens), right-padded.

    Rows with an image come first; returns None when the batch has no usable row.
    """
    prefix_len = batch["prefix_len"]
    has_image = batch.get("image_mask")
    if has_image is None:
        has_image = torch.full_like(prefix_len, "pixel_values" in batch, dtype=torch.bool)
    order = sorted(range(len(prefix_len)), key=lambda i: (not bool(has_image[i]), i))[:limit]
    if not order:
        return None
    rows = torch.tensor(order, device=prefix_len.device)
    lengths = prefix_len[rows]
    width = int(lengths.max())
    ids = batch["input_ids"][rows, :width].clone()
    mask = torch.arange(width, device=ids.device).unsqueeze(0) < lengths.unsqueeze(1)
    ids = ids.masked_fill(~mask, pad_token_id)
    out = {"input_ids": ids, "attention_mask": mask, "prefix_len": lengths,
           "labels": batch["labels"][rows], "row_has_image": has_image[rows]}
    if "pixel_values" in batch:
        out["pixel_values"] = batch["pixel_values"][rows]
        out["image_mask"] = has_image[rows]
    return out


class CaptionSamples(Callback):
    """Generate for the first `num_samples` rows of the first validation batch (image rows first) and log
    row / prompt / generated / reference as a W&B table (`val/samples`) and the images, captioned with their row and
    generated text, as `val/sample_images` (PNGs inside the run folder); the console gets the first four rows.

    Args:
        num_samples: rows to caption.
        max_new_tokens: generation length (default: the module's `max_new_tokens`).
        every_n_validations: generate at every n-th validation run.
    """

    def __init__(self, num_samples: int = 8, max_new_tokens: Optional[int] = None,
                 every_n_validations: int = 1) -> None:
        if num_samples < 1 or every_n_validations < 1:
            raise ValueError("CaptionSamples: num_samples and every_n_validations must be >= 1")
        self.num_samples = num_samples
        self.max_new_tokens = max_new_tokens
        self.every_n_validations = every_n_validations
        self._prompts: Optional[dict[str, Tensor]] = None
        self._runs = 0
        self.last_rows: list[dict[str, Any]] = []

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx == 0 and dataloader_idx == 0 and self._prompts is None:
            self._prompts = prompts_from_batch(batch, self.num_samples, pl_module.model.config.pad_token_id)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        prompts, self._prompts = self._prompts, None
        if trainer.sanity_checking or prompts is None or not trainer.is_global_zero:
            return
        self._runs += 1
        if (self._runs - 1) % self.every_n_validations:
            return
        # as many new tokens as asked, but never past max_seq_len: a long prompt (a denoising row) leaves less room
        config = pl_module.model.config
        room = (config.max_seq_len - prompts["input_ids"].shape[1]
                - (config.num_patches if "pixel_values" in prompts else 0))
        wanted = self.max_new_tokens if self.max_new_tokens is not None else pl_module.hparams.max_new_tokens
        if room < 1:
            rank_zero_info(f"CaptionSamples: no room to generate (prompts of {prompts['input_ids'].shape[1]} "
                           f"tokens fill max_seq_len={config.max_seq_len}); skipped at step {trainer.global_step}")
            return
        overrides = {"max_new_tokens": min(wanted, room)}
        with torch.no_grad():
            tokens = pl_module.generate(prompts, **overrides)
        tokenizer = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule is not None else None

        def decode(ids: Tensor) -> str:
            ids = [int(t) for t in ids if int(t) >= 0]
            if tokenizer is None:
                return " ".join(map(str, ids))
            return tokenizer.decode(ids, skip_special_tokens=True)

        rows = []
        for i in range(tokens.shape[0]):
            n = int(prompts["prefix_len"][i])
            labels = prompts["labels"][i]
            rows.append({
                "prompt": decode(prompts["input_ids"][i, :n]),
                "generated": decode(tokens[i]),
                "reference": decode(labels[labels != IGNORE_INDEX]),
                "image": _to_image(prompts["pixel_values"][i]) if bool(prompts["row_has_image"][i])
                and "pixel_values" in prompts else None,
            })
        self.last_rows = rows
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if wandb_loggers:
            # Images go through log_image, which writes PNGs into the run folder; inside a table they would be
            # staged outside it (W&B's artifact staging) and the offline run would not be complete as it stands.
            with_image = [(i, r) for i, r in enumerate(rows) if r["image"] is not None]
            data = [[i, r["prompt"], r["generated"], r["reference"]] for i, r in enumerate(rows)]
            for lg in wandb_loggers:
                lg.log_table(key="val/samples", columns=["row", "prompt", "generated", "reference"], data=data,
                             step=trainer.global_step)
                if with_image:
                    lg.log_image(key="val/sample_images", images=[r["image"] for _, r in with_image],
                                 caption=[f"row {i}: {r['generated']}" for i, r in with_image],
                                 step=trainer.global_step)
        for r in rows[:4]:
            rank_zero_info(f"[step {trainer.global_step}] {r['prompt']!r} → {r['generated']!r} "
                           f"(reference {r['reference']!r})")


def _to_image(pixels: Tensor) -> Any:
    """Normalised [-1, 1] CHW pixels → uint8 HWC array."""
    arr = (pixels.float().clamp(-1, 1) * 0.5 + 0.5).mul(255).round().byte()
    return arr.permute(1, 2, 0).cpu().numpy()
