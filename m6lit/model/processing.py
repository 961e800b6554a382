"""Image preprocessing of M6 and its Hugging Face processors: `M6ImageProcessor` (`AutoImageProcessor`) and
`M6Processor` (`AutoProcessor`: image processor + tokenizer, what the "image-text-to-text" pipeline runs).

`image_to_tensor` is the one implementation of m6lit's image path (RGB, resize the shorter side, centre crop,
scale to [-1, 1]); m6lit's data pipeline and the exported image processor both call it, so an exported model sees
exactly the pixels it was trained on. This file ships as remote code with every export: it imports only torch,
numpy, PIL and transformers.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_transforms import to_pil_image
from transformers.processing_utils import ProcessorMixin

#: m6lit's caption task prompt, used when the processor gets images and no text
CAPTION_PROMPT = "caption:"


def image_to_tensor(image: Image.Image, image_size: int) -> torch.Tensor:
    """RGB, resize the shorter side to ``image_size``, center-crop, scale to [−1, 1]: float32 ``[3, S, S]``."""
    image = image.convert("RGB")
    width, height = image.size
    if (width, height) != (image_size, image_size):
        scale = image_size / min(width, height)
        new_w, new_h = max(image_size, round(width * scale)), max(image_size, round(height * scale))
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
        image = image.crop((left, top, left + image_size, top + image_size))
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy((array - 0.5) / 0.5).permute(2, 0, 1).contiguous()


def _as_pil(image: Any, index: int) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return to_pil_image(image)
    raise TypeError(f"image {index} is a {type(image).__name__}; pass PIL images, numpy arrays or torch tensors")


class M6ImageProcessor(BaseImageProcessor):
    """Images → `pixel_values` [B, 3, S, S] with m6lit's `image_to_tensor` (S = the model's `image_size`)."""

    model_input_names: ClassVar[list[str]] = ["pixel_values"]

    def __init__(self, image_size: int = 224, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.image_size = int(image_size)

    def preprocess(self, images: Any, return_tensors: str | None = "pt", **kwargs: Any) -> BatchFeature:
        """One image or a list of images (PIL, or numpy/torch arrays as `to_pil_image` reads them)."""
        unknown = sorted(set(kwargs) - {"do_convert_rgb", "input_data_format", "data_format"})
        if unknown:
            raise TypeError(f"M6ImageProcessor: unknown arguments {unknown}; m6lit's image path has no options "
                            f"besides image_size={self.image_size}")
        batch = images if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise ValueError("M6ImageProcessor: no images")
        pixels = torch.stack([image_to_tensor(_as_pil(image, i), self.image_size) for i, image in enumerate(batch)])
        return BatchFeature(data={"pixel_values": pixels}, tensor_type=return_tensors)


class M6Processor(ProcessorMixin):
    """`M6ImageProcessor` + the model's tokenizer. Text is tokenized without special tokens (an M6 prompt is a
    prefix to continue, never a finished text ending in EOS) and padded on the left; images without text get
    m6lit's caption prompt."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def __call__(self, images: Any = None, text: str | list[str] | None = None, return_tensors: str | None = "pt",
                 **kwargs: Any) -> BatchFeature:
        if images is None and text is None:
            raise ValueError("M6Processor: pass images, text or both")
        data: dict[str, Any] = {}
        n_images = None
        if images is not None:
            data.update(self.image_processor(images, return_tensors=None))
            n_images = len(data["pixel_values"])
        if text is None:
            text = CAPTION_PROMPT
        texts = [text] if isinstance(text, str) else list(text)
        if n_images is not None and len(texts) == 1 and n_images > 1:
            texts = texts * n_images
        if n_images is not None and len(texts) != n_images:
            raise ValueError(f"M6Processor: {n_images} images but {len(texts)} texts; pass one text per image (or one "
                             f"for all)")
        kwargs.setdefault("padding", "longest")
        kwargs["add_special_tokens"] = kwargs.get("add_special_tokens", False)
        data.update(self.tokenizer(texts, return_tensors=None, **kwargs))
        return BatchFeature(data=data, tensor_type=return_tensors)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


M6ImageProcessor.register_for_auto_class("AutoImageProcessor")
M6Processor.register_for_auto_class("AutoProcessor")

__all__ = ["CAPTION_PROMPT", "M6ImageProcessor", "M6Processor", "image_to_tensor"]
