"""Text → image with the M6 model: autoregressive image codes, classifier-free guidance, self-reranking, region edits.

A prompt is the `generate` task's prefix (the prompt marker + caption, bidirectional); begin-of-image follows it and
the model then emits `grid_size ** 2` codes in raster order, each embedded with its 2-D grid position. At image
positions only code ids can be chosen (the logits are cut to the code range). With a guidance scale s, a second,
caption-free prompt runs beside the first and the code logits are l_c + (s - 1) (l_c - l_u), so s = 1 is exactly
conditional sampling. Candidates are reranked by the model's own log-likelihood of the caption given the decoded
image (CogView's self-reranking; no external weights). A region edit keeps the given codes outside the region and
samples the inside.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import KVCache
from .image_vocab import ImageVocab
from .m6 import IGNORE_INDEX, M6Model, left_pad

#: the generate and caption tasks' prompt texts (m6lit.data.tasks.PROMPTS uses the same)
GENERATE_PROMPT = "image:"
CAPTION_PROMPT = "caption:"
#: the sub-folder of an export that holds the image tokenizer (a transformers `JanusVQVAE`)
IMAGE_TOKENIZER_FOLDER = "image_tokenizer"

__all__ = ["CAPTION_PROMPT", "GENERATE_PROMPT", "IMAGE_TOKENIZER_FOLDER", "caption_log_likelihood", "edit_region", "generate_image_codes", "generate_images", "pad_prompts",
           "sample_codes"]


def pad_prompts(prompts: Sequence[Sequence[int]], pad_token_id: int = 0) -> tuple[Tensor, Tensor]:
    """Right-padded `input_ids` [B, T] and `attention_mask` [B, T] of token-id lists."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("pad_prompts: every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, :len(prompt)] = True
    return ids, mask


def sample_codes(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 generator: Optional[torch.Generator] = None) -> Tensor:
    """Choose one index per row of `logits` [B, K]: greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"sampling: temperature={temperature} must be >= 0, top_p={top_p} in (0, 1], "
                         f"top_k={top_k} >= 0")
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1.0:
        sorted_probs, idx = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _Decoder:
    """One batch of prompts + begin-of-image, continued one image code at a time through `M6Model.forward`: with
    a `KVCache`, each step feeds the new code; without one, each step re-runs the whole sequence."""

    def __init__(self, model: M6Model, ids: Tensor, mask: Optional[Tensor], vocab: ImageVocab, new: int,
                 use_cache: bool) -> None:
        c = model.config
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        if bool((mask.sum(1) == 0).any()):
            raise ValueError("image generation: every prompt needs at least one token (attention_mask row is empty)")
        ids, mask = left_pad(ids, mask, c.pad_token_id)
        b, width = ids.shape[0], ids.shape[1] + 1
        if width + new > c.max_seq_len:
            raise ValueError(f"image generation: a {width - 1}-token prompt + begin-of-image + {new} codes exceeds "
                             f"config.max_seq_len={c.max_seq_len}; shorten the prompt")
        # begin-of-image is the first target token, causal as in training: the prompt alone is bidirectional
        self.ids = torch.cat([ids, torch.full((b, 1), vocab.boi, dtype=torch.long, device=ids.device)], dim=1)
        self.mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.bool, device=ids.device)], dim=1)
        self.code_index = torch.zeros_like(self.ids)  # [B, width + codes so far]; prompt entries are unused
        self.model, self.b, self.prefix_len = model, b, mask.sum(1)
        self.cache = KVCache(c.num_layers, b, c.n_heads, width + new, c.head_dim, model.embed.tokens.weight.dtype,
                             ids.device) if use_cache else None
        out = model({"input_ids": self.ids, "attention_mask": self.mask, "prefix_len": self.prefix_len},
                    cache=self.cache)
        self.logits = out.logits[:, -1]  # [B, V] at begin-of-image: the first code

    def step(self, ids: Tensor, index: int) -> Tensor:
        """Feed code ids [B] at grid index `index`; return the logits [B, V] of the next position."""
        b, device = self.b, ids.device
        new_index = torch.full((b, 1), index, dtype=torch.long, device=device)
        self.ids = torch.cat([self.ids, ids.view(b, 1)], dim=1)
        self.mask = torch.cat([self.mask, torch.ones(b, 1, dtype=torch.bool, device=device)], dim=1)
        self.code_index = torch.cat([self.code_index, new_index], dim=1)
        fed = (ids.view(b, 1), new_index) if self.cache is not None else (self.ids, self.code_index)
        out = self.model({"input_ids": fed[0], "attention_mask": self.mask, "prefix_len": self.prefix_len,
                          "code_index": fed[1]}, cache=self.cache)
        return out.logits[:, -1]


@torch.no_grad()
def generate_image_codes(model: M6Model, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                         uncond_ids: Optional[Tensor] = None, uncond_mask: Optional[Tensor] = None,
                         guidance_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                         generator: Optional[torch.Generator] = None, use_cache: bool = True,
                         keep_codes: Optional[Tensor] = None, keep_mask: Optional[Tensor] = None) -> Tensor:
    """Image codes [B, grid_size ** 2] (tokenizer codes, raster order) for `generate` prompts (padded on either
    side; they run left-padded).

    `uncond_ids`/`uncond_mask`: the caption-free prompt(s) ([B, T'] or [1, T'], e.g. the prompt marker alone) for
    classifier-free guidance at `guidance_scale`; without them the scale must be 1 (plain conditional sampling).
    `keep_codes` [B, N] with `keep_mask` [B, N] or [N] (True = keep): those positions take the given code instead of
    a sample (region editing). Call `model.eval()` first.
    """
    vocab = ImageVocab.from_config(model.config)
    n_codes = vocab.num_codes
    b = input_ids.shape[0]
    if uncond_ids is None and guidance_scale != 1.0:
        raise ValueError(f"guidance_scale={guidance_scale} needs uncond_ids (the caption-free prompt)")
    if keep_mask is not None:
        if keep_codes is None:
            raise ValueError("keep_mask needs keep_codes")
        keep_mask = keep_mask.bool().expand(b, n_codes)
        keep_codes = keep_codes.expand(b, n_codes)
    cond = _Decoder(model, input_ids, attention_mask, vocab, n_codes, use_cache)
    uncond = None
    if uncond_ids is not None:
        if uncond_ids.shape[0] == 1 and b > 1:
            uncond_ids = uncond_ids.expand(b, -1)
            uncond_mask = None if uncond_mask is None else uncond_mask.expand(b, -1)
        uncond = _Decoder(model, uncond_ids, uncond_mask, vocab, n_codes, use_cache)
    lo, hi = vocab.code_offset, vocab.vocab_size
    logits_c, logits_u = cond.logits, None if uncond is None else uncond.logits
    codes: list[Tensor] = []
    for index in range(n_codes):
        # at an image position only codes are allowed: the logits are cut to the code range
        guided = logits_c[:, lo:hi].float()
        if logits_u is not None:
            guided = guided + (guidance_scale - 1.0) * (guided - logits_u[:, lo:hi].float())
        code = sample_codes(guided, temperature, top_k, top_p, generator)
        if keep_mask is not None and keep_codes is not None:
            code = torch.where(keep_mask[:, index], keep_codes[:, index], code)
        codes.append(code)
        if index == n_codes - 1:
            break
        ids = code + lo
        logits_c = cond.step(ids, index)
        if uncond is not None:
            logits_u = uncond.step(ids, index)
    return torch.stack(codes, dim=1)


@torch.no_grad()
def edit_region(model: M6Model, codes: Tensor, region: Tensor, input_ids: Tensor,
                attention_mask: Optional[Tensor] = None, **sampling: object) -> Tensor:
    """Regenerate the codes of `codes` [B, N] inside `region` ([g, g] or [B, g, g], True = regenerate) from the
    prompt; every code outside the region is kept. `sampling`: the other arguments of `generate_image_codes`."""
    vocab = ImageVocab.from_config(model.config)
    if region.shape[-2:] != (vocab.grid_size, vocab.grid_size):
        raise ValueError(f"edit_region: region has shape {tuple(region.shape)}; expected [..., {vocab.grid_size}, "
                         f"{vocab.grid_size}] (the code grid)")
    keep = ~region.bool().reshape(*region.shape[:-2], -1)
    return generate_image_codes(model, input_ids, attention_mask, keep_codes=codes, keep_mask=keep,
                                **sampling)  # type: ignore[arg-type]


@torch.no_grad()
def caption_log_likelihood(model: M6Model, pixel_values: Tensor, caption_prompt: Sequence[int],
                           captions: Sequence[Sequence[int]]) -> Tensor:
    """Summed log-probability [B] of each caption (token ids ending with EOS) after the caption prompt, given the
    image `pixel_values` [B, 3, S, S] (resized to the model's image size) — the model's own caption task."""
    size = model.config.image_size
    if pixel_values.shape[-1] != size:
        pixel_values = F.interpolate(pixel_values, size=(size, size), mode="bilinear", align_corners=False)
    rows = [list(caption_prompt) + list(c) for c in captions]
    ids, mask = pad_prompts(rows, model.config.pad_token_id)
    ids, mask = ids.to(pixel_values.device), mask.to(pixel_values.device)
    labels = ids.masked_fill(~mask, IGNORE_INDEX)
    labels[:, :len(caption_prompt)] = IGNORE_INDEX
    prefix_len = torch.full((ids.shape[0],), len(caption_prompt), dtype=torch.long, device=ids.device)
    out = model({"input_ids": ids, "attention_mask": mask, "prefix_len": prefix_len,
                 "pixel_values": pixel_values.to(next(model.parameters()).dtype)})
    logp = out.logits[:, :-1].float().log_softmax(-1)
    targets = labels[:, 1:]
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (targets != IGNORE_INDEX)).sum(1)


@torch.no_grad()
def generate_images(model: M6Model, decode: Callable[[Tensor], Tensor], prompts: Sequence[Sequence[int]],
                    uncond_prompt: Sequence[int], num_candidates: int = 1, rerank_prompt: Optional[Sequence[int]] = None,
                    rerank_captions: Optional[Sequence[Sequence[int]]] = None, **sampling: object) -> dict[str, Tensor]:
    """Images for token-id prompts: `num_candidates` samples each, the best kept by self-reranking.

    `decode` maps codes [B, N] to pixels [B, 3, S, S] (the image tokenizer). With `rerank_prompt` (the caption
    task's prompt ids) and `rerank_captions` (each prompt's caption ids + EOS), candidates are scored by
    `caption_log_likelihood`; otherwise the first candidate is kept. Returns `images` [B, 3, S, S] in [-1, 1],
    `codes` [B, N], `scores` [B, num_candidates] (zeros without reranking) and `all_codes` [B, num_candidates, N].
    """
    if num_candidates < 1:
        raise ValueError(f"num_candidates={num_candidates} must be >= 1")
    device = next(model.parameters()).device
    b = len(prompts)
    expanded = [p for p in prompts for _ in range(num_candidates)]
    ids, mask = pad_prompts(expanded, model.config.pad_token_id)
    u_ids, u_mask = pad_prompts([uncond_prompt], model.config.pad_token_id)
    codes = generate_image_codes(model, ids.to(device), mask.to(device), u_ids.to(device), u_mask.to(device),
                                 **sampling)  # type: ignore[arg-type]
    pixels = decode(codes).clamp(-1, 1)  # [B * n, 3, S, S]
    scores = torch.zeros(b * num_candidates, device=device)
    if rerank_prompt is not None and rerank_captions is not None and num_candidates > 1:
        captions = [c for c in rerank_captions for _ in range(num_candidates)]
        scores = caption_log_likelihood(model, pixels, rerank_prompt, captions)
    scores = scores.view(b, num_candidates)
    best = scores.argmax(1)
    rows = torch.arange(b, device=device) * num_candidates + best
    return {"images": pixels[rows], "codes": codes[rows], "scores": scores,
            "all_codes": codes.view(b, num_candidates, -1)}
