"""Export of a model that generates images: the image tokenizer goes beside the model, and the folder generates the
same images with transformers alone, in a Python where m6lit cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import ByT5Tokenizer

from m6lit.export import ExportError, export_checkpoint
from m6lit.model import M6Config, M6Model
from m6lit.model.image_generation import GENERATE_PROMPT, generate_images
from m6lit.model.image_tokenizer import ImageTokenizer, tokenizer_config

TEXT = len(ByT5Tokenizer())


def _checkpoint(tmp_path: Path, codebook_size: int = 16) -> tuple[Path, Path, M6Model, ImageTokenizer]:
    torch.manual_seed(0)
    vq = ImageTokenizer(tokenizer_config(16, 16, embed_dim=4, channel_multiplier=(1, 2, 2), latent_channels=32))
    vq.eval()
    vq.save_pretrained(tmp_path / "image_tokenizer")
    config = M6Config(vocab_size=TEXT + 2 + codebook_size, d_model=32, n_heads=2, d_ff=64, num_layers=2,
                      max_seq_len=64, image_size=16, patch_size=8, image_codebook_size=codebook_size,
                      image_grid_size=4)
    model = M6Model(config).eval()
    ckpt = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "hyper_parameters": {"config": config.to_dict()}, "global_step": 0}
    torch.save(ckpt, tmp_path / "m.ckpt")
    return tmp_path / "m.ckpt", tmp_path / "image_tokenizer", model, vq


_CHILD = r"""
import json, sys
sys.modules["m6lit"] = None
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, io_file = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
images = model.generate_images(["a red circle", "two"], tok, guidance_scale=2.0, temperature=0, num_candidates=2)
expected = load_file(io_file)["images"]
print("RESULT " + json.dumps({"equal": bool(torch.equal(images, expected)), "shape": list(images.shape),
      "m6lit": sorted(m for m in sys.modules if m.startswith("m6lit") and sys.modules[m] is not None)}))
"""


def test_exported_folder_generates_images_without_m6lit(tmp_path: Path) -> None:
    ckpt, vq_folder, model, vq = _checkpoint(tmp_path)
    out = export_checkpoint(ckpt, tmp_path / "export", image_tokenizer=str(vq_folder))
    assert (out / "image_tokenizer" / "config.json").is_file()
    tok = ByT5Tokenizer()
    enc = lambda t: tok.encode(t, add_special_tokens=False)  # noqa: E731
    prompts = ["a red circle", "two"]
    expected = generate_images(model, vq.decode, [enc(GENERATE_PROMPT) + enc(p) for p in prompts],
                               enc(GENERATE_PROMPT), num_candidates=2, rerank_prompt=enc("caption:"),
                               rerank_captions=[enc(p) + [tok.eos_token_id] for p in prompts],
                               guidance_scale=2.0, temperature=0)["images"]
    save_file({"images": expected.contiguous()}, tmp_path / "io.safetensors")
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-I", "-c", _CHILD, str(out), str(tmp_path / "io.safetensors")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [x for x in result.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, result.stdout[-3000:] + result.stderr[-3000:]
    line = lines[-1]
    got = json.loads(line[len("RESULT "):])
    assert got == {"equal": True, "shape": [2, 3, 16, 16], "m6lit": []}


def test_export_needs_a_matching_image_tokenizer(tmp_path: Path) -> None:
    ckpt, vq_folder, _, _ = _checkpoint(tmp_path, codebook_size=16)
    with pytest.raises(ExportError, match="pass its image tokenizer folder"):
        export_checkpoint(ckpt, tmp_path / "a")
    with pytest.raises(ExportError, match="--image_tokenizer='.*nowhere': not a directory"):
        export_checkpoint(ckpt, tmp_path / "b", image_tokenizer=str(tmp_path / "nowhere"))
    ckpt2, _, _, _ = _checkpoint(tmp_path / "x" if (tmp_path / "x").mkdir() is None else tmp_path, codebook_size=32)
    with pytest.raises(ExportError, match="model.config.image_codebook_size=32 disagrees with image tokenizer"):
        export_checkpoint(ckpt2, tmp_path / "c", image_tokenizer=str(vq_folder))
