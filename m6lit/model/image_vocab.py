"""The image part of the M6 vocabulary: text ids first, then begin/end-of-image, then the image tokenizer's codes.

With a text vocabulary of V ids and a codebook of K codes, `vocab_size` = V + 2 + K: BOI = V, EOI = V + 1, code c
has id V + 2 + c. The logit masks keep generation inside the right part: only codes at image positions, never an
image id at text positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import M6Config

__all__ = ["ImageVocab", "mask_image_ids", "mask_non_code_ids"]


@dataclass(frozen=True)
class ImageVocab:
    """Id layout of the image part of the vocabulary (see the module docstring)."""

    text_vocab_size: int
    codebook_size: int
    grid_size: int

    @classmethod
    def from_config(cls, config: M6Config) -> "ImageVocab":
        """The layout of `config`; a `ValueError` when the config has no image codes."""
        k = config.image_codebook_size
        if not k:
            raise ValueError("M6Config.image_codebook_size=0: this model has no image codes (set "
                             "data.image_tokenizer to train one that generates images)")
        return cls(config.vocab_size - k - 2, k, config.image_grid_size)

    @property
    def boi(self) -> int:
        return self.text_vocab_size

    @property
    def eoi(self) -> int:
        return self.text_vocab_size + 1

    @property
    def code_offset(self) -> int:
        return self.text_vocab_size + 2

    @property
    def vocab_size(self) -> int:
        return self.code_offset + self.codebook_size

    @property
    def num_codes(self) -> int:
        """Codes per image (grid_size ** 2)."""
        return self.grid_size * self.grid_size

    def codes_to_ids(self, codes: Tensor) -> Tensor:
        """Tokenizer codes in [0, K) → vocabulary ids."""
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"image codes must lie in [0, codebook_size={self.codebook_size})")
        return codes + self.code_offset

    def ids_to_codes(self, ids: Tensor) -> Tensor:
        """Vocabulary ids of image codes → tokenizer codes; any other id is an error."""
        codes = ids - self.code_offset
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"ids outside the image-code range [{self.code_offset}, {self.vocab_size})")
        return codes

    def check_tokenizer(self, codebook_size: int, grid_size: int, where: str = "data.image_tokenizer") -> None:
        """Raise a `ValueError` naming both keys when an image tokenizer disagrees with this layout."""
        if codebook_size != self.codebook_size:
            raise ValueError(f"model.config.image_codebook_size={self.codebook_size} disagrees with {where} "
                             f"(a codebook of {codebook_size} codes)")
        if grid_size != self.grid_size:
            raise ValueError(f"model.config.image_grid_size={self.grid_size} disagrees with {where} (a "
                             f"{grid_size}x{grid_size} code grid)")


def mask_non_code_ids(logits: Tensor, vocab: ImageVocab) -> Tensor:
    """Logits at an image position: every id that is not an image code set to -inf."""
    ids = torch.arange(logits.shape[-1], device=logits.device)
    keep = (ids >= vocab.code_offset) & (ids < vocab.vocab_size)
    return logits.masked_fill(~keep, float("-inf"))


def mask_image_ids(logits: Tensor, vocab: ImageVocab) -> Tensor:
    """Logits at a text position: begin/end-of-image and every image code set to -inf."""
    ids = torch.arange(logits.shape[-1], device=logits.device)
    return logits.masked_fill(ids >= vocab.boi, float("-inf"))
