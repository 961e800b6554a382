"""Reading checkpoints for export: missing, truncated and foreign checkpoints are clear errors that write nothing,
and the run record (delinks, monitored metrics) comes from the callbacks' states."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _export_run import exported_run
from _fakes import tiny_config

from m6lit.export.checkpoint import training_record
from m6lit.export.command import export_checkpoint
from m6lit.export.errors import ExportError
from m6lit.model import M6Model


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return exported_run(tmp_path_factory.getbasetemp() / "exported_run")


def test_missing_or_corrupt_checkpoint_is_a_clear_error(run: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="does not exist"):
        export_checkpoint(tmp_path / "missing.ckpt", out)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(run["real_ckpt"].read_bytes()[:5000])
    with pytest.raises(ExportError, match="truncated.ckpt.*cannot be read"):
        export_checkpoint(truncated, out)
    not_m6 = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}}, not_m6)
    with pytest.raises(ExportError, match=r"no hyper_parameters\['config'\]"):
        export_checkpoint(not_m6, out)
    small = tmp_path / "small_vocab.ckpt"
    model = M6Model(tiny_config())
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"config": model.config.to_dict()}}, small)
    with pytest.raises(ExportError, match="has 384 tokens but the model's vocab_size is 64"):
        export_checkpoint(small, out)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_training_record_reads_delinks_and_monitored_metrics() -> None:
    ckpt = {"global_step": 30, "epoch": 1, "pytorch-lightning_version": "2.6.6", "callbacks": {
        "PseudoToReal": {"done": [[10, 4], [20, 8]]},
        "ModelCheckpoint{'monitor': 'val/loss', 'mode': 'min'}": {"monitor": "val/loss", "best_model_score":
                                                                  torch.tensor(1.5), "current_score": 2.0},
        "ModelCheckpoint{'monitor': 'val/ppl', 'mode': 'min'}": {"monitor": "val/ppl",
                                                                 "best_model_score": float("nan")},
        "EarlyStopping{'monitor': 'val/loss', 'mode': 'min'}": {"best_score": 1.5},
        "M6ProgressBar": None}}
    record = training_record(ckpt)
    assert (record["global_step"], record["epoch"], record["lightning_version"]) == (30, 1, "2.6.6")
    assert record["delinks"] == [(10, 4), (20, 8)]
    assert record["metrics"] == [("val/loss", "best", 1.5, "ModelCheckpoint"),
                                 ("val/loss", "at this checkpoint", 2.0, "ModelCheckpoint")], \
        "non-finite values and a repeat of the same figure (EarlyStopping's best) are left out"
