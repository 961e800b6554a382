"""Input embeddings: image patches (strided-conv patchify + learned positions) and text tokens (+ positions),
each tagged with a learned modality embedding so the shared transformer can tell them apart."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGE, TEXT = 0, 1


def check_token_ids(input_ids: Tensor, vocab_size: int) -> None:
    """Raise ValueError if any id lies outside [0, vocab_size) (reads the tensor: call it on host tensors)."""
    if int(input_ids.max()) >= vocab_size or int(input_ids.min()) < 0:
        raise ValueError(f"input_ids hold ids outside [0, vocab_size={vocab_size}) (min {int(input_ids.min())}, "
                         f"max {int(input_ids.max())}); check that config.vocab_size matches the tokenizer")


class ImagePatchEmbed(nn.Module):
    """Patchify pixels [B, C, H, W] into [B, P, D] with a strided conv and add learned patch positions.

    `centered` embeds each patch's channel means apart from the rest of the patch: the conv sees the patch minus
    its means, a 1x1 projection (`mean_proj`) sees the means. The function class is the same (both are linear in
    the pixels), the training is not: in the plain conv the response to a uniform patch is the sum of the patch's
    p² weights per channel, so under Adam it moves p² times faster than any one weight and a uniform background
    (white, black) puts one large shared vector on every patch, which hides the object's patch; centred, the
    background's colour has weights of its own, at the scale of one weight.

    `backbone`, if given, replaces the conv: any module mapping pixels to [B, D, H', W'] or [B, P, D] with P equal
    to the configured number of patches (e.g. a pretrained CNN's feature map followed by a 1x1 projection).
    """

    def __init__(self, image_size: int, patch_size: int, in_channels: int, d_model: int,
                 backbone: Optional[nn.Module] = None, centered: bool = False) -> None:
        super().__init__()
        if centered and backbone is not None:
            raise ValueError("patch_centered applies to the built-in patch conv; an image backbone replaces it")
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_patches = (image_size // patch_size) ** 2
        self.proj = backbone if backbone is not None else nn.Conv2d(
            in_channels, d_model, kernel_size=patch_size, stride=patch_size)
        self.mean_proj = nn.Conv2d(in_channels, d_model, kernel_size=1, bias=False) if centered else None
        self.pos = nn.Parameter(torch.zeros(1, self.num_patches, d_model))

    def forward(self, pixel_values: Tensor) -> Tensor:
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected "
                             f"[B, C, {self.image_size}, {self.image_size}] (config.image_size)")
        feats = self.proj(pixel_values)
        if self.mean_proj is not None:
            # proj(x - mean) = proj(x) - (sum of proj's p² weights per channel) · mean, without the centred copy
            means = F.avg_pool2d(pixel_values, self.patch_size)  # [B, C, H/p, W/p]
            uniform = self.proj.weight.sum(dim=(2, 3), keepdim=True)  # [D, C, 1, 1]
            feats = feats - F.conv2d(means, uniform) + self.mean_proj(means)
        if feats.dim() == 4:
            feats = feats.flatten(2).transpose(1, 2)
        if feats.shape[1] != self.num_patches:
            raise ValueError(f"image backbone produced {feats.shape[1]} patches; config expects {self.num_patches}")
        return feats + self.pos


class M6Embeddings(nn.Module):
    """Token + text-position embeddings, patch embeddings, and a 2-way modality embedding."""

    def __init__(self, vocab_size: int, d_model: int, max_seq_len: int, image_size: int, patch_size: int,
                 in_channels: int, backbone: Optional[nn.Module] = None, image_grid_size: int = 0,
                 image_code_offset: int = 0, patch_centered: bool = False) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, d_model)
        # image codes (ids >= image_code_offset) also get a 2-D row/column position in their code grid
        self.image_grid_size = image_grid_size
        self.image_code_offset = image_code_offset
        self.code_row = nn.Embedding(image_grid_size, d_model) if image_grid_size else None
        self.code_col = nn.Embedding(image_grid_size, d_model) if image_grid_size else None
        self.text_pos = nn.Embedding(max_seq_len, d_model)
        self.modality = nn.Embedding(2, d_model)
        self.patches = ImagePatchEmbed(image_size, patch_size, in_channels, d_model, backbone, patch_centered)
        self.max_seq_len = max_seq_len

    #: check the id range of accelerator tensors too (a host sync per forward: a debug switch). Host tensors are
    #: always checked; training batches are checked on the host before they move (M6LitModule)
    check_ids: bool = False

    def text(self, input_ids: Tensor, position_ids: Tensor, code_index: Optional[Tensor] = None) -> Tensor:
        """[B, T] token ids at text positions `position_ids` → [B, T, D]. Image codes add the row and column of
        their index in the code grid: `code_index` [B, T] when given (generation), else the running count of codes
        in the row (one image per sequence)."""
        if (self.check_ids or input_ids.device.type == "cpu") and input_ids.numel():
            check_token_ids(input_ids, self.tokens.num_embeddings)
        out = self.tokens(input_ids) + self.text_pos(position_ids) + self.modality.weight[TEXT]
        if self.code_row is None or self.code_col is None:
            return out
        is_code = input_ids >= self.image_code_offset
        if code_index is None:
            code_index = is_code.long().cumsum(1) - 1
        grid = self.image_grid_size
        index = code_index.clamp(0, grid * grid - 1)
        codes = self.code_row(index // grid) + self.code_col(index % grid)
        return out + codes * is_code.unsqueeze(-1).to(out.dtype)

    def image(self, pixel_values: Tensor) -> Tensor:
        """[B, C, H, W] → [B, P, D] patch embeddings."""
        return self.patches(pixel_values.to(self.patches.pos.dtype)) + self.modality.weight[IMAGE]
