"""Model FLOPs of a training step: the numerator of MFU.

Counted as matmul FLOPs only (2 per multiply-add), forward + backward = 3 x forward, in the PaLM convention
(appendix B of arXiv 2204.02311): attention scores count the full `S x S` product even where the mask removes half,
so a causal model and a prefix-LM of the same shape get the same figure. Per position and logical layer:

- attention projections: 4·D² multiply-adds (qkv 3·D², output D²) and the scores QKᵀ plus the weighted sum AV:
  2·S·D, with S the number of keys (image patches + text width);
- FFN: dense 3·D·d_ff; MoE: the router D·E plus the *active* experts k·3·D·F_e (per block's expert shape);
- the LM head V·D on text positions only, the patch projection C·p²·D on image positions only; embedding lookups
  cost nothing. Image patches are positions like text tokens.

Shared blocks count once per logical layer that runs them (compute, not storage).
"""

from __future__ import annotations

from .config import M6Config


def layer_macs_per_position(config: M6Config, layer: int) -> int:
    """Weight multiply-adds one position costs in logical layer `layer` (attention projections + FFN)."""
    d = config.d_model
    macs = 4 * d * d
    if config.is_moe_layer(layer):
        shape = config.expert_shape(config.layer_to_block()[layer])
        macs += d * shape.num_experts + shape.top_k * 3 * d * shape.expert_d_ff
    else:
        macs += 3 * d * config.d_ff
    return macs


def active_params_per_position(config: M6Config) -> int:
    """Weight multiply-adds per position over all logical layers: the N of "6N" (active parameters for MoE, no
    embeddings, no head)."""
    return sum(layer_macs_per_position(config, layer) for layer in range(config.num_layers))


def training_flops(config: M6Config, text_positions: int, image_positions: int, seq_len: int) -> float:
    """FLOPs of one forward + backward over a batch with `text_positions` text tokens and `image_positions` image
    patches in rows of `seq_len` keys (patches + text width)."""
    positions = text_positions + image_positions
    per_position = active_params_per_position(config) + config.num_layers * 2 * seq_len * config.d_model
    head = text_positions * config.vocab_size * config.d_model
    # the patch conv, and with patch_centered the means' two 1x1 projections (uniform part and mean_proj)
    pixels = config.in_channels * config.patch_size ** 2 + (2 * config.in_channels if config.patch_centered else 0)
    patch = image_positions * pixels * config.d_model
    return 6.0 * (positions * per_position + head + patch)


def training_flops_per_token(config: M6Config, seq_len: int) -> float:
    """FLOPs per text token of a text-only batch with `seq_len` tokens per row."""
    return training_flops(config, 1, 0, seq_len)
