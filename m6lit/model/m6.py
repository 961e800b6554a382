"""M6Model: one transformer over image patches and text, with shared physical blocks and MoE FFNs.

`blocks` holds the K physical blocks, `layer_to_block` says which one each of the L logical layers runs. The forward
takes the batch dict of the data contract (input_ids, attention_mask, labels, prefix_len, pixel_values, image_mask)
and returns logits over the text positions plus the MoE aux terms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import build_attention_mask
from .block import TransformerBlock, checkpointed_call
from .config import M6Config
from .embeddings import M6Embeddings
from .moe import MoEAux, MoELayer

IGNORE_INDEX = -100


@dataclass
class M6Output:
    """Model outputs. `logits` cover the text positions only ([B, T, V]). `aux_loss` is the weighted sum
    balance_loss_coef * balance_loss + z_loss_coef * z_loss (each averaged over MoE layers); zero without MoE."""

    logits: Tensor
    aux_loss: Tensor
    balance_loss: Tensor
    z_loss: Tensor
    moe_stats: dict[int, MoEAux] = field(default_factory=dict)
    hidden: Optional[Tensor] = None
    image_len: int = 0


def lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Token-mean cross-entropy in fp32; labels are aligned with the inputs (shifted here), -100 ignored.
    Returns 0 (not NaN) when a batch has no target token."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    count = (targets != IGNORE_INDEX).sum()
    return total / count.clamp(min=1)


def chunked_lm_loss(hidden: Tensor, weight: Tensor, labels: Tensor, chunk_tokens: int = 4096) -> Tensor:
    """`lm_loss(hidden @ weight.T, labels)` without the full logits: the head and the fp32 cross-entropy run on
    `chunk_tokens` positions at a time, and each chunk's logits are recomputed in the backward instead of being
    kept, so at most one chunk of `[chunk_tokens, V]` logits is alive. `hidden` [B, T, D] are the final (normed)
    text hidden states, `weight` [V, D] the LM head."""
    if chunk_tokens < 1:
        raise ValueError(f"chunked_lm_loss: chunk_tokens={chunk_tokens} must be >= 1")
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # [N, D], N = B·(T-1)
    targets = labels[:, 1:].reshape(-1)  # [N]
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_tokens):
        total = total + checkpoint(_chunk_nll, h[start:start + chunk_tokens], weight,
                                   targets[start:start + chunk_tokens], use_reentrant=False)
    count = (targets != IGNORE_INDEX).sum()
    return total / count.clamp(min=1)


def _chunk_nll(h: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    logits = F.linear(h, weight).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def token_stats(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(summed NLL, number of target tokens, number predicted correctly) with the same shift as `lm_loss`."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="sum")
    correct = ((logits.argmax(-1) == targets) & mask).sum()
    return nll, mask.sum(), correct


def text_positions(attention_mask: Tensor) -> Tensor:
    """Text position of every column [B, T]: the count of valid tokens before it, so left-padded prompts and
    tokens appended after padding get the positions of the unpadded text; padding columns keep their column index
    (for a right-padded batch this is `arange(T)` in every row)."""
    columns = torch.arange(attention_mask.shape[1], device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask, attention_mask.long().cumsum(1) - 1, columns)


def left_pad(input_ids: Tensor, attention_mask: Tensor, pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Prompts [B, T] padded anywhere (m6lit's batches pad on the right) as left-padded `input_ids` and a bool
    `attention_mask` [B, W], W the longest prompt: each row's valid tokens in order, right-aligned — the one padding
    of generation (transformers' `generate` continues the last column)."""
    mask = attention_mask.bool()
    lengths = mask.sum(1)
    empty = (lengths == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"generate: prompt rows {empty} are empty (attention_mask has no valid token)")
    width = int(lengths.max())
    # a stable sort of the validity moves each row's tokens, in order, behind its padding
    order = mask.to(torch.uint8).sort(dim=1, stable=True).indices[:, -width:]
    ids = input_ids.gather(1, order)
    left = torch.arange(width, device=mask.device).unsqueeze(0) >= (width - lengths).unsqueeze(1)
    return ids.masked_fill(~left, pad_token_id), left


class M6Model(nn.Module):
    """Multimodal prefix-LM transformer with cross-layer sharing and MoE FFNs (pure PyTorch)."""

    def __init__(self, config: M6Config, image_backbone: Optional[nn.Module] = None) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.embed = M6Embeddings(config.vocab_size, config.d_model, config.max_seq_len, config.image_size,
                                  config.patch_size, config.in_channels, image_backbone, config.image_grid_size,
                                  config.vocab_size - config.image_codebook_size, config.patch_centered)
        kinds = config.block_is_moe()
        self.blocks = nn.ModuleList(self.build_block(moe, block) for block, moe in enumerate(kinds))
        self.layer_to_block: list[int] = config.layer_to_block()
        #: attention implementation: "auto" (FlexAttention on CUDA), "flex" or "sdpa" (dense-mask reference)
        self.attention_impl = "auto"
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.init_weights()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.tokens.weight

    # ------------------------------------------------------------------ construction
    def build_block(self, moe: bool, block: int = 0) -> TransformerBlock:
        """A fresh physical block of the configured shape (physical block `block`'s expert shape), not yet given
        the model's initialisation (`init_weights`). Under `torch.device("meta")` every tensor is on the meta device
        (a skeleton, as `delink` uses)."""
        c = self.config
        layer = None
        if moe:
            shape = c.expert_shape(block)
            # built on the meta device so that construction draws no random numbers (init_weights draws them, in
            # the seeded order), then given uninitialised storage where the model's other weights are created
            layer = MoELayer(c.d_model, shape.expert_d_ff, shape.num_experts, shape.top_k, router=c.router,
                             capacity_factor=c.capacity_factor, norm_topk=c.router_norm_topk,
                             segments=shape.segments, init_std=c.init_std, out_init_std=self._out_init_std(),
                             device="meta")
            layer.to_empty(device=self._weight_device())
        return TransformerBlock(c.d_model, c.n_heads, c.d_ff, c.norm_eps, c.dropout, moe=layer, qk_norm=c.qk_norm)

    def _out_init_std(self) -> float:
        """Standard deviation of the residual output projections: init_std / sqrt(2 L) (GPT-2)."""
        return self.config.init_std / math.sqrt(2 * self.config.num_layers)

    def _weight_device(self) -> torch.device:
        """Where new weights of this model are created: the meta device inside `torch.device("meta")`, else
        where the token embedding was placed (this also follows accelerate's `init_empty_weights`)."""
        ambient = torch.empty(0).device
        return ambient if ambient.type == "meta" else self.embed.tokens.weight.device

    def init_weights(self) -> None:
        """Normal(0, init_std) everywhere, residual output projections scaled by 1/sqrt(2 L) (GPT-2), patch
        positions at the scale of the patch projection's output, norms to one. MoE layers draw theirs in
        `reset_parameters` (built with these standard deviations); the draws run in module order, so a seed fixes
        every weight, and a model built on the meta device is complete after `to_empty` + `init_weights`."""
        std = self.config.init_std
        out_std = self._out_init_std()
        for name, module in self.named_modules():
            if isinstance(module, (MoELayer, nn.RMSNorm)):
                module.reset_parameters()
            elif isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d)):
                is_out = name.endswith("attn.proj") or name.endswith("ffn.w_down")
                nn.init.normal_(module.weight, std=out_std if is_out else std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        # patch positions start at the scale of the patch projection's output for unit-variance pixels
        # (std * sqrt(fan-in)): at the 0.02 scale of text embeddings they are drowned by the patch content after
        # RMSNorm, and the network learns *what* is in the image long before it learns *where*
        patch_fan_in = self.config.in_channels * self.config.patch_size ** 2
        nn.init.normal_(self.embed.patches.pos, std=std * math.sqrt(patch_fan_in))

    # ------------------------------------------------------------------ compilation
    def compile_blocks(self, **options: Any) -> None:
        """`torch.compile` every physical block in place (`nn.Module.compile`, state-dict names unchanged) with
        `options` (backend, mode, ...). Blocks that appear later (delink, expert split, a checkpoint's shape) are
        compiled on their first forward, and a block whose submodules change is recompiled by torch.compile's
        guards, so structural changes never run a stale graph."""
        self._compile_options = dict(options)
        self._compiled_blocks = {}
        self._compile_new_blocks()

    def _compile_new_blocks(self) -> None:
        options = getattr(self, "_compile_options", None)
        if options is None:
            return
        compiled: dict[int, nn.Module] = self._compiled_blocks
        if len(compiled) == len(self.blocks) and all(compiled.get(id(b)) is b for b in self.blocks):
            return
        # new blocks (a delink's fresh blocks have no compiled call) run eager until compiled here
        for block in self.blocks:
            if compiled.get(id(block)) is not block:
                block.compile(**options)
        self._compiled_blocks = {id(b): b for b in self.blocks}

    # ------------------------------------------------------------------ forward
    def forward(self, batch: Mapping[str, Tensor], return_hidden: bool = False, compute_logits: bool = True,
                cache: Optional[Any] = None) -> M6Output:
        """Run the batch contract: [image patches][prefix text][target text] → logits over text positions.
        `compute_logits=False` skips the LM head (logits empty; for `chunked_lm_loss` on the returned hidden).

        Text positions count each row's valid tokens and `prefix_len` counts from its first valid one, so prompts
        may be padded on the left (generation) as well as on the right (training). Optional `code_index` [B, T]:
        the grid index of each image code (default: the running count of codes in the row).

        `cache`: a KV cache with transformers' `Cache` interface (`update(key, value, layer_idx)`,
        `get_seq_length()`; a `DynamicCache` or m6lit's `KVCache`), one entry per logical layer. An empty cache is
        filled with this call (the image patches first); with a non-empty one the call continues it:
        `input_ids` [B, n] are the new tokens, `attention_mask` [B, T_past + n] (required) covers all of the text
        so far, pixel values are not embedded again (`image_mask` still says which rows have an image) and the
        logits cover the new tokens.
        """
        if "input_ids" not in batch:
            raise KeyError(f"batch has no 'input_ids' (keys: {sorted(batch)})")
        input_ids = batch["input_ids"]
        b, n = input_ids.shape
        past = 0 if cache is None else int(cache.get_seq_length())
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            if past:
                raise ValueError("M6Model: with a non-empty cache, batch['attention_mask'] must cover the text so far "
                                 "and the new tokens (the cache holds the image too, so its length alone cannot say)")
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        prefix_len = batch.get("prefix_len")
        if prefix_len is None:
            prefix_len = torch.zeros(b, dtype=torch.long, device=input_ids.device)
        text_past = attention_mask.shape[1] - n
        positions = text_positions(attention_mask)[:, text_past:]
        code_index = batch.get("code_index")
        if past == 0:
            if text_past:
                raise ValueError(f"M6Model: attention_mask covers {attention_mask.shape[1]} columns but input_ids has "
                                 f"{n} and the cache is empty")
            x, key_valid, p = self._embed(input_ids, positions, attention_mask, batch.get("pixel_values"),
                                          batch.get("image_mask"), code_index)
            logits_from = p
        else:
            p = past - text_past  # the cache holds the image patches, then the earlier text columns
            if p not in (0, self.embed.patches.num_patches):
                raise ValueError(f"M6Model: the cache holds {past} positions, which does not match {text_past} "
                                 f"earlier text columns of attention_mask plus an image; pass the attention mask of "
                                 f"the whole text so far")
            x = self.embed.text(input_ids, positions, code_index)
            key_valid = torch.cat([self._image_valid(b, p, batch.get("image_mask"), input_ids.device),
                                   attention_mask], dim=1)
            logits_from = 0
        # 0 for right padding (and for an image without text); the left padding's width
        first_valid = (attention_mask.long().argmax(1) if attention_mask.shape[1]
                       else torch.zeros(b, dtype=torch.long, device=input_ids.device))
        hidden, stats = self._transformer(x, key_valid, p + first_valid + prefix_len, past, cache)
        return self._output(hidden, stats, logits_from, return_hidden or not compute_logits, compute_logits)

    @staticmethod
    def _image_valid(b: int, p: int, image_mask: Optional[Tensor], device: torch.device) -> Tensor:
        if image_mask is None:
            return torch.ones(b, p, dtype=torch.bool, device=device)
        return image_mask.bool().view(-1, 1).expand(-1, p)

    def _embed(self, input_ids: Tensor, positions: Tensor, attention_mask: Tensor, pixel_values: Optional[Tensor],
               image_mask: Optional[Tensor], code_index: Optional[Tensor] = None) -> tuple[Tensor, Tensor, int]:
        text = self.embed.text(input_ids, positions, code_index)
        if pixel_values is None:
            return text, attention_mask, 0
        image = self.embed.image(pixel_values).to(text.dtype)
        p = image.shape[1]
        image_valid = self._image_valid(image.shape[0], p, image_mask, image.device)
        return torch.cat([image, text], dim=1), torch.cat([image_valid, attention_mask], dim=1), p

    def _check_length(self, total: int) -> None:
        if total > self.config.max_seq_len:
            raise ValueError(f"sequence of {total} positions (image patches + text) exceeds "
                             f"config.max_seq_len={self.config.max_seq_len}")

    def _transformer(self, x: Tensor, key_valid: Tensor, bidir_len: Tensor, q_start: int,
                     cache: Optional[Any]) -> tuple[Tensor, dict[int, MoEAux]]:
        self._check_length(q_start + x.shape[1] if cache is not None else x.shape[1])
        self._compile_new_blocks()
        mask = build_attention_mask(key_valid, bidir_len, q_start, x.shape[1], self.attention_impl,
                                    dropout=self.training and self.config.dropout > 0)
        token_mask = key_valid[:, q_start:q_start + x.shape[1]]
        stats: dict[int, MoEAux] = {}
        recompute = cache is None and torch.is_grad_enabled() and self.config.activation_checkpointing is not None
        for layer, block_idx in enumerate(self.layer_to_block):
            if recompute and self.config.is_checkpointed_layer(layer):
                x, aux = checkpointed_call(self.blocks[block_idx], x, mask, token_mask, None, layer)
            else:
                x, aux = self.blocks[block_idx](x, mask, token_mask, cache, layer)
            if aux is not None:
                stats[layer] = aux
        return self.norm(x), stats

    def _output(self, hidden: Tensor, stats: dict[int, MoEAux], image_len: int, return_hidden: bool,
                compute_logits: bool = True) -> M6Output:
        logits = self.lm_head(hidden[:, image_len:]) if compute_logits else hidden.new_empty(0)
        if stats:
            balance = torch.stack([s.balance_loss for s in stats.values()]).mean()
            z = torch.stack([s.z_loss for s in stats.values()]).mean()
        else:
            balance = z = hidden.new_zeros((), dtype=torch.float32)
        aux = self.config.balance_loss_coef * balance + self.config.z_loss_coef * z
        return M6Output(logits=logits, aux_loss=aux, balance_loss=balance, z_loss=z, moe_stats=stats,
                        hidden=hidden if return_hidden else None, image_len=image_len)

    # ------------------------------------------------------------------ downstream uses
    # ------------------------------------------------------------------ accounting
    def num_parameters(self, unique: bool = True) -> int:
        """Stored parameters (`unique=True`, shared blocks counted once) or the compute-equivalent count of the
        unshared network (`unique=False`, each logical layer counting its block)."""
        total = sum(p.numel() for p in self.parameters())
        if unique:
            return total
        per_block = [sum(p.numel() for p in blk.parameters()) for blk in self.blocks]
        return total - sum(per_block) + sum(per_block[b] for b in self.layer_to_block)
