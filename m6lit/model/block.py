"""TransformerBlock: RMSNorm → attention → RMSNorm → dense SwiGLU FFN or MoELayer (pre-norm residual); activation
checkpointing of one block call.

`checkpointed_call` runs a block under `torch.utils.checkpoint` (non-reentrant): autograd keeps only the block's
inputs and re-runs the whole call, module hooks included, when backward reaches it. `checkpoint_phase()` tells a hook
which run it is in ("forward", "recompute", or None outside checkpointing), so a hook that streams weights re-fetches
them for the recompute and a hook that tallies statistics counts the forward only.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Any, Iterator, Optional

import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention, KVCache
from .moe import MoEAux, MoELayer


class SwiGLU(nn.Module):
    """Dense FFN: w_down(silu(w_gate x) * w_up x). Initialised on construction by its `nn.Linear` layers."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(d_model, d_ff, bias=False)
        self.w_up = nn.Linear(d_model, d_ff, bias=False)
        self.w_down = nn.Linear(d_ff, d_model, bias=False)

    def reset_parameters(self) -> None:
        """Re-draw the three projections with `nn.Linear`'s own initialisation (after `to_empty`)."""
        self.w_gate.reset_parameters()
        self.w_up.reset_parameters()
        self.w_down.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class TransformerBlock(nn.Module):
    """One physical block; shared blocks run once per logical layer that maps to them.

    Initialised on construction (norms to one, projections by `nn.Linear`, a given `moe` by itself);
    `reset_parameters` does it again in the same order, so a block built on the meta device works after
    `to_empty(device=...)` + `reset_parameters()`. (`M6Model.init_weights` applies the model's own scheme on top.)
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, norm_eps: float = 1e-6, dropout: float = 0.0,
                 moe: Optional[MoELayer] = None, qk_norm: bool = False) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.attn = Attention(d_model, n_heads, dropout, qk_norm=qk_norm, norm_eps=norm_eps)
        self.ffn_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.ffn: nn.Module = moe if moe is not None else SwiGLU(d_model, d_ff)
        self.drop = nn.Dropout(dropout)

    def reset_parameters(self) -> None:
        self.attn_norm.reset_parameters()
        self.attn.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.ffn.reset_parameters()

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


_PHASE: ContextVar[Optional[str]] = ContextVar("m6lit_checkpoint_phase", default=None)


def checkpoint_phase() -> Optional[str]:
    """"forward" inside the first run of a checkpointed block, "recompute" inside its re-run during backward, None
    otherwise."""
    return _PHASE.get()


@contextlib.contextmanager
def _phase(name: str) -> Iterator[None]:
    token = _PHASE.set(name)
    try:
        yield
    finally:
        _PHASE.reset(token)


def checkpointed_call(block: nn.Module, *args: Any) -> Any:
    """`block(*args)` with its activations recomputed in backward instead of saved (RNG state preserved, so dropout
    masks repeat; the recompute's outputs are discarded, so aux losses are counted once)."""
    return checkpoint(block, *args, use_reentrant=False,
                      context_fn=lambda: (_phase("forward"), _phase("recompute")))
