"""CaptionAccuracy: greedy captions of the demo validation scenes, scored per attribute against the scenes."""

from __future__ import annotations

import logging
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from m6lit.callbacks import CaptionAccuracy
from m6lit.callbacks.caption_accuracy import accuracy_table, format_table
from m6lit.data.datamodule import ImageTextDataModule
from m6lit.data.demo import DemoShape, caption_scene, score_caption
from m6lit.data.sources import SourceSpec
from m6lit.model import M6Config
from m6lit.module import M6LitModule


class ScriptedModule:
    """Stands in for the LightningModule: `generate` answers each prompt with the next scripted caption."""

    def __init__(self, captions: list[str], tokenizer, config: M6Config) -> None:
        self.captions, self.tokenizer = list(captions), tokenizer
        self.model = SimpleNamespace(config=config)
        self.device = torch.device("cpu")
        self.logged: dict[str, float] = {}
        self.prompt_rows = 0

    def generate(self, batch: dict, max_new_tokens: int, do_sample: bool) -> torch.Tensor:
        assert not do_sample
        rows = batch["input_ids"].shape[0]
        assert batch["pixel_values"].shape[0] == rows and bool(batch["image_mask"].all())
        self.prompt_rows += rows
        texts, self.captions = self.captions[:rows], self.captions[rows:]
        ids = [self.tokenizer.encode(t, add_special_tokens=False)[:max_new_tokens] for t in texts]
        out = torch.full((rows, max(map(len, ids))), self.tokenizer.pad_token_id)
        for i, row in enumerate(ids):
            out[i, :len(row)] = torch.tensor(row)
        return out

    def log(self, name: str, value: float, **_: object) -> None:
        self.logged[name] = value


def _data(**val: object) -> ImageTextDataModule:
    spec = dict(kind="demo", num_samples=12, seed=1, max_shapes=2, **val)
    return ImageTextDataModule(val=[SourceSpec(**spec)], image_size=48, batch_size=4)


def _config() -> M6Config:
    return M6Config(vocab_size=384, d_model=32, n_heads=4, d_ff=64, num_layers=2, image_size=48, patch_size=16,
                    max_seq_len=224)


def test_true_captions_score_one_and_wrong_colours_score_zero_on_colour_only() -> None:
    data = _data()
    source = data.dataset("val").source
    scenes = [source.scene(i) for i in range(12)]
    recoloured = [replace(s, shapes=tuple(replace(sh, color="red" if sh.color != "red" else "blue")
                                          for sh in s.shapes)) for s in scenes]
    callback = CaptionAccuracy(num_samples=12, batch_size=5)  # 5 does not divide 12: the last batch is short
    trainer = SimpleNamespace(datamodule=data, sanity_checking=False, global_step=7)

    module = ScriptedModule([caption_scene(s) for s in scenes], data.tokenizer, _config())
    callback.on_validation_epoch_end(trainer, module)
    assert module.prompt_rows == 12
    assert all(v == 1.0 for v in module.logged.values()), module.logged
    assert "val/caption/1shape/color" in module.logged and "val/caption/2shape/position" in module.logged

    module = ScriptedModule([caption_scene(s) for s in recoloured], data.tokenizer, _config())
    callback.on_validation_epoch_end(trainer, module)
    for group in ("all", "1shape", "2shape"):
        assert module.logged[f"val/caption/{group}/color"] == 0.0
        assert module.logged[f"val/caption/{group}/exact"] == 0.0
        for attribute in ("background", "count", "kind", "size", "position"):
            assert module.logged[f"val/caption/{group}/{attribute}"] == 1.0
    assert "step 7" in callback.report() and "color" in callback.report()


def test_partly_right_captions_give_the_exact_fractions() -> None:
    """Known captions for four known scenes: each attribute's accuracy is the hand-counted fraction."""
    shape = DemoShape(kind="circle", color="red", size="small", cell=0)
    other = DemoShape(kind="star", color="blue", size="large", cell=8)
    one = SimpleNamespace(shapes=(shape,), background="white")
    two = SimpleNamespace(shapes=(shape, other), background="black")
    captions = [
        "a small red circle in the top left on a white background",  # all right
        "a large red circle in the top left on a gray background",  # size and background wrong
        "a small red circle in the top left on a black background",  # second shape missing: count wrong too
        "黑色背景上，左上角有一个小的红色圆形，右下角有一个大的蓝色十字形。",  # second kind wrong
    ]
    scenes = [one, one, two, two]
    table = accuracy_table([(s, score_caption(s, c)) for s, c in zip(scenes, captions)])
    assert table["1shape"] == {"background": 0.5, "count": 1.0, "kind": 1.0, "color": 1.0, "size": 0.5,
                               "position": 1.0, "exact": 0.5}
    assert table["2shape"] == {"background": 1.0, "count": 0.5, "kind": 0.5, "color": 0.75, "size": 0.75,
                               "position": 0.75, "exact": 0.0}
    assert table["all"]["kind"] == 4 / 6 and table["all"]["color"] == 5 / 6
    assert table["all"]["background"] == 0.75 and table["all"]["exact"] == 0.25
    text = format_table(table, {"all": 4, "1shape": 2, "2shape": 2})
    assert text.splitlines()[0].split() == ["attribute", "all", "(4)", "1shape", "(2)", "2shape", "(2)"]
    assert "0.833" in text


def test_text_only_scenes_are_left_out_and_num_samples_is_respected() -> None:
    data = _data(text_only_fraction=0.5)
    source = data.dataset("val").source
    with_image = [source.scene(i) for i in range(12) if not source.scene(i).text_only]
    assert 0 < len(with_image) < 12
    callback = CaptionAccuracy(num_samples=3)
    module = ScriptedModule([caption_scene(s) for s in with_image[:3]], data.tokenizer, _config())
    callback.on_validation_epoch_end(SimpleNamespace(datamodule=data, sanity_checking=False, global_step=0), module)
    assert module.prompt_rows == 3 and callback.last_counts["all"] == 3
    assert module.logged["val/caption/all/exact"] == 1.0


def test_validation_data_without_a_demo_source_is_an_error(tmp_path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"text": "hello"}\n')
    data = ImageTextDataModule(val=[SourceSpec(kind="jsonl", path=str(manifest))], image_size=48)
    module = ScriptedModule([], data.tokenizer, _config())
    with pytest.raises(ValueError, match="data.val has no demo source"):
        CaptionAccuracy().on_validation_epoch_end(
            SimpleNamespace(datamodule=data, sanity_checking=False, global_step=0), module)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="num_samples"):
        CaptionAccuracy(num_samples=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        CaptionAccuracy(max_new_tokens=0)


def test_logged_during_fit_and_printed_at_the_end(caplog: pytest.LogCaptureFixture) -> None:
    seed_everything(0)
    data = ImageTextDataModule(train=[SourceSpec(kind="demo", num_samples=64, seed=0)],
                               val=[SourceSpec(kind="demo", num_samples=8, seed=1)],
                               image_size=48, batch_size=8, max_text_len=200)
    module = M6LitModule(_config(), warmup_steps=1, max_new_tokens=4)
    callback = CaptionAccuracy(num_samples=6, max_new_tokens=8)
    trainer = Trainer(max_steps=2, val_check_interval=2, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    with caplog.at_level(logging.INFO):
        trainer.fit(module, datamodule=data)
    metrics = trainer.callback_metrics
    for attribute in ("background", "count", "kind", "color", "size", "position", "exact"):
        assert 0.0 <= float(metrics[f"val/caption/all/{attribute}"]) <= 1.0
    assert callback.last_step == 2 and callback.last_counts["all"] == 6
    assert "caption accuracy on 6 validation scenes at step 2" in caplog.text
    assert "position" in caplog.text.split("caption accuracy")[-1]
