"""VQ image tokenizer: a small `transformers.JanusVQVAE` network trained with `vector_quantize_pytorch`.

The network (encoder, 1x1 convs, decoder) is a `JanusVQVAE`, so the exported folder loads in plain transformers.
Its own quantizer has no EMA, k-means init or dead-code restart and collapses when trained from scratch, so training
quantizes with `VectorQuantize` (cosine similarity = an l2-normalised codebook, as `JanusVQVAE.decode` expects) and
`sync_codebook` writes the codebook back into the Janus quantizer. `encode`/`decode` always run the Janus code path,
so what m6lit computes and what the exported folder computes are the same operations on the same weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn
from transformers import JanusVQVAE, JanusVQVAEConfig
from vector_quantize_pytorch import VectorQuantize

__all__ = ["ImageTokenizer", "TokenizerOutput", "load_image_tokenizer", "tokenizer_config"]


class TokenizerOutput(NamedTuple):
    """Training-time forward: reconstruction [B, C, H, W], codes [B, g*g], commitment loss (scalar)."""

    reconstruction: Tensor
    codes: Tensor
    commitment_loss: Tensor


def tokenizer_config(image_size: int = 48, codebook_size: int = 512, embed_dim: int = 8,
                     base_channels: int = 32, channel_multiplier: Sequence[int] = (1, 2, 2),
                     num_res_blocks: int = 1, latent_channels: int = 64) -> JanusVQVAEConfig:
    """A small `JanusVQVAEConfig`; the downsampling factor is 2 ** (len(channel_multiplier) - 1) and must divide
    `image_size` (the code grid is image_size / factor on each side)."""
    factor = 2 ** (len(channel_multiplier) - 1)
    if image_size % factor:
        raise ValueError(f"image_size={image_size} is not divisible by the tokenizer's downsampling factor {factor} "
                         f"(2 ** (len(channel_multiplier) - 1) with channel_multiplier={list(channel_multiplier)})")
    for key, value in (("base_channels", base_channels), ("latent_channels", latent_channels)):
        if value % 32:
            raise ValueError(f"{key}={value} must be a multiple of 32 (the network's GroupNorm has 32 groups)")
    return JanusVQVAEConfig(embed_dim=embed_dim, num_embeddings=codebook_size, latent_channels=latent_channels,
                            base_channels=base_channels, channel_multiplier=list(channel_multiplier),
                            num_res_blocks=num_res_blocks, num_patches=image_size // factor,
                            image_size=image_size, in_channels=3, out_channels=3)


class ImageTokenizer(nn.Module):
    """Pixels in [-1, 1] ↔ a raster-order grid of `grid_size ** 2` codes in [0, codebook_size).

    Args:
        config: the network (see `tokenizer_config`).
        decay / kmeans_init / threshold_ema_dead_code / commitment_weight: `VectorQuantize` settings (EMA codebook,
            k-means initialisation on the first batch, restart of codes whose EMA usage falls below the threshold).
    """

    def __init__(self, config: JanusVQVAEConfig, decay: float = 0.99, kmeans_init: bool = True,
                 threshold_ema_dead_code: float = 2.0, commitment_weight: float = 0.25) -> None:
        super().__init__()
        self.vqvae = JanusVQVAE(config)
        self.vq = VectorQuantize(dim=config.embed_dim, codebook_size=config.num_embeddings, decay=decay,
                                 kmeans_init=kmeans_init, threshold_ema_dead_code=threshold_ema_dead_code,
                                 commitment_weight=commitment_weight, use_cosine_sim=True)
        self.vqvae.quantize.embedding.weight.requires_grad_(False)
        self.sync_codebook()

    @property
    def config(self) -> JanusVQVAEConfig:
        return self.vqvae.config

    @property
    def grid_size(self) -> int:
        return int(self.config.num_patches)

    @property
    def codebook_size(self) -> int:
        return int(self.config.num_embeddings)

    @property
    def image_size(self) -> int:
        return int(self.config.num_patches) * 2 ** (len(self.config.channel_multiplier) - 1)

    def forward(self, pixel_values: Tensor) -> TokenizerOutput:
        """Training path: encode, quantize with `VectorQuantize` (updates the EMA codebook in train mode), decode."""
        self._check_pixels(pixel_values)
        latent = self.vqvae.quant_conv(self.vqvae.encoder(pixel_values))  # [B, D, g, g]
        b, d, h, w = latent.shape
        quantized, codes, commit = self.vq(latent.flatten(2).transpose(1, 2))  # [B, g*g, D], [B, g*g]
        quantized = quantized.transpose(1, 2).reshape(b, d, h, w)
        reconstruction = self.vqvae.decoder(self.vqvae.post_quant_conv(quantized))
        return TokenizerOutput(reconstruction, codes, commit.sum())

    @torch.no_grad()
    def sync_codebook(self) -> None:
        """Write `VectorQuantize`'s (unit-norm) codebook into the Janus quantizer that `encode`/`decode` use."""
        self.vqvae.quantize.embedding.weight.copy_(self.vq.codebook.detach().to(self.vqvae.quantize.embedding.weight))

    @torch.no_grad()
    def encode(self, pixel_values: Tensor) -> Tensor:
        """[B, 3, S, S] pixels in [-1, 1] → [B, g*g] codes (raster order), via the Janus code path."""
        self._check_pixels(pixel_values)
        self.sync_codebook()
        return self.vqvae.encode(pixel_values).image_tokens.view(pixel_values.shape[0], -1)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """[B, g*g] codes → [B, 3, S, S] pixels (unclamped), via `JanusVQVAE.decode`."""
        self.sync_codebook()
        return self.vqvae.decode(codes)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the network with the trained codebook as a transformers `JanusVQVAE` folder."""
        self.sync_codebook()
        self.vqvae.save_pretrained(str(folder))

    def _check_pixels(self, pixel_values: Tensor) -> None:
        size = self.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(f"image tokenizer: pixel_values has shape {tuple(pixel_values.shape)}; expected "
                             f"[B, 3, {size}, {size}] (its image_size)")


def load_image_tokenizer(folder: str | Path, key: str = "image_tokenizer") -> JanusVQVAE:
    """The frozen `JanusVQVAE` saved in `folder` (eval mode, no gradients); errors name `key` and the folder."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ValueError(f"{key}={str(folder)!r}: not a directory; train one with `m6lit fit --config "
                         f"configs/tokenizer-demo.yaml` (it writes the folder given as model.init_args.export_dir)")
    if not (path / "config.json").is_file():
        raise ValueError(f"{key}={str(folder)!r}: no config.json in the folder (not a saved image tokenizer)")
    try:
        model = JanusVQVAE.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{key}={str(folder)!r}: cannot be loaded as a JanusVQVAE: {err}") from err
    model.eval().requires_grad_(False)
    return model
