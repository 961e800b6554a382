"""Atomic checkpoint writes: an interrupted save leaves the previous checkpoint loadable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from m6lit import checkpoint_io
from m6lit.checkpoint_io import AtomicCheckpointIO


def test_interrupted_save_keeps_the_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)

    def dying_save(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 partial bytes of a checkpoint")
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(checkpoint_io.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    monkeypatch.undo()
    loaded = io.load_checkpoint(path, weights_only=True)
    assert loaded["global_step"] == 1 and torch.equal(loaded["state_dict"]["w"], torch.ones(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"], "no temporary file may be left"


def test_save_replaces_and_round_trips(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "a.ckpt"
    for step in (1, 2):
        io.save_checkpoint({"global_step": step, "t": torch.arange(step)}, path)
    loaded = io.load_checkpoint(path, weights_only=True)
    assert loaded["global_step"] == 2 and torch.equal(loaded["t"], torch.arange(2))


def test_saved_checkpoint_has_the_umask_mode_not_0600(tmp_path: Path) -> None:
    import os

    old = os.umask(0o022)
    try:
        AtomicCheckpointIO().save_checkpoint({"x": torch.ones(1)}, tmp_path / "a.ckpt")
    finally:
        os.umask(old)
    assert (tmp_path / "a.ckpt").stat().st_mode & 0o777 == 0o644
