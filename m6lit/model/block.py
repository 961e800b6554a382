"""TransformerBlock: RMSNorm → attention → RMSNorm → dense SwiGLU FFN or MoELayer (pre-norm residual)."""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from .attention import Attention, KVCache
from .moe import MoEAux, MoELayer


class SwiGLU(nn.Module):
    """Dense FFN: w_down(silu(w_gate x) * w_up x)."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(d_model, d_ff, bias=False)
        self.w_up = nn.Linear(d_model, d_ff, bias=False)
        self.w_down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class TransformerBlock(nn.Module):
    """One physical block; shared blocks run once per logical layer that maps to them."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, norm_eps: float = 1e-6, dropout: float = 0.0,
                 moe: Optional[MoELayer] = None) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.attn = Attention(d_model, n_heads, dropout)
        self.ffn_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.ffn: nn.Module = moe if moe is not None else SwiGLU(d_model, d_ff)
        self.drop = nn.Dropout(dropout)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoELayer)

    def forward(self, x: Tensor, mask: Tensor, token_mask: Optional[Tensor] = None,
                cache: Optional[KVCache] = None, layer: int = 0) -> tuple[Tensor, Optional[MoEAux]]:
        x = x + self.drop(self.attn(self.attn_norm(x), mask, cache, layer))
        h = self.ffn_norm(x)
        aux = None
        if isinstance(self.ffn, MoELayer):
            h, aux = self.ffn(h, token_mask)
        else:
            h = self.ffn(h)
        return x + self.drop(h), aux
