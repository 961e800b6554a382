"""Self-attention with the prefix-LM mask and a preallocated KV cache.

Sequence layout: [image patches][prefix text][target text]. Image patches and the first `prefix_len` text tokens
attend to each other bidirectionally; target tokens attend causally; padding keys are never attended to.

Two implementations of the same mask: a dense boolean `[B, 1, Sq, Sk]` mask for `scaled_dot_product_attention`
(the reference, used on the CPU, for single-token decode steps and with attention dropout), and a FlexAttention
`BlockMask` on CUDA, whose kernel skips fully masked blocks and never materialises the `Sq x Sk` mask. The compiled
FlexAttention kernel is built once per process and reused; sequence lengths are bucketed by the collate's padding
(multiples of 8), and after the first length change torch.compile generalises to dynamic lengths, so a run
compiles the kernel at most twice.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # torch without FlexAttention: the SDPA mask path only
    BlockMask = None  # type: ignore[assignment,misc]
    create_block_mask = flex_attention = None  # type: ignore[assignment]

#: what `Attention.forward` accepts as its mask: the dense boolean reference mask or a FlexAttention BlockMask
AttentionMask = Union[Tensor, Any]

#: FlexAttention's block size: key validity is padded by one block so the mask function never indexes past it
FLEX_BLOCK = 128


def prefix_lm_mask(key_valid: Tensor, bidir_len: Tensor, q_start: int = 0, q_len: Optional[int] = None) -> Tensor:
    """Boolean attention mask [B, 1, Sq, Sk] (True = may attend).

    Query i may see key j iff key j is valid and (j < bidir_len or j <= i). Every query also sees itself, so a
    row is never empty (padding queries then produce finite garbage that nothing downstream reads).
    `q_start`/`q_len` select the query rows (decode steps use the last position only).
    """
    key_len = key_valid.shape[1]
    q_len = key_len - q_start if q_len is None else q_len
    device = key_valid.device
    i = torch.arange(q_start, q_start + q_len, device=device).view(1, q_len, 1)
    j = torch.arange(key_len, device=device).view(1, 1, key_len)
    allowed = key_valid.view(-1, 1, key_len) & ((j < bidir_len.view(-1, 1, 1)) | (j <= i))
    allowed = allowed | (j == i)
    return allowed.unsqueeze(1)


def flex_available(device: torch.device) -> bool:
    """Whether FlexAttention's compiled kernel can run on `device` (CUDA with a torch that ships it)."""
    return flex_attention is not None and torch.device(device).type == "cuda"


def prefix_lm_block_mask(key_valid: Tensor, bidir_len: Tensor, q_start: int = 0,
                         q_len: Optional[int] = None) -> Any:
    """The FlexAttention `BlockMask` of `prefix_lm_mask` (same arguments, same rule, no dense `[Sq, Sk]` tensor
    kept: the block mask holds per-block indices only)."""
    if create_block_mask is None:
        raise RuntimeError("this torch has no torch.nn.attention.flex_attention; use prefix_lm_mask")
    b, key_len = key_valid.shape
    q_len = key_len - q_start if q_len is None else q_len
    # the mask function may be evaluated on indices of a partial last block: pad validity with False
    valid = F.pad(key_valid.bool(), (0, FLEX_BLOCK))
    bidir = bidir_len.to(device=key_valid.device, dtype=torch.long)

    def mask_mod(bi: Tensor, h: Tensor, qi: Tensor, kj: Tensor) -> Tensor:
        q_pos = qi + q_start
        return (valid[bi, kj] & ((kj < bidir[bi]) | (kj <= q_pos))) | (kj == q_pos)

    return create_block_mask(mask_mod, b, None, q_len, key_len, device=key_valid.device)


_compiled_flex: Optional[Callable[..., Tensor]] = None


def _flex() -> Callable[..., Tensor]:
    """The process-wide compiled FlexAttention kernel (compiled lazily, once)."""
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


ATTENTION_IMPLS = ("auto", "flex", "sdpa")


def build_attention_mask(key_valid: Tensor, bidir_len: Tensor, q_start: int, q_len: int, impl: str = "auto",
                         dropout: bool = False) -> AttentionMask:
    """The prefix-LM mask for the chosen implementation: "sdpa" the dense reference, "flex" a BlockMask, "auto"
    a BlockMask on CUDA for multi-token queries without attention dropout and the dense mask otherwise (single-token
    decode steps gain nothing from block sparsity)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl {impl!r} must be one of {ATTENTION_IMPLS}")
    use_flex = impl == "flex" or (impl == "auto" and flex_available(key_valid.device) and q_len > 1 and not dropout)
    if use_flex:
        return prefix_lm_block_mask(key_valid, bidir_len, q_start, q_len)
    return prefix_lm_mask(key_valid, bidir_len, q_start, q_len)


def is_block_mask(mask: Any) -> bool:
    """Whether `mask` is a FlexAttention BlockMask (rather than the dense boolean reference mask)."""
    return BlockMask is not None and isinstance(mask, BlockMask)


class KVCache:
    """Per-logical-layer key/value buffers [B, H, max_len, Dh], preallocated and filled left to right.

    It speaks the part of transformers' `Cache` interface that `M6Model` uses (`update(key, value, layer_idx)`,
    `get_seq_length()`), so the model runs the same code with this cache or a transformers `DynamicCache`.
    Shared physical blocks still get one cache entry per logical layer: each layer sees different inputs.
    """

    def __init__(self, num_layers: int, batch: int, n_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (batch, n_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = [0] * num_layers
        self.max_len = max_len

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int,
               cache_kwargs: Optional[dict[str, Any]] = None) -> tuple[Tensor, Tensor]:
        """Append this step's keys/values [B, H, S, Dh] for `layer_idx`; return all of that layer's so far."""
        start = self.lengths[layer_idx]
        end = start + key_states.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache: sequence length {end} exceeds the cache's max_len={self.max_len}")
        self.keys[layer_idx][:, :, start:end] = key_states
        self.values[layer_idx][:, :, start:end] = value_states
        self.lengths[layer_idx] = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions held for `layer_idx` (all layers hold the same number between forwards)."""
        return self.lengths[layer_idx]


class Attention(nn.Module):
    """Multi-head self-attention: FlexAttention when given a BlockMask, else `F.scaled_dot_product_attention`
    with the dense boolean mask. Initialised on construction by its `nn.Linear` projections.

    `qk_norm` RMS-normalises each head's queries and keys (one learned gain per head dimension, shared by the
    heads) before the scores, so how sharply a head attends is set by those gains rather than by the growth of
    the whole projection; keys enter the cache normalised."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, qk_norm: bool = False,
                 norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=norm_eps) if qk_norm else None

    def reset_parameters(self) -> None:
        """Re-draw the projections with `nn.Linear`'s own initialisation (what construction gave them) and the
        query/key norms to one; for a module built on the meta device and then `to_empty`."""
        self.qkv.reset_parameters()
        self.proj.reset_parameters()
        if self.q_norm is not None and self.k_norm is not None:
            self.q_norm.reset_parameters()
            self.k_norm.reset_parameters()

    def forward(self, x: Tensor, mask: AttentionMask, cache: Optional[KVCache] = None, layer: int = 0) -> Tensor:
        """`cache`: a `KVCache` or a transformers `Cache` (anything with `update(key, value, layer_idx)`); its
        entry `layer` (the logical layer) receives this call's keys and values."""
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # over head_dim, [B, H, S, head_dim]
        if cache is not None:
            k, v = cache.update(k, v, layer)
        if is_block_mask(mask):
            if self.training and self.dropout > 0:
                raise ValueError("FlexAttention has no attention dropout; build the dense mask when dropout > 0")
            # inside a compiled block torch.compile fuses flex_attention itself; eager FlexAttention off CUDA is
            # the unfused reference (forward only), used by the CPU tests
            fused = q.is_cuda and not torch.compiler.is_compiling()
            out = (_flex() if fused else flex_attention)(q, k, v, block_mask=mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                 dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, s, d))
