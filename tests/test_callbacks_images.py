"""Text → image through the `m6lit` CLI: fit with the generate task logs per-task losses and an ImageSamples table,
and `predict --model.predict_task generate` with a JSONL of prompts writes PNGs and a JSONL index."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from _wandb import metric, read_history
from m6lit.callbacks.images import to_pil
from m6lit.model.image_tokenizer import ImageTokenizer, tokenizer_config
from test_cli import OFFLINE_ENV, ROOT, run_cli, write_overrides

T2I = ROOT / "configs" / "t2i-demo.yaml"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var, value in OFFLINE_ENV.items():
        monkeypatch.setenv(var, value)
    monkeypatch.chdir(tmp_path)


def test_to_pil_maps_the_pixel_range() -> None:
    image = torch.stack([-torch.ones(2, 2), torch.zeros(2, 2), torch.ones(2, 2) * 2])
    assert list(to_pil(image).getpixel((0, 0))) == [0, 128, 255]


def test_fit_then_predict_images(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ImageTokenizer(tokenizer_config(16, 16, embed_dim=4, channel_multiplier=(1, 2, 2),
                                    latent_channels=32)).save_pretrained(tmp_path / "image_tokenizer")
    tiny = ["--model.config.d_model", "32", "--model.config.d_ff", "64", "--model.config.num_layers", "1", "--model.config.num_unique_blocks", "1",
            "--model.config.n_heads", "2", "--model.config.image_size", "16", "--model.config.patch_size", "8",
            "--model.image_candidates", "2", "--data.batch_size", "8",
            "--data.val", '[{"kind": "demo", "num_samples": 8, "seed": 1, "language": "en"}]']
    overrides = write_overrides(tmp_path / "o.yaml", max_steps=2, val_check_interval=2, log_every_n_steps=1,
                                num_sanity_val_steps=0,
                                callbacks=[{"class_path": "m6lit.callbacks.ImageSamples",
                                            "init_args": {"num_samples": 2}},
                                           {"class_path": "m6lit.callbacks.ImageWriter",
                                            "init_args": {"output_dir": "generated"}}])
    run = run_cli("fit", "--config", str(T2I), "--config", str(overrides), *tiny)
    rows = read_history(run)
    assert metric(rows, "train/loss_generate") and metric(rows, "train/loss")
    assert list((run / "files" / "media" / "table" / "val").glob("image_samples_*.table.json"))

    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in
                                                      ["a large red circle in the center", "a small blue star"]))
    run_cli("predict", "--config", str(T2I), "--config", str(overrides), *tiny, "--ckpt_path",
            "checkpoints/last.ckpt", "--model.predict_task", "generate",
            "--data.predict", json.dumps([{"kind": "jsonl", "path": str(tmp_path / "prompts.jsonl")}]),
            runs="runs_predict")
    index = [json.loads(line) for line in (tmp_path / "generated" / "index.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in index] == ["a large red circle in the center", "a small blue star"]
    for row in index:
        assert Image.open(tmp_path / "generated" / row["file"]).size == (16, 16)
