"""Pooled multimodal features: one vector per sample from the image, the text, or both, for tagging and retrieval.

Every position attends to every other valid position (the whole input is bidirectional context, as the M6
article's feature extraction reads it), and the final hidden states (after the last norm) are pooled over the
chosen modality's valid positions: their mean, or one chosen position. Padding and batch composition do not change
a row's features. The exported Hugging Face class calls this same function.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

import torch
from torch import Tensor

__all__ = ["FEATURE_MODALITIES", "FeatureModality", "Pooling", "check_feature_options", "multimodal_features"]

FeatureModality = Literal["joint", "image", "text"]
#: "mean" over valid positions, or the index of one position among the modality's valid ones (0 = first, -1 = last)
Pooling = Union[Literal["mean"], int]
FEATURE_MODALITIES: tuple[str, ...] = ("joint", "image", "text")


def check_feature_options(modality: str, pooling: Pooling, key: str = "features") -> None:
    """Raise a clear error for an unknown modality or pooling (``key`` names the setting in messages)."""
    if modality not in FEATURE_MODALITIES:
        raise ValueError(f"{key}: modality={modality!r} must be one of {FEATURE_MODALITIES}")
    if pooling != "mean" and (isinstance(pooling, bool) or not isinstance(pooling, int)):
        raise ValueError(f"{key}: pooling={pooling!r} must be 'mean' or a position index (0 = first, -1 = last)")


def multimodal_features(model: torch.nn.Module, input_ids: Optional[Tensor] = None,
                        attention_mask: Optional[Tensor] = None, pixel_values: Optional[Tensor] = None,
                        image_mask: Optional[Tensor] = None, modality: FeatureModality = "joint",
                        pooling: Pooling = "mean") -> Tensor:
    """Features [B, D] (float32) of an ``M6Model`` for a batch of texts (right-padded ``input_ids`` [B, T] with
    ``attention_mask``) and/or images (``pixel_values`` [B, C, H, W], ``image_mask`` [B] for rows that have one).

    Gradients flow when enabled (fine-tuning); wrap in ``torch.no_grad()`` for extraction.
    ``modality="image"`` ignores the text, ``"text"`` the image, ``"joint"`` reads both and pools over both (a
    batch without ``pixel_values`` is all text). A row
    with nothing to pool (no image for image features, no text for text features) is an error naming the row.
    """
    check_feature_options(modality, pooling)
    if modality == "image" and pixel_values is None:
        raise ValueError("image features need pixel_values")
    if modality == "text" and input_ids is None:
        raise ValueError("text features need input_ids")
    if pixel_values is None and input_ids is None:
        raise ValueError("joint features need input_ids or pixel_values")
    if pixel_values is None:
        modality_in = "text"
    else:
        modality_in = modality
    device = next(model.parameters()).device
    if modality == "image" or input_ids is None:
        b = pixel_values.shape[0]
        input_ids = torch.zeros(b, 0, dtype=torch.long, device=device)
        attention_mask = torch.zeros(b, 0, dtype=torch.bool, device=device)
    elif attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    attention_mask = attention_mask.bool()
    b = input_ids.shape[0]
    config = getattr(model, "config", None)
    patches = config.num_patches if config is not None and modality_in != "text" else 0
    if config is not None and input_ids.shape[1] + patches > config.max_seq_len:
        raise ValueError(f"{modality} features: {patches} image patches + {input_ids.shape[1]} text positions exceed "
                         f"max_seq_len={config.max_seq_len}; shorten the texts")
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "prefix_len": attention_mask.sum(1)}
    if modality_in != "text":
        batch["pixel_values"] = pixel_values
        if image_mask is not None:
            batch["image_mask"] = image_mask
    out = model(batch, return_hidden=True, compute_logits=False)
    hidden, p = out.hidden.float(), out.image_len  # [B, P + T, D]: image patches first
    if modality_in == "text":
        valid = attention_mask
        hidden = hidden[:, p:]
    else:
        has_image = (torch.ones(b, dtype=torch.bool, device=hidden.device) if image_mask is None
                     else image_mask.bool().to(hidden.device))
        image_valid = has_image.view(-1, 1).expand(-1, p)
        if modality == "image":
            valid, hidden = image_valid, hidden[:, :p]
        else:
            valid = torch.cat([image_valid, attention_mask], dim=1)
    counts = valid.sum(1)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"{modality} features: row(s) {empty} have no {'image' if modality == 'image' else 'text'}"
                         f"{'' if modality != 'joint' else ' or image'} to pool")
    if pooling == "mean":
        weight = valid.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weight).sum(1) / counts.unsqueeze(-1).to(hidden.dtype)
    # the pooling-th valid position of each row (negative: from the end)
    index = pooling if pooling >= 0 else counts + pooling
    index = torch.as_tensor(index, device=hidden.device).expand(b)
    if bool(((index < 0) | (index >= counts)).any()):
        raise ValueError(f"{modality} features: pooling={pooling} is outside a row with {int(counts.min())} valid "
                         f"positions")
    rank = valid.long().cumsum(1) - 1  # [B, L]: position's rank among the row's valid ones
    pick = (rank == index.view(-1, 1)) & valid
    return hidden[pick.nonzero(as_tuple=True)].view(b, -1)
