"""m6lit data: tokenizer, demo data, sample sources, M6 task examples, and the Lightning data module.

Everything here except ``ImageTextDataModule`` is plain PyTorch; the data module (and with it Lightning) is
imported only when that name is first used.
"""

from __future__ import annotations

from typing import Any

from .demo import DemoImageText
from .sources import BadSampleError, HFSource, JsonlSource, SourceSpec, WebDatasetSource, build_source
from .tasks import PROMPTS, ExampleBuilder, TaskMix, collate, span_corrupt
from .tokenizer import load_tokenizer, sentinel_ids

__all__ = [
    "PROMPTS",
    "BadSampleError",
    "DemoImageText",
    "ExampleBuilder",
    "HFSource",
    "ImageTextDataModule",
    "JsonlSource",
    "SourceSpec",
    "TaskMix",
    "WebDatasetSource",
    "build_source",
    "collate",
    "load_tokenizer",
    "sentinel_ids",
    "span_corrupt",
]


def __getattr__(name: str) -> Any:
    if name == "ImageTextDataModule":
        from .datamodule import ImageTextDataModule

        return ImageTextDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
