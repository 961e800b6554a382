"""AttributeTagger + TaggingDataModule: learns the demo attributes, checkpoints round-trip, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from m6lit.model import M6Config
from m6lit.tagger import AttributeTagger, TaggingDataModule

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
