"""m6lit: a Lightning trainer for M6-style multimodal Mixture-of-Experts models."""

__version__ = "0.1.0"
