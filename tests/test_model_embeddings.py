"""Input embeddings: the linear patch embedding and the nonlinear patch stem (`patch_hidden`), their shapes, start
scales, config errors and the Hugging Face round trip of a stem model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from m6lit.model import M6Config, M6Model
from m6lit.model.embeddings import ImagePatchEmbed


def _config(**overrides) -> M6Config:
    base = dict(vocab_size=64, d_model=32, n_heads=4, d_ff=64, num_layers=2, image_size=16, patch_size=8,
                max_seq_len=48)
    base.update(overrides)
    return M6Config(**base)


def test_linear_embedding_is_one_conv_and_the_stem_is_conv_gelu_conv() -> None:
    linear = ImagePatchEmbed(16, 8, 3, 32)
    stem = ImagePatchEmbed(16, 8, 3, 32, hidden=24)
    assert isinstance(linear.proj, nn.Conv2d)
    assert [type(m) for m in stem.proj] == [nn.Conv2d, nn.GELU, nn.Conv2d]
    assert (stem.proj[0].out_channels, stem.proj[0].kernel_size, stem.proj[2].kernel_size) == (24, (8, 8), (1, 1))
    x = torch.randn(2, 3, 16, 16)
    assert linear(x).shape == stem(x).shape == (2, 4, 32)
    # the stem is not linear in the pixels (the point of it); the conv is
    zero = torch.zeros(1, 3, 16, 16)
    a, b = torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16)

    def additive_gap(embed: ImagePatchEmbed) -> float:
        with torch.no_grad():
            return float((embed(a + b) - embed(a) - embed(b) + embed(zero)).abs().max())

    assert additive_gap(linear) < 1e-5 and additive_gap(stem) > 1e-3


def test_stem_weights_are_named_for_the_state_dict_and_each_patch_is_embedded_on_its_own() -> None:
    model = M6Model(_config(patch_hidden=24))
    names = {n for n in model.state_dict() if n.startswith("embed.patches.")}
    assert names == {"embed.patches.pos", "embed.patches.proj.0.weight", "embed.patches.proj.0.bias",
                     "embed.patches.proj.2.weight", "embed.patches.proj.2.bias"}
    # changing the pixels of one patch changes that patch's embedding only
    x = torch.randn(1, 3, 16, 16)
    y = x.clone()
    y[:, :, 8:, :8] += 1.0  # bottom-left patch (row-major index 2)
    with torch.no_grad():
        changed = (model.embed.image(y) - model.embed.image(x)).abs().amax(-1)[0]
    assert changed[2] > 0 and torch.all(changed[[0, 1, 3]] == 0)


@pytest.mark.parametrize("patch_hidden", [0, 256])
def test_patch_positions_start_at_the_scale_of_the_patch_content(patch_hidden: int) -> None:
    # at very different scales one of them would be drowned after the first norm
    torch.manual_seed(0)
    model = M6Model(_config(image_size=48, patch_size=16, d_model=128, n_heads=8, patch_hidden=patch_hidden))
    with torch.no_grad():
        content = model.embed.patches.proj(torch.randn(64, 3, 48, 48)).std()
    ratio = float(model.embed.patches.pos.detach().std() / content)
    assert 0.5 < ratio < 2.0, ratio


@pytest.mark.parametrize("bad", [-1, True, 2.5])
def test_patch_hidden_must_be_a_non_negative_integer(bad: object) -> None:
    with pytest.raises(ValueError, match=r"M6Config.patch_hidden=.*must be an integer >= 0"):
        _config(patch_hidden=bad).validate()


def test_a_stem_model_round_trips_through_the_hugging_face_format(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    import m6lit  # noqa: F401  (registers the auto classes)
    from m6lit.model.hf import M6ForConditionalGeneration

    torch.manual_seed(0)
    model = M6Model(_config(patch_hidden=24)).eval()
    M6ForConditionalGeneration.from_m6(model).save_pretrained(tmp_path / "m6")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m6", trust_remote_code=True).eval()
    assert loaded.model.config.patch_hidden == 24
    batch = {"input_ids": torch.randint(2, 64, (2, 5)), "pixel_values": torch.randn(2, 3, 16, 16)}
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(batch).logits)
