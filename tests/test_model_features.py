"""multimodal_features: definition, invariance to padding and batch composition, modalities, pooling, bad input."""

from __future__ import annotations

import pytest
import torch

from m6lit.model import M6Config, M6Model
from m6lit.model.features import multimodal_features


def _model() -> M6Model:
    torch.manual_seed(0)
    config = M6Config(vocab_size=64, d_model=32, n_heads=4, d_ff=64, num_layers=2, moe_layers=1, num_experts=4,
                      top_k=2, image_size=16, patch_size=8, max_seq_len=48)
    model = M6Model(config).eval()
    with torch.no_grad():
        model.embed.patches.pos.normal_(std=0.5)
    return model


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 64, (3, 6), generator=g)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, 5:] = False
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(3, 3, 16, 16, generator=g)}


@torch.no_grad()
def test_joint_mean_is_the_bidirectional_final_hidden_mean() -> None:
    model, batch = _model(), _batch()
    feats = multimodal_features(model, **batch)
    mask = batch["attention_mask"]
    hidden = model(dict(batch, prefix_len=mask.sum(1)), return_hidden=True).hidden
    valid = torch.cat([torch.ones(3, 4, dtype=torch.bool), mask], 1).unsqueeze(-1).float()
    torch.testing.assert_close(feats, (hidden * valid).sum(1) / valid.sum(1), rtol=0, atol=1e-6)
    assert feats.shape == (3, 32) and feats.dtype == torch.float32
    causal = model(dict(batch, prefix_len=torch.zeros(3, dtype=torch.long)), return_hidden=True).hidden
    assert float(((causal - hidden) * valid).abs().max()) > 1e-4  # so the check above can tell them apart


@torch.no_grad()
def test_a_row_without_its_image_equals_its_text_alone() -> None:
    model, batch = _model(), _batch()
    feats = multimodal_features(model, **batch, image_mask=torch.tensor([True, False, True]))
    n = int(batch["attention_mask"][1].sum())
    text = multimodal_features(model, batch["input_ids"][1:2, :n], modality="joint")
    torch.testing.assert_close(feats[1], text[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(feats[0], multimodal_features(model, **batch)[0], rtol=0, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("modality", ["joint", "image", "text"])
@pytest.mark.parametrize("pooling", ["mean", 0, -1, 2])
def test_features_do_not_depend_on_padding_or_batch_mates(modality: str, pooling) -> None:
    model, batch = _model(), _batch()
    feats = multimodal_features(model, **batch, modality=modality, pooling=pooling)
    for row in range(3):
        n = int(batch["attention_mask"][row].sum())
        alone = multimodal_features(model, batch["input_ids"][row:row + 1, :n], None,
                                    batch["pixel_values"][row:row + 1], modality=modality, pooling=pooling)
        torch.testing.assert_close(alone[0], feats[row], rtol=1e-5, atol=1e-6)
    poisoned = dict(batch, input_ids=batch["input_ids"].masked_fill(~batch["attention_mask"], 63))
    torch.testing.assert_close(multimodal_features(model, **poisoned, modality=modality, pooling=pooling), feats,
                               rtol=0, atol=1e-6)


@torch.no_grad()
def test_each_modality_reads_only_its_input() -> None:
    model, batch = _model(), _batch()
    other_text = dict(batch, input_ids=(batch["input_ids"] + 1) % 60 + 2)
    other_image = dict(batch, pixel_values=-batch["pixel_values"])
    image = multimodal_features(model, **batch, modality="image")
    text = multimodal_features(model, **batch, modality="text")
    torch.testing.assert_close(multimodal_features(model, **other_text, modality="image"), image, rtol=0, atol=0)
    torch.testing.assert_close(multimodal_features(model, **other_image, modality="text"), text, rtol=0, atol=0)
    assert not torch.allclose(multimodal_features(model, **other_image, modality="image"), image)
    assert not torch.allclose(multimodal_features(model, **other_text, modality="text"), text)
    joint = multimodal_features(model, **batch)
    assert not torch.allclose(multimodal_features(model, **other_text), joint)
    assert not torch.allclose(multimodal_features(model, **other_image), joint)


@torch.no_grad()
def test_token_pooling_picks_the_chosen_valid_position() -> None:
    model, batch = _model(), _batch()
    mask = batch["attention_mask"]
    text_only = {"input_ids": batch["input_ids"], "attention_mask": mask, "prefix_len": mask.sum(1)}
    text_hidden = model(text_only, return_hidden=True).hidden  # text features never see the image
    last = multimodal_features(model, **batch, modality="text", pooling=-1)
    for row in range(3):
        n = int(mask[row].sum())
        torch.testing.assert_close(last[row], text_hidden[row, n - 1], rtol=0, atol=1e-6)
    hidden = model(dict(batch, prefix_len=mask.sum(1)), return_hidden=True).hidden
    first = multimodal_features(model, **batch, modality="joint", pooling=0)
    torch.testing.assert_close(first, hidden[:, 0], rtol=0, atol=1e-6)


def test_bad_options_and_missing_inputs_are_clear_errors() -> None:
    model, batch = _model(), _batch()
    with pytest.raises(ValueError, match="modality='audio'"):
        multimodal_features(model, **batch, modality="audio")
    with pytest.raises(ValueError, match="pooling='max'"):
        multimodal_features(model, **batch, pooling="max")
    with pytest.raises(ValueError, match="image features need pixel_values"):
        multimodal_features(model, batch["input_ids"], modality="image")
    with pytest.raises(ValueError, match="pooling=5 is outside"):
        multimodal_features(model, **batch, modality="text", pooling=5)
    with pytest.raises(ValueError, match="4 image patches \\+ 45 text positions exceed max_seq_len=48"):
        multimodal_features(model, torch.full((1, 45), 5), pixel_values=batch["pixel_values"][:1])
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] have no image"):
        multimodal_features(model, **batch, image_mask=torch.tensor([True, False, True]), modality="image")
