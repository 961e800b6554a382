"""m6lit callbacks: they orchestrate pure model functions during training."""

from m6lit.callbacks.caption_accuracy import CaptionAccuracy
from m6lit.callbacks.expert_split_merge import ExpertEvent, ExpertSplitMerge
from m6lit.callbacks.features import FeatureWriter
from m6lit.callbacks.images import ImageSamples, ImageWriter
from m6lit.callbacks.moe_monitor import MoEMonitor
from m6lit.callbacks.predictions import CaptionWriter
from m6lit.callbacks.pseudo_to_real import DelinkEvent, PseudoToReal
from m6lit.callbacks.samples import CaptionSamples

__all__ = ["CaptionAccuracy", "CaptionSamples", "CaptionWriter", "DelinkEvent", "ExpertEvent", "ExpertSplitMerge",
           "FeatureWriter", "ImageSamples", "ImageWriter", "MoEMonitor", "PseudoToReal"]
