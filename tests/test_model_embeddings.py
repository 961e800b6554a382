"""Input embeddings: the patch conv and its centred form (`patch_centered`): the same linear map computed without
the centred copy, the uniform part's start scale, state-dict names, config errors and the Hugging Face round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from m6lit.model import M6Config, M6Model
from m6lit.model.embeddings import ImagePatchEmbed


def _config(**overrides) -> M6Config:
    base = dict(vocab_size=64, d_model=32, n_heads=4, d_ff=64, num_layers=2, image_size=16, patch_size=8,
                max_seq_len=48)
    base.update(overrides)
    return M6Config(**base)


def test_centred_embedding_is_the_conv_of_the_centred_patches_plus_a_projection_of_their_means() -> None:
    torch.manual_seed(0)
    embed = ImagePatchEmbed(16, 8, 3, 32, centered=True)
    x = torch.randn(2, 3, 16, 16)
    means = F.avg_pool2d(x, 8)  # [2, 3, 2, 2]
    centred = x - means.repeat_interleave(8, 2).repeat_interleave(8, 3)
    want = (embed.proj(centred) + embed.mean_proj(means)).flatten(2).transpose(1, 2) + embed.pos
    with torch.no_grad():
        assert torch.allclose(embed(x), want, atol=1e-5, rtol=1e-5)
    # each patch on its own: changing one patch's pixels changes that patch's embedding only
    y = x.clone()
    y[:, :, 8:, :8] += 1.0  # bottom-left patch (row-major index 2)
    with torch.no_grad():
        changed = (embed(y) - embed(x)).abs().amax(-1)
    assert torch.all(changed[:, 2] > 0) and torch.all(changed[:, [0, 1, 3]] == 0)


def test_a_uniform_background_starts_at_the_scale_of_one_weight_when_centred() -> None:
    # plain conv: a white patch's content is the sum of its C·p² weights (std 0.02·sqrt(768) at the demo's
    # shape); centred: the 1x1 projection of its 3 channel means (0.02·sqrt(3)), 16x smaller
    torch.manual_seed(0)
    white = torch.ones(1, 3, 48, 48)
    sizes = {}
    for centered in (False, True):
        model = M6Model(_config(image_size=48, patch_size=16, d_model=128, n_heads=8, patch_centered=centered))
        with torch.no_grad():
            sizes[centered] = float((model.embed.patches(white) - model.embed.patches.pos).std())
    assert sizes[True] < sizes[False] / 8, sizes


def test_centred_weights_are_named_for_the_state_dict_and_absent_otherwise() -> None:
    names = {c: {n for n in M6Model(_config(patch_centered=c)).state_dict() if n.startswith("embed.patches.")}
             for c in (False, True)}
    assert names[False] == {"embed.patches.pos", "embed.patches.proj.weight", "embed.patches.proj.bias"}
    assert names[True] == names[False] | {"embed.patches.mean_proj.weight"}


def test_centring_needs_the_built_in_conv_and_a_boolean() -> None:
    with pytest.raises(ValueError, match="patch_centered applies to the built-in patch conv"):
        ImagePatchEmbed(16, 8, 3, 32, backbone=nn.Conv2d(3, 32, 8, stride=8), centered=True)
    with pytest.raises(ValueError, match=r"M6Config.patch_centered='yes': must be true or false"):
        _config(patch_centered="yes").validate()


def test_a_centred_model_round_trips_through_the_hugging_face_format(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    import m6lit  # noqa: F401  (registers the auto classes)
    from m6lit.model.hf import M6ForConditionalGeneration

    torch.manual_seed(0)
    model = M6Model(_config(patch_centered=True)).eval()
    M6ForConditionalGeneration.from_m6(model).save_pretrained(tmp_path / "m6")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m6", trust_remote_code=True).eval()
    assert loaded.model.config.patch_centered is True
    batch = {"input_ids": torch.randint(2, 64, (2, 5)), "pixel_values": torch.randn(2, 3, 16, 16)}
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(batch).logits)
