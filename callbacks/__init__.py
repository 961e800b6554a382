"""m6lit callbacks (installed as `m6lit.callbacks`): they orchestrate pure model functions during training."""

from m6lit.callbacks.samples import CaptionSamples

__all__ = ["CaptionSamples"]
