"""Self-attention with the prefix-LM mask and a preallocated KV cache.

Sequence layout: [image patches][prefix text][target text]. Image patches and the first `prefix_len` text tokens
attend to each other bidirectionally; target tokens attend causally; padding keys are never attended to.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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


class KVCache:
    """Per-logical-layer key/value buffers [B, H, max_len, Dh], filled left to right during generation.

    Shared physical blocks still get one cache entry per logical layer: each layer sees different inputs.
    """

    def __init__(self, num_layers: int, batch: int, n_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (batch, n_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this step's keys/values for `layer` and return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache: sequence length {end} exceeds the cache's max_len={self.max_len}")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, steps: int) -> None:
        """Commit `steps` positions after every layer has written them."""
        self.length += steps


class Attention(nn.Module):
    """Multi-head self-attention through `F.scaled_dot_product_attention`."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor, mask: Tensor, cache: Optional[KVCache] = None, layer: int = 0) -> Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, s, d))
