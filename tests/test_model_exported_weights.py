"""`init_from`: a model starts from an export's weights (training continues from them), a pseudo export starts a
real model computing the same function, and every disagreeing config key is named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _export_run import exported_run, sample_batch
from _fakes import ContractBatches, collate, fit

from m6lit.export.checkpoint import load_checkpoint, model_from_checkpoint
from m6lit.model import lm_loss
from m6lit.module import M6LitModule


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return exported_run(tmp_path_factory.getbasetemp() / "exported_run")


def test_init_from_starts_training_from_the_exported_weights(run: dict[str, Path]) -> None:
    config = load_checkpoint(run["real_ckpt"])["hyper_parameters"]["config"]
    reference = model_from_checkpoint(load_checkpoint(run["real_ckpt"]))
    module = M6LitModule(config, warmup_steps=0, init_from=str(run["real"]))
    for name, tensor in reference.state_dict().items():
        assert torch.equal(module.model.state_dict()[name], tensor), name
    first = collate([ContractBatches()[i] for i in range(4)])  # the first batch `fit` trains on
    with torch.no_grad():
        out = reference.train()(first)
        expected = float(lm_loss(out.logits, first["labels"]) + out.aux_loss)
    _, recorder = fit(module, max_steps=1)
    assert recorder.rows[0][0] == 1 and abs(recorder.rows[0][1] - expected) < 1e-5
    assert not torch.equal(module.model.embed.tokens.weight, reference.embed.tokens.weight)  # it trained


def test_init_from_a_pseudo_export_into_a_real_model_keeps_the_function(run: dict[str, Path]) -> None:
    config = load_checkpoint(run["pseudo_ckpt"])["hyper_parameters"]["config"]
    module = M6LitModule(dict(config, num_unique_blocks=4), init_from=str(run["pseudo"])).eval()
    pseudo = model_from_checkpoint(load_checkpoint(run["pseudo_ckpt"]))
    assert len(module.model.blocks) == 4
    assert torch.equal(module.model.blocks[2].attn.qkv.weight, pseudo.blocks[0].attn.qkv.weight)
    assert module.model.blocks[2].attn.qkv.weight.data_ptr() != module.model.blocks[0].attn.qkv.weight.data_ptr()
    batch = sample_batch(images=True)
    with torch.no_grad():
        assert (module.model(batch).logits - pseudo(batch).logits).abs().max() <= 1e-5


def test_init_from_names_every_disagreeing_key(run: dict[str, Path], tmp_path: Path) -> None:
    config = load_checkpoint(run["real_ckpt"])["hyper_parameters"]["config"]
    with pytest.raises(ValueError, match=r"\['d_ff', 'd_model'\].*d_model: model.config=48, export=32"):
        M6LitModule(dict(config, d_model=48, d_ff=96), init_from=str(run["real"]))
    with pytest.raises(ValueError, match="does not refine"):
        M6LitModule(dict(config, num_unique_blocks=2), init_from=str(run["real"]))  # fewer blocks than the export
    M6LitModule(dict(config, dropout=0.1), init_from=str(run["real"]))  # a training-only key may differ
    with pytest.raises(ValueError, match="no config.json"):
        M6LitModule(config, init_from=str(tmp_path))
