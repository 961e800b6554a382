"""The generate task in the data path: image codes join the vocabulary after the text ids, targets are
BOI + the tokenizer's codes + EOI, the caption is dropped for guidance at the configured rate, and bad settings name
their key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # per-sample encodes of a tiny network: threads only contend on a shared CI box

from m6lit.data.datamodule import ImageTextDataModule
from m6lit.data.demo import DemoImageText
from m6lit.data.tasks import PROMPTS, TASKS, image_to_tensor
from m6lit.model import M6Config
from m6lit.model.image_tokenizer import ImageTokenizer, tokenizer_config
from m6lit.model.image_vocab import ImageVocab
from m6lit.module import M6LitModule


@pytest.fixture(scope="module")
def vq_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    vq = ImageTokenizer(tokenizer_config(16, 16, embed_dim=4, channel_multiplier=(1, 2, 2), latent_channels=32))
    folder = tmp_path_factory.mktemp("vq") / "tok"
    vq.save_pretrained(folder)
    return folder


def datamodule(vq_folder: Path, **kwargs: object) -> ImageTextDataModule:
    defaults: dict = dict(image_tokenizer=str(vq_folder), image_size=16, max_text_len=200, batch_size=8,
                          task_mix={"caption": 0.0, "denoise": 0.0, "lm": 0.0, "generate": 1.0},
                          train=[{"kind": "demo", "num_samples": 200, "seed": 0, "language": "en"}])
    defaults.update(kwargs)
    return ImageTextDataModule(**defaults)


def test_vocabulary_sizes_and_generate_targets(vq_folder: Path) -> None:
    dm = datamodule(vq_folder)
    text = len(dm.tokenizer)
    assert (dm.vocab_size, dm.image_codebook_size, dm.image_grid_size) == (text + 2 + 16, 16, 4)
    vocab = ImageVocab(text, 16, 4)
    dataset = dm.dataset("train")
    example = dataset[0]
    assert example["task"] == "generate" and example["pixel_values"] is None
    target = example["target"]
    assert target[0] == vocab.boi and target[-1] == vocab.eoi and len(target) == 2 + 16
    sample = DemoImageText(200, seed=0, image_size=16, language="en")[0]
    codes = dm.image_codes.tokenizer.encode(image_to_tensor(sample["image"], 16)[None]).image_tokens.view(-1)
    assert torch.equal(vocab.ids_to_codes(target[1:-1]), codes)
    marker = dm.tokenizer.encode(PROMPTS["generate"], add_special_tokens=False)
    assert example["prefix"][:len(marker)].tolist() == marker
    batch = next(iter(dm.train_dataloader()))
    assert (batch["task_ids"] == TASKS.index("generate")).all()


def test_caption_dropout_rate(vq_folder: Path) -> None:
    dm = datamodule(vq_folder, caption_dropout=0.3)
    marker = len(dm.tokenizer.encode(PROMPTS["generate"], add_special_tokens=False))
    dataset = dm.dataset("train")
    dropped = sum(len(dataset[i]["prefix"]) == marker for i in range(80))
    assert 12 <= dropped <= 36  # 24 expected
    none = datamodule(vq_folder, caption_dropout=0.0).dataset("train")
    assert all(len(none[i]["prefix"]) > marker for i in range(20))


def test_bad_settings_name_their_key(vq_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data.image_tokenizer='.*missing': not a directory"):
        datamodule(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"encodes 16x16 images but data.image_size=32"):
        datamodule(vq_folder, image_size=32)
    with pytest.raises(ValueError, match=r"task_mix.generate > 0 needs an image tokenizer \(data.image_tokenizer"):
        ImageTextDataModule(task_mix={"caption": 0.5, "denoise": 0.0, "lm": 0.0, "generate": 0.5})


def test_module_refuses_a_tokenizer_that_disagrees_with_its_config(vq_folder: Path) -> None:
    dm = datamodule(vq_folder)
    config = M6Config(vocab_size=dm.vocab_size + 16, d_model=32, n_heads=2, d_ff=64, num_layers=1, max_seq_len=240,
                      image_size=16, patch_size=8, image_codebook_size=32, image_grid_size=4)

    class _Trainer:
        datamodule = dm

    module = M6LitModule(config)
    module._trainer = _Trainer()  # type: ignore[assignment]
    with pytest.raises(ValueError, match="model.config.image_codebook_size=32 disagrees with data.image_tokenizer"):
        module.setup("fit")
    good = M6LitModule(config.replace(vocab_size=dm.vocab_size, image_codebook_size=16))
    good._trainer = _Trainer()  # type: ignore[assignment]
    good.setup("fit")
