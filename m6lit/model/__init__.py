"""The M6 model: pure PyTorch, relative imports only (ships as Hugging Face remote code)."""

from .attention import Attention, KVCache, prefix_lm_mask
from .block import SwiGLU, TransformerBlock
from .config import ExpertShape, M6Config
from .embeddings import ImagePatchEmbed, M6Embeddings
from .experts import apply_expert_op, merge_experts, segment_experts, split_experts
from .m6 import IGNORE_INDEX, M6Model, M6Output, lm_loss, token_stats
from .moe import GroupedExperts, MoEAux, MoELayer, Router
from .sharing import ParamLink, ParamMap, delink, fresh_block_like, layer_to_block

__all__ = [
    "Attention", "ExpertShape", "GroupedExperts", "IGNORE_INDEX", "ImagePatchEmbed", "KVCache", "M6Config",
    "M6Embeddings", "M6Model", "M6Output", "MoEAux", "MoELayer", "ParamLink", "ParamMap", "Router", "SwiGLU",
    "TransformerBlock", "apply_expert_op", "delink", "fresh_block_like", "layer_to_block", "lm_loss", "merge_experts",
    "prefix_lm_mask", "segment_experts", "split_experts", "token_stats",
]
