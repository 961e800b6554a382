"""M6LitModule: parameter groups, LR schedule, learning, resume equivalence, non-finite guards."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from _fakes import fit, tiny_config

from m6lit.module import M6LitModule, build_param_groups, warmup_cosine


def _module(**overrides) -> M6LitModule:
    torch.manual_seed(0)
    return M6LitModule(tiny_config(**overrides), warmup_steps=2)


def test_param_groups_cover_every_parameter_once_and_skip_decay_on_norms_and_embeddings() -> None:
    module = _module()
    groups = build_param_groups(module.model)
    decay, no_decay = groups
    assert no_decay["weight_decay"] == 0.0 and "weight_decay" not in decay
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(module.model.parameters()))
    names_no_decay = set(no_decay["param_names"])
    assert {"embed.tokens.weight", "embed.text_pos.weight", "embed.patches.pos", "norm.weight",
            "blocks.0.attn_norm.weight"} <= names_no_decay
    assert "blocks.0.attn.qkv.weight" in decay["param_names"]
    assert "blocks.1.ffn.experts.w_gate" in decay["param_names"]
    assert [n for n in decay["param_names"] if "norm" in n or "embed.tokens" in n] == []


def test_warmup_cosine_shape() -> None:
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 100, 0.1) == pytest.approx(0.1)


def test_training_lowers_the_loss_and_logs_lr_schedule() -> None:
    torch.manual_seed(0)
    module = M6LitModule(tiny_config(), warmup_steps=2, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    trainer, rec = fit(module, 30, data_size=128)
    losses = [loss for _, loss in rec.rows]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert math.isfinite(float(trainer.callback_metrics["train/grad_norm"]))
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(3e-3 * warmup_cosine(30, 2, 30, 0.1))


def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    _, full = fit(_module(), 8, dirpath=tmp_path / "full")
    fit(_module(), 8, dirpath=tmp_path / "part", stop=3)
    _, resumed = fit(_module(), 8, dirpath=tmp_path / "resumed", ckpt_path=str(tmp_path / "part" / "last.ckpt"))
    assert resumed.rows == full.rows[3:]


class _Poison(L.Callback):
    def __init__(self, step: int, where: str) -> None:
        self.step, self.where = step, where

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.where == "input" and trainer.global_step == self.step:
            batch["pixel_values"].fill_(float("nan"))

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.where == "grad" and trainer.global_step == self.step:
            pl_module.model.blocks[2].attn.qkv.weight.grad.fill_(float("inf"))


@pytest.mark.parametrize("where,message", [("input", "non-finite training loss .* at global step 3"),
                                           ("grad", r"non-finite gradient \(first in model.blocks.2.attn.qkv.weight\)"
                                                    r" at global step 3")])
def test_non_finite_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path: Path, where: str,
                                                                            message: str) -> None:
    with pytest.raises(FloatingPointError, match=message):
        fit(_module(), 10, callbacks=[_Poison(3, where)], dirpath=tmp_path)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_config_dict_hparams_rebuild_from_checkpoint(tmp_path: Path) -> None:
    module = _module(num_unique_blocks=2)
    fit(module, 1, dirpath=tmp_path)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert isinstance(ckpt["hyper_parameters"]["config"], dict)
    loaded = M6LitModule.load_from_checkpoint(tmp_path / "last.ckpt", weights_only=True)
    assert len(loaded.model.blocks) == 2
    for (n1, p1), (n2, p2) in zip(module.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="warmup_steps=-1"):
        M6LitModule(tiny_config(), warmup_steps=-1)
    with pytest.raises(ValueError, match="min_lr_ratio=2"):
        M6LitModule(tiny_config(), min_lr_ratio=2)
    with pytest.raises(ValueError, match="unknown key"):
        M6LitModule({"d_model": 32, "colour": "red"})


def test_fully_skipped_batch_gives_a_graph_connected_zero_loss_on_several_devices() -> None:
    from types import SimpleNamespace

    module = M6LitModule(tiny_config())
    empty = {"input_ids": torch.zeros(0, 0, dtype=torch.long), "attention_mask": torch.zeros(0, 0, dtype=torch.bool),
             "labels": torch.zeros(0, 0, dtype=torch.long), "prefix_len": torch.zeros(0, dtype=torch.long)}
    assert module.training_step(empty, 0) is None  # one device: no optimizer step at all
    module._trainer = SimpleNamespace(world_size=2)
    loss = module.training_step(empty, 0)
    assert loss is not None and float(loss) == 0.0
    loss.backward()  # every trainable parameter joins the (DDP) gradient all-reduce, with a zero gradient
    assert all(p.grad is not None and not p.grad.any() for p in module.parameters() if p.requires_grad)
