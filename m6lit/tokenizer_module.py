"""ImageTokenizerModule: trains the VQ image tokenizer (m6lit.model.image_tokenizer) on the images of the data
sources.

Loss: L1 + L2 reconstruction + the quantizer's commitment loss; the codebook itself is an EMA (k-means
initialised, dead codes restarted). Logged: reconstruction losses, codebook usage and perplexity of the batch's
codes, dead codes (EMA usage below the restart threshold), and at validation a grid of originals beside their
reconstructions (W&B image `val/reconstructions`). Dead-code restarts draw from torch's global RNG, so checkpoints
carry its state and a resumed fit continues exactly. With `export_dir`, the end of `fit` writes the tokenizer folder
that `data.image_tokenizer` reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchmetrics import MeanMetric

from .model.image_tokenizer import ImageTokenizer, tokenizer_config

__all__ = ["ImageTokenizerModule", "code_statistics", "reconstruction_grid"]


def code_statistics(codes: Tensor, codebook_size: int) -> tuple[Tensor, Tensor]:
    """(fraction of the codebook used, perplexity exp(H) of the code histogram) of a batch of codes."""
    counts = torch.bincount(codes.reshape(-1), minlength=codebook_size).float()
    probs = counts / counts.sum().clamp(min=1)
    entropy = -(probs * probs.clamp(min=1e-12).log()).sum()
    return (counts > 0).float().mean(), entropy.exp()


def reconstruction_grid(originals: Tensor, reconstructions: Tensor) -> np.ndarray:
    """uint8 [n*S, 2*S, 3] image: row i is original i beside its reconstruction (pixels in [-1, 1])."""
    pairs = torch.stack([originals, reconstructions.clamp(-1, 1)], dim=1)  # [n, 2, 3, S, S]
    n, _, c, s, _ = pairs.shape
    grid = pairs.permute(0, 3, 1, 4, 2).reshape(n * s, 2 * s, c)  # rows of (original | reconstruction)
    return ((grid.float().cpu().numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


class ImageTokenizerModule(LightningModule):
    """Trains an `ImageTokenizer` on `batch["pixel_values"]` (rows with `image_mask`).

    Args:
        image_size / codebook_size / embed_dim / base_channels / channel_multiplier / num_res_blocks /
            latent_channels: the network (`tokenizer_config`).
        decay / kmeans_init / threshold_ema_dead_code / commitment_weight: the quantizer.
        l1_weight / l2_weight: reconstruction loss weights.
        optimizer: optimizer factory (default Adam lr 1e-3, betas (0.5, 0.9)).
        export_dir: folder written at the end of `fit` (a transformers `JanusVQVAE`).
        num_logged_images: originals/reconstructions in the validation grid.
    """

    def __init__(self, image_size: int = 48, codebook_size: int = 512, embed_dim: int = 8, base_channels: int = 32,
                 channel_multiplier: list[int] = [1, 2, 2], num_res_blocks: int = 1, latent_channels: int = 64,
                 decay: float = 0.99, kmeans_init: bool = True, threshold_ema_dead_code: float = 2.0,
                 commitment_weight: float = 0.25, l1_weight: float = 1.0, l2_weight: float = 1.0,
                 optimizer: Optional[OptimizerCallable] = None, export_dir: Optional[str] = None,
                 num_logged_images: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        config = tokenizer_config(image_size, codebook_size, embed_dim, base_channels, tuple(channel_multiplier),
                                  num_res_blocks, latent_channels)
        self.tokenizer = ImageTokenizer(config, decay, kmeans_init, threshold_ema_dead_code, commitment_weight)
        self.optimizer_factory: Callable[..., torch.optim.Optimizer] = optimizer or (
            lambda params: torch.optim.Adam(params, lr=1e-3, betas=(0.5, 0.9)))
        self.val_recon = MeanMetric()
        self.val_usage = MeanMetric()
        self._val_images: Optional[tuple[Tensor, Tensor]] = None
        self._pending_rng: Optional[Tensor] = None

    # ------------------------------------------------------------------ steps
    def _pixels(self, batch: dict[str, Tensor]) -> Optional[Tensor]:
        pixels = batch.get("pixel_values")
        if pixels is None:
            return None
        mask = batch.get("image_mask")
        return pixels if mask is None else pixels[mask.bool()]

    def losses(self, pixels: Tensor) -> dict[str, Tensor]:
        """Training-path losses of a batch of pixels: total, l1, l2, commitment, plus its codes."""
        out = self.tokenizer(pixels)
        l1 = F.l1_loss(out.reconstruction, pixels)
        l2 = F.mse_loss(out.reconstruction, pixels)
        total = self.hparams.l1_weight * l1 + self.hparams.l2_weight * l2 + out.commitment_loss
        return {"loss": total, "l1": l1, "l2": l2, "commitment": out.commitment_loss, "codes": out.codes}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Optional[Tensor]:
        pixels = self._pixels(batch)
        if pixels is None or pixels.shape[0] == 0:
            raise ValueError("image tokenizer: a training batch has no images; give it image sources, and set "
                             "data.task_mix to caption only (the lm task drops the image)")
        losses = self.losses(pixels)
        bs = pixels.shape[0]
        usage, perplexity = code_statistics(losses["codes"], self.hparams.codebook_size)
        dead = (self.tokenizer.vq._codebook.cluster_size < self.hparams.threshold_ema_dead_code).sum()
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=bs)
        self.log("train/recon_l1", losses["l1"], batch_size=bs)
        self.log("train/recon_l2", losses["l2"], batch_size=bs)
        self.log("train/commitment", losses["commitment"], batch_size=bs)
        self.log("train/codebook_usage", usage, batch_size=bs)
        self.log("train/codebook_perplexity", perplexity, batch_size=bs)
        self.log("train/dead_codes", dead.float(), batch_size=bs)
        return losses["loss"]

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        pixels = self._pixels(batch)
        if pixels is None or pixels.shape[0] == 0:
            return
        codes = self.tokenizer.encode(pixels)
        recon = self.tokenizer.decode(codes)
        self.val_recon.update(F.l1_loss(recon, pixels), weight=pixels.shape[0])
        self.val_usage.update(code_statistics(codes, self.hparams.codebook_size)[0])
        if batch_idx == 0:
            n = self.hparams.num_logged_images
            self._val_images = (pixels[:n].detach(), recon[:n].detach())

    def on_validation_epoch_end(self) -> None:
        if self.val_recon.update_count:
            self.log("val/recon_l1", self.val_recon.compute(), prog_bar=True)
            self.log("val/codebook_usage", self.val_usage.compute())
        self.val_recon.reset()
        self.val_usage.reset()
        images, self._val_images = self._val_images, None
        if images is None or self._trainer is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        grid = reconstruction_grid(*images)
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="val/reconstructions", images=[grid], step=self.global_step,
                                 caption=["original | reconstruction"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory([p for p in self.parameters() if p.requires_grad])

    # ------------------------------------------------------------------ checkpoints and export
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["m6lit_rng"] = {"cpu": torch.get_rng_state(),
                                   "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._pending_rng = checkpoint.get("m6lit_rng")

    def on_train_start(self) -> None:
        rng, self._pending_rng = self._pending_rng, None
        if rng is not None:
            torch.set_rng_state(rng["cpu"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])

    def on_fit_end(self) -> None:
        if self.hparams.export_dir and self.trainer.is_global_zero:
            self.export(self.hparams.export_dir)

    def export(self, folder: str | Path) -> Path:
        """Write the tokenizer (network + codebook) as a transformers `JanusVQVAE` folder."""
        folder = Path(folder)
        self.tokenizer.save_pretrained(folder)
        rank_zero_info(f"m6lit: image tokenizer written to {folder}")
        return folder
