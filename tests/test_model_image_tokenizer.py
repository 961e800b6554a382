"""The VQ image tokenizer: the training path and the Janus code path agree, the exported folder encodes and decodes
bit for bit like the trained tokenizer in plain transformers, and bad input names its key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import JanusVQVAE

from m6lit.model.image_tokenizer import ImageTokenizer, load_image_tokenizer, tokenizer_config


def tiny(image_size: int = 16, codebook_size: int = 32) -> ImageTokenizer:
    torch.manual_seed(0)
    return ImageTokenizer(tokenizer_config(image_size, codebook_size, embed_dim=4, base_channels=32,
                                           channel_multiplier=(1, 2), latent_channels=32))


def train_a_little(tok: ImageTokenizer, steps: int = 3) -> torch.Tensor:
    opt = torch.optim.Adam([p for p in tok.parameters() if p.requires_grad], lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.rand(4, 3, 16, 16, generator=gen) * 2 - 1
        out = tok(x)
        loss = (out.reconstruction - x).abs().mean() + out.commitment_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.rand(5, 3, 16, 16, generator=gen) * 2 - 1


def test_grid_and_training_path_codes_equal_the_janus_code_path() -> None:
    tok = tiny()
    x = train_a_little(tok)
    tok.eval()
    assert tok.grid_size == 8 and tok.image_size == 16 and tok.codebook_size == 32
    with torch.no_grad():
        train_codes = tok(x).codes
    codes = tok.encode(x)
    assert codes.shape == (5, 64) and int(codes.max()) < 32
    assert torch.equal(codes, train_codes)


def test_export_round_trip_is_bit_exact(tmp_path: Path) -> None:
    tok = tiny()
    x = train_a_little(tok)
    tok.eval()
    codes, pixels = tok.encode(x), tok.decode(tok.encode(x))
    tok.save_pretrained(tmp_path / "tok")
    loaded = JanusVQVAE.from_pretrained(str(tmp_path / "tok")).eval()
    with torch.no_grad():
        exported_codes = loaded.encode(x).image_tokens.view(5, -1)
        exported_pixels = loaded.decode(exported_codes)
    assert torch.equal(exported_codes, codes)
    assert torch.equal(exported_pixels, pixels)
    # the codebook really was written back: a fresh network decodes differently
    assert not torch.equal(JanusVQVAE(tok.config).eval().quantize.embedding.weight, loaded.quantize.embedding.weight)
    assert not loaded.training and not any(p.requires_grad for p in load_image_tokenizer(tmp_path / "tok").parameters())


def test_image_size_the_grid_does_not_divide_names_the_key() -> None:
    with pytest.raises(ValueError, match=r"image_size=50 .*downsampling factor 4"):
        tokenizer_config(50, channel_multiplier=(1, 2, 2))
    with pytest.raises(ValueError, match="image tokenizer: pixel_values has shape .*image_size"):
        tiny().encode(torch.zeros(1, 3, 24, 24))


def test_missing_or_wrong_folder_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data.image_tokenizer='.*nowhere': not a directory"):
        load_image_tokenizer(tmp_path / "nowhere", key="data.image_tokenizer")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"data.image_tokenizer='.*empty': no config.json"):
        load_image_tokenizer(tmp_path / "empty", key="data.image_tokenizer")
