"""The model card: the checkpoint's own metrics, sharing and delink, parameter counts, and the run's data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _export_run import exported_run

from m6lit.export.card import NO_METRICS
from m6lit.export.checkpoint import load_checkpoint, model_from_checkpoint
from m6lit.export.command import export_checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return exported_run(tmp_path_factory.getbasetemp() / "exported_run")


def test_card_states_the_checkpoint_metrics_sharing_and_delink(run: dict[str, Path]) -> None:
    ckpt = torch.load(run["real_ckpt"], weights_only=True)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint"))
    best = float(state["best_model_score"])
    model = model_from_checkpoint(ckpt)
    card = (run["real"] / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card and "mixture-of-experts" in card
    assert f"| `val/loss` | {best:.4f} | best | ModelCheckpoint |" in card
    assert "after step 2 to 4 blocks" in card and "**real**" in card
    assert f"({model.num_parameters(unique=True):,})" in card
    assert f"optimizer steps: {ckpt['global_step']}" in card
    pseudo_card = (run["pseudo"] / "README.md").read_text()
    pseudo = model_from_checkpoint(load_checkpoint(run["pseudo_ckpt"]))
    assert NO_METRICS in pseudo_card  # saved before the first validation: it says so instead of inventing one
    assert "**pseudo**: 4 logical layers run on 2 physical blocks" in pseudo_card
    assert f"({pseudo.num_parameters(unique=False):,})" in pseudo_card
    assert pseudo.num_parameters(unique=False) > pseudo.num_parameters(unique=True)


def test_run_config_puts_the_data_in_the_card(run: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("model: {}\ndata:\n  train:\n  - {kind: jsonl, path: data/train.jsonl}\n  tokenizer: null\n")
    folder = export_checkpoint(run["pseudo_ckpt"], tmp_path / "with_data", run_config=config)
    card = (folder / "README.md").read_text()
    assert '- train: `{"kind": "jsonl", "path": "data/train.jsonl"}`' in card and "ByT5" in card
    assert "does not record the training data" in (run["pseudo"] / "README.md").read_text()
