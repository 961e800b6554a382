"""Prefix-LM attention: the mask itself, the KV cache, and the mask's promises observed through M6Model."""

from __future__ import annotations

import pytest
import torch

from m6lit.model import Attention, KVCache, M6Config, M6Model, prefix_lm_mask
from m6lit.model.attention import build_attention_mask, flex_attention, is_block_mask, prefix_lm_block_mask
from m6lit.model.hf import generate_text

needs_flex = pytest.mark.skipif(flex_attention is None, reason="this torch has no FlexAttention")

VOCAB = 64
ATOL = 1e-6  # "unchanged" = equal to float noise; real changes are orders of magnitude larger


def _model(**overrides) -> M6Model:
    base = dict(vocab_size=VOCAB, d_model=32, n_heads=4, d_ff=64, num_layers=4, moe_layers=2, num_experts=4,
                top_k=2, image_size=16, patch_size=8, max_seq_len=48)
    base.update(overrides)
    torch.manual_seed(0)
    model = M6Model(M6Config(**base)).eval()
    with torch.no_grad():  # make the image path matter: default init leaves it tiny
        model.embed.patches.pos.normal_(std=0.5)
    return model


def _batch(b: int = 2, t: int = 10, prefix: int = 4, images: bool = True, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = {"input_ids": torch.randint(2, VOCAB, (b, t), generator=g),
             "attention_mask": torch.ones(b, t, dtype=torch.bool),
             "prefix_len": torch.full((b,), prefix, dtype=torch.long)}
    if images:
        batch["pixel_values"] = torch.randn(b, 3, 16, 16, generator=g)
    return batch


def _logits(model: M6Model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(batch).logits


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


# ------------------------------------------------------------------------------------------------- the mask
def test_prefix_lm_mask_matches_its_definition() -> None:
    key_valid = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    bidir = torch.tensor([3, 1])
    mask = prefix_lm_mask(key_valid, bidir)
    assert mask.shape == (2, 1, 7, 7) and mask.dtype == torch.bool
    for b in range(2):
        for i in range(7):
            for j in range(7):
                want = (bool(key_valid[b, j]) and (j < int(bidir[b]) or j <= i)) or i == j
                assert bool(mask[b, 0, i, j]) == want, (b, i, j)
    rows = prefix_lm_mask(key_valid, bidir, q_start=5, q_len=2)
    assert torch.equal(rows, mask[:, :, 5:7])


def test_kv_cache_refuses_to_overflow() -> None:
    cache = KVCache(num_layers=2, batch=1, n_heads=2, max_len=3, head_dim=4, dtype=torch.float32,
                    device=torch.device("cpu"))
    k = torch.randn(1, 2, 2, 4)
    keys, values = cache.update(k, k + 1, 0)
    assert torch.equal(keys, k) and torch.equal(values, k + 1)
    assert (cache.get_seq_length(), cache.get_seq_length(1)) == (2, 0)
    with pytest.raises(ValueError, match="max_len=3"):
        cache.update(k, k, 0)


# ------------------------------------------------------------------------------------------ through M6Model
@pytest.mark.parametrize("images", [True, False])
def test_changing_a_target_token_never_changes_earlier_logits(images) -> None:
    model = _model()
    batch = _batch(images=images)
    base = _logits(model, batch)
    for pos in range(4, 10):  # every target position (prefix_len = 4)
        changed = dict(batch, input_ids=batch["input_ids"].clone())
        changed["input_ids"][:, pos] = (changed["input_ids"][:, pos] + 7) % (VOCAB - 2) + 2
        out = _logits(model, changed)
        assert _max_diff(out[:, :pos], base[:, :pos]) < ATOL, pos
        assert _max_diff(out[:, pos], base[:, pos]) > 1e-3, pos  # the token itself does change


def test_changing_a_late_prefix_token_changes_every_position() -> None:
    model = _model()
    batch = _batch()
    base = _logits(model, batch)
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][:, 3] = (changed["input_ids"][:, 3] + 7) % (VOCAB - 2) + 2  # last prefix token
    out = _logits(model, changed)
    per_position = (out - base).abs().amax(dim=(0, 2))
    assert bool((per_position > 1e-4).all()), per_position  # positions 0-2 see it: bidirectional prefix


def test_changing_pixels_changes_every_text_position() -> None:
    model = _model()
    batch = _batch()
    base = _logits(model, batch)
    out = _logits(model, dict(batch, pixel_values=batch["pixel_values"] + 1.0))
    assert bool(((out - base).abs().amax(dim=(0, 2)) > 1e-4).all())


@pytest.mark.parametrize("images", [True, False])
def test_padding_never_changes_non_pad_logits(images) -> None:
    model = _model()
    batch = _batch(images=images)
    batch["attention_mask"][1, 6:] = False
    base = _logits(model, batch)
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][1, 6:] = torch.tensor([0, 5, 9, 33])
    out = _logits(model, changed)
    assert _max_diff(out[1, :6], base[1, :6]) < ATOL
    assert _max_diff(out[0], base[0]) < ATOL
    # and the padded row equals the same row run alone without its padding
    alone = {k: v[1:2] for k, v in batch.items()}
    alone["input_ids"] = alone["input_ids"][:, :6]
    alone["attention_mask"] = alone["attention_mask"][:, :6]
    torch.testing.assert_close(_logits(model, alone)[0], base[1, :6], rtol=1e-5, atol=1e-5)


def test_image_mask_false_rows_ignore_their_pixels_and_equal_text_only() -> None:
    model = _model()
    batch = _batch(b=3)
    batch["image_mask"] = torch.tensor([True, False, True])
    base = _logits(model, batch)
    noisy = batch["pixel_values"].clone()
    noisy[1] = torch.randn(3, 16, 16) * 10
    noisy[2] += 1.0
    out = _logits(model, dict(batch, pixel_values=noisy))
    assert _max_diff(out[1], base[1]) < ATOL
    assert _max_diff(out[2], base[2]) > 1e-4  # a row with a real image does react
    assert _max_diff(out[0], base[0]) < ATOL  # rows do not leak into each other
    text_only = {k: v[1:2] for k, v in batch.items() if k not in ("pixel_values", "image_mask")}
    torch.testing.assert_close(_logits(model, text_only)[0], base[1], rtol=1e-5, atol=1e-5)


def test_text_only_batches_work() -> None:
    model = _model()
    batch = _batch(images=False)
    out = model(batch)
    assert out.logits.shape == (2, 10, VOCAB) and out.image_len == 0
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.aux_loss)
    assert sorted(out.moe_stats) == [1, 3]
    with_images = model(_batch(images=True))
    assert with_images.logits.shape == (2, 10, VOCAB) and with_images.image_len == 4


def test_prefix_len_changes_what_the_prefix_sees() -> None:
    """Sanity that the masks differ: with prefix_len 0 (fully causal text) position 0 ignores position 3."""
    model = _model()
    batch = _batch(prefix=0)
    base = _logits(model, batch)
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][:, 3] = (changed["input_ids"][:, 3] + 7) % (VOCAB - 2) + 2
    out = _logits(model, changed)
    assert _max_diff(out[:, :3], base[:, :3]) < ATOL


# ------------------------------------------------------------------------------------------- FlexAttention
# On the CPU FlexAttention runs eagerly and forward only (its backward needs CUDA): these tests check that the block
# mask encodes exactly the reference rule; tests/test_model_cuda.py compares the compiled kernel and its gradients.
def _key_patterns() -> tuple[torch.Tensor, torch.Tensor]:
    """Rows: right padding, left padding, padding on both sides, all valid, a single valid key; their bidir
    lengths cover fully causal (0), a partial prefix and a fully bidirectional row."""
    key_valid = torch.tensor([[True] * 9 + [False] * 3,
                              [False] * 4 + [True] * 8,
                              [False] * 2 + [True] * 7 + [False] * 3,
                              [True] * 12,
                              [True] + [False] * 11])
    bidir = torch.tensor([4, 6, 0, 12, 1])
    return key_valid, bidir


@needs_flex
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("q_start", [0, 7, 11])
def test_flex_attention_equals_the_dense_mask_reference(q_start: int, qk_norm: bool) -> None:
    torch.manual_seed(0)
    attn = Attention(32, 4, qk_norm=qk_norm).eval()
    key_valid, bidir = _key_patterns()
    q_len = key_valid.shape[1] - q_start
    x = torch.randn(5, q_len, 32)
    cache_args = {}
    if q_start:  # decode-style rows: earlier keys come from a filled cache
        cache = KVCache(1, 5, 4, key_valid.shape[1], 8, torch.float32, torch.device("cpu"))
        with torch.no_grad():
            _, k, v = attn.qkv(torch.randn(5, q_start, 32)).view(5, q_start, 3, 4, 8).permute(2, 0, 3, 1, 4)
        cache.update(k, v, 0)
        cache_args = {"cache": cache}
    dense = prefix_lm_mask(key_valid, bidir, q_start, q_len)
    block = prefix_lm_block_mask(key_valid, bidir, q_start, q_len)
    assert is_block_mask(block) and not is_block_mask(dense)
    with torch.no_grad():
        ref = attn(x, dense, **cache_args)
        if q_start:
            cache_args["cache"].lengths[0] = q_start  # the first call wrote this step's keys; rewrite them
        out = attn(x, block, **cache_args)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_flex
@pytest.mark.parametrize("images", [True, False])
def test_model_on_flex_equals_the_reference_with_padding_text_only_rows_and_image_only_prefixes(images) -> None:
    model = _model()
    batch = _batch(b=4, t=10, images=images)
    batch["attention_mask"][1, 6:] = False
    batch["attention_mask"][3, 3:] = False
    batch["prefix_len"] = torch.tensor([4, 0, 10, 3])  # partial, causal text (image-only prefix), all bidirectional
    if images:
        batch["image_mask"] = torch.tensor([True, True, False, True])  # row 2 is a text-only row
    ref = _logits(model, batch)
    model.attention_impl = "flex"
    out = _logits(model, batch)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_flex
@pytest.mark.parametrize("images", [True, False])
def test_generation_on_flex_equals_the_reference_with_and_without_cache(images) -> None:
    model = _model()
    prompts = _batch(b=3, t=6, images=images)
    prompts["attention_mask"][1, 4:] = False
    prompts["attention_mask"][2, 2:] = False
    prompts = {k: v for k, v in prompts.items() if k != "prefix_len"}
    ref = generate_text(model, prompts, use_cache=True, max_new_tokens=5)
    model.attention_impl = "flex"
    assert torch.equal(generate_text(model, prompts, use_cache=True, max_new_tokens=5), ref)
    assert torch.equal(generate_text(model, prompts, use_cache=False, max_new_tokens=5), ref)


def test_attention_impl_choice_and_bad_names() -> None:
    key_valid, bidir = _key_patterns()
    # on the CPU "auto" is the dense reference; so is any single-token decode step and attention dropout
    assert not is_block_mask(build_attention_mask(key_valid, bidir, 0, 12, "auto"))
    assert not is_block_mask(build_attention_mask(key_valid, bidir, 0, 12, "sdpa"))
    if flex_attention is not None:
        assert is_block_mask(build_attention_mask(key_valid, bidir, 0, 12, "flex"))
    with pytest.raises(ValueError, match="attention impl 'fast' must be one of"):
        build_attention_mask(key_valid, bidir, 0, 12, "fast")
    model = _model()
    model.attention_impl = "fast"
    with pytest.raises(ValueError, match="attention impl 'fast'"):
        model(_batch())


@needs_flex
def test_flex_refuses_attention_dropout_in_training() -> None:
    attn = Attention(32, 4, dropout=0.1).train()
    key_valid, bidir = _key_patterns()
    with pytest.raises(ValueError, match="FlexAttention has no attention dropout"):
        attn(torch.randn(5, 12, 32), prefix_lm_block_mask(key_valid, bidir))


@torch.no_grad()
def test_qk_norm_scores_are_the_normalised_queries_and_keys_and_ignore_their_projections_scale() -> None:
    torch.manual_seed(0)
    attn = Attention(32, 4, qk_norm=True).eval()
    attn.q_norm.weight.uniform_(0.5, 2.0)
    attn.k_norm.weight.uniform_(0.5, 2.0)
    x = torch.randn(2, 6, 32)
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
    q, k, v = attn.qkv(x).view(2, 6, 3, 4, 8).permute(2, 0, 3, 1, 4)  # [B, H, S, head_dim] each

    def rms(t: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * gain

    scores = rms(q, attn.q_norm.weight) @ rms(k, attn.k_norm.weight).transpose(-1, -2) / 8 ** 0.5
    want = attn.proj((scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v).transpose(1, 2).reshape(2, 6, 32))
    out = attn(x, mask)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    attn.qkv.weight[:64] *= 10.0  # queries and keys 10x larger: the same attention
    torch.testing.assert_close(attn(x, mask), out, rtol=1e-5, atol=1e-6)
    plain = Attention(32, 4).eval()
    plain.load_state_dict({k: v for k, v in attn.state_dict().items() if "norm" not in k})
    assert not torch.allclose(plain(x, mask), out, atol=1e-3)


def test_qk_norm_gains_are_block_parameters_drawn_to_one_and_the_flag_is_checked() -> None:
    model = M6Model(M6Config(vocab_size=64, d_model=32, n_heads=4, d_ff=64, num_layers=2, image_size=16,
                             patch_size=8, max_seq_len=48, qk_norm=True))
    gains = {n: p for n, p in model.named_parameters() if "q_norm" in n or "k_norm" in n}
    assert sorted(gains) == [f"blocks.{i}.attn.{w}_norm.weight" for i in range(2) for w in "kq"]
    assert all(p.shape == (8,) and bool((p == 1).all()) for p in gains.values())
    with pytest.raises(ValueError, match=r"M6Config.qk_norm=1: must be true or false"):
        M6Config(qk_norm=1).validate()
