"""Prefix-LM attention: the mask itself, the KV cache, and the mask's promises observed through M6Model."""

from __future__ import annotations

import pytest
import torch

from m6lit.model import KVCache, M6Config, M6Model, prefix_lm_mask

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
    keys, values = cache.update(0, k, k + 1)
    assert torch.equal(keys, k) and torch.equal(values, k + 1)
    cache.advance(2)
    with pytest.raises(ValueError, match="max_len=3"):
        cache.update(1, k, k)


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
