"""The M6 model: pure PyTorch, relative imports only (ships as Hugging Face remote code)."""

from .attention import Attention, KVCache, prefix_lm_mask
from .block import SwiGLU, TransformerBlock
from .config import M6Config
from .embeddings import ImagePatchEmbed, M6Embeddings
from .m6 import IGNORE_INDEX, M6Model, M6Output, lm_loss, token_stats
from .moe import GroupedExperts, MoEAux, MoELayer, Router
from .sharing import ParamLink, ParamMap, clone_module, delink, layer_to_block

__all__ = [
    "Attention", "GroupedExperts", "IGNORE_INDEX", "ImagePatchEmbed", "KVCache", "M6Config", "M6Embeddings",
    "M6Model", "M6Output", "MoEAux", "MoELayer", "ParamLink", "ParamMap", "Router", "SwiGLU", "TransformerBlock",
    "clone_module", "delink", "layer_to_block", "lm_loss", "prefix_lm_mask", "token_stats",
]
