"""AttributeTagger + TaggingDataModule: learns the demo attributes, checkpoints round-trip, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from m6lit.model import M6Config, M6Model
from m6lit.tagger import AttributeTagger, TaggingDataModule

ROOT = Path(__file__).resolve().parents[1]
CONFIG = M6Config(d_model=32, n_heads=2, d_ff=64, num_layers=2, image_size=48, patch_size=16, max_seq_len=64)


def _fit(tmp_path: Path, steps: int = 300, **model) -> tuple[pl.Trainer, AttributeTagger]:
    pl.seed_everything(0)
    dm = TaggingDataModule(train=[{"kind": "demo", "num_samples": 2000, "seed": 0, "max_shapes": 1}],
                           val=[{"kind": "demo", "num_samples": 128, "seed": 1, "max_shapes": 1}], image_size=48,
                           batch_size=64)
    tagger = AttributeTagger(config=CONFIG, head="mlp", lr=3e-3, **model)
    trainer = pl.Trainer(max_steps=steps, val_check_interval=steps, check_val_every_n_epoch=None, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(tagger, dm)
    return trainer, tagger


def test_a_tagger_learns_demo_attributes_above_chance_in_seconds(tmp_path: Path) -> None:
    trainer, tagger = _fit(tmp_path)
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    # random frozen features of a tiny model: the background and the shape's colour and size are readable
    assert m["val/tag/background/top1"] >= 0.95 and m["val/tag/background/exact"] >= 0.95
    assert m["val/tag/color/top1"] >= 0.5  # chance 1/6
    assert m["val/tag/size/top1"] >= 0.6  # chance 1/2
    assert not any(p.requires_grad for p in tagger.backbone.parameters())
    # the checkpoint keeps the vocabulary: a reload gives the same head and the same logits
    ckpt = tmp_path / "tagger.ckpt"
    trainer.save_checkpoint(ckpt)
    again = AttributeTagger.load_from_checkpoint(ckpt)
    dm = TaggingDataModule(val=[{"kind": "demo", "num_samples": 4, "seed": 5}], image_size=48)
    data = dm.dataset("val")
    batch = dm.collate([data[i] for i in range(4)])
    torch.testing.assert_close(again.eval()(batch), tagger.eval()(batch), rtol=0, atol=0)


def test_fine_tuning_moves_the_backbone(tmp_path: Path) -> None:
    _, tagger = _fit(tmp_path, steps=3, freeze_backbone=False)
    assert all(p.requires_grad for p in tagger.backbone.parameters())
    pl.seed_everything(0)
    reference = AttributeTagger(config=CONFIG, head="mlp").backbone.state_dict()  # the same seeded start
    moved = [k for k, v in tagger.backbone.state_dict().items() if not torch.equal(v, reference[k])]
    assert len(moved) > len(reference) // 2, moved


def test_labels_outside_the_vocabulary_name_file_and_line(tmp_path: Path) -> None:
    manifest = tmp_path / "tags.jsonl"
    manifest.write_text(json.dumps({"text": "a red thing", "labels": {"color": "red"}}) + "\n"
                        + json.dumps({"text": "a shiny thing", "labels": {"finish": "shiny"}}) + "\n")
    dm = TaggingDataModule(train=[{"kind": "jsonl", "path": str(manifest)}], attributes={"color": ["red", "blue"]})
    data = dm.dataset("train")
    assert data[0]["target"].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match=rf"{manifest}:2: unknown attribute 'finish'"):
        data[1]
    manifest.write_text(json.dumps({"text": "a red thing", "labels": {"color": "red"}}) + "\n{broken\n")
    with pytest.raises(ValueError, match=rf"{manifest}:2"):
        TaggingDataModule(train=[{"kind": "jsonl", "path": str(manifest)}],
                          attributes={"color": ["red"]}).dataset("train")[1]


def test_configuration_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="data.attributes: give the attribute vocabulary"):
        TaggingDataModule(train=[{"kind": "jsonl", "path": "x.jsonl"}])
    with pytest.raises(ValueError, match="model.backbone"):
        AttributeTagger()
    with pytest.raises(ValueError, match="model.head='deep'"):
        AttributeTagger(config=CONFIG, head="deep")
    with pytest.raises(ValueError, match="modality='audio'"):
        AttributeTagger(config=CONFIG, modality="audio")


def test_the_cli_trains_a_tagger_from_a_checkpoint_backbone_and_logs_per_attribute_metrics(tmp_path: Path) -> None:
    torch.manual_seed(0)
    backbone = M6Model(CONFIG)
    torch.save({"state_dict": {f"model.{k}": v for k, v in backbone.state_dict().items()},
                "hyper_parameters": {"config": CONFIG.to_dict()}}, tmp_path / "demo.ckpt")
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "m6lit", "fit", "--config", str(ROOT / "configs" / "tagger-demo.yaml"),
         "--model.init_args.backbone", str(tmp_path / "demo.ckpt"), "--trainer.max_steps", "4",
         "--trainer.val_check_interval", "2", "--data.train", '[{"kind": "demo", "num_samples": 64, "max_shapes": 1}]',
         "--data.val", '[{"kind": "demo", "num_samples": 32, "seed": 1, "max_shapes": 1}]', "--data.batch_size", "16",
         "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path / "csv"),
         "--trainer.enable_progress_bar", "false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics,) = (tmp_path / "csv").rglob("metrics.csv")
    header = metrics.read_text().splitlines()[0].split(",")
    for attribute in ("background", "kind", "color", "size", "position"):
        assert {f"val/tag/{attribute}/{m}" for m in ("exact", "f1", "top1")} <= set(header), header
    reloaded = AttributeTagger.load_from_checkpoint(tmp_path / "checkpoints" / "tagger" / "last.ckpt")
    assert reloaded.hparams.backbone_source == str(tmp_path / "demo.ckpt") and reloaded.vocab.size == 25
