"""CaptionSamples: prompts cut from a validation batch, and generation that never runs past max_seq_len."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from _fakes import tiny_config

from m6lit.callbacks.samples import CaptionSamples, prompts_from_batch
from m6lit.module import M6LitModule


def _batch(prefix: list[int], width: int = 40) -> dict:
    b = len(prefix)
    ids = torch.randint(2, 60, (b, width), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones(b, width, dtype=torch.bool),
            "labels": ids.clone(), "prefix_len": torch.tensor(prefix),
            "pixel_values": torch.zeros(b, 3, 16, 16), "image_mask": torch.tensor([False] + [True] * (b - 1))}


def test_prompts_keep_each_rows_prefix_image_rows_first() -> None:
    batch = _batch([3, 5, 2])
    prompts = prompts_from_batch(batch, limit=2)
    assert prompts["row_has_image"].tolist() == [True, True]
    assert prompts["prefix_len"].tolist() == [5, 2] and prompts["input_ids"].shape == (2, 5)
    assert torch.equal(prompts["input_ids"][0], batch["input_ids"][1, :5])
    assert prompts["input_ids"][1, 2:].tolist() == [0, 0, 0] and prompts["attention_mask"][1].tolist() == [1, 1] + [0] * 3


def test_a_long_prompt_gets_only_the_room_left_in_max_seq_len() -> None:
    torch.manual_seed(0)
    module = M6LitModule(tiny_config(max_seq_len=48), max_new_tokens=160).eval()  # 160 would not fit
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, datamodule=None, loggers=[], global_step=7)
    callback = CaptionSamples(num_samples=2)
    callback.on_validation_batch_end(trainer, module, None, _batch([30, 20]), 0)
    callback.on_validation_epoch_end(trainer, module)
    rows = callback.last_rows
    assert len(rows) == 2
    room = 48 - 30 - 4  # max_seq_len - the widest prompt - the image's 4 patches
    assert max(len(r["generated"].split()) for r in rows) <= room
    assert any(len(r["generated"].split()) == room for r in rows)  # no EOS in an untrained model: it fills the room
