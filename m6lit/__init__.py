"""m6lit: a Lightning trainer for M6-style multimodal Mixture-of-Experts models."""

__version__ = "0.1.0"

from .model.hf import register_auto_classes as _register_auto_classes

_register_auto_classes()  # AutoConfig / AutoModelForCausalLM know model_type "m6" once m6lit is imported
