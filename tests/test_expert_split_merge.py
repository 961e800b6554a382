"""ExpertSplitMerge: optimizer surgery per state rule, function kept by segment, resume equivalence across the op,
composition with PseudoToReal at the same step, checkpoints that rebuild the expert shapes, bad configuration."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from _fakes import fit, loader, tiny_config
from m6lit.callbacks import ExpertSplitMerge, PseudoToReal

from m6lit.module import M6LitModule

STEPS = 6
OP_STEP = 3


def _module(**overrides) -> M6LitModule:
    torch.manual_seed(0)
    base = {"moe_layers": "all", "num_unique_blocks": 2, "num_experts": 4, "top_k": 2, "expert_d_ff": 32}
    base.update(overrides)
    return M6LitModule(tiny_config(**base), warmup_steps=2)


class _StateProbe(L.Callback):
    """Snapshots the optimizer state of the MoE parameters at the op step (place it before ExpertSplitMerge)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.before: dict[str, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.before:
            optimizer = trainer.optimizers[0]
            for group in optimizer.param_groups:
                for name, p in zip(group["param_names"], group["params"]):
                    if ".ffn." in name:
                        self.before[name] = {k: v.clone() for k, v in optimizer.state[p].items()}


def _expected(op: str, name: str, old: torch.Tensor) -> tuple[torch.Tensor, float]:
    """State tensor of block parameter `name` after `op` ×2 on a topk layer of 4 experts, by hand; and its fan_out."""
    if op == "split":  # copy c of expert e is expert c·4 + e
        return torch.cat([old, old]), 2.0
    if op == "merge":  # merged e' = average of e' and e' + 2
        return 0.5 * (old[:2] + old[2:]), 0.5
    # segment: piece i of expert e is expert 2e + i, hidden units [16 i, 16 i + 16)
    if name.endswith("router.weight"):
        return old.repeat_interleave(2, dim=0), 2.0
    if name.endswith("w_down"):
        return torch.stack([old[e][:, 16 * i:16 * (i + 1)] for e in range(4) for i in range(2)]), 2.0
    return torch.stack([old[e][16 * i:16 * (i + 1)] for e in range(4) for i in range(2)]), 1.0


@pytest.mark.parametrize("op,policy", [("split", "copy"), ("segment", "copy"), ("merge", "copy"),
                                       ("split", "rescale"), ("merge", "rescale"), ("segment", "reset")])
def test_optimizer_holds_exactly_the_new_parameters_with_state_per_rule(op: str, policy: str) -> None:
    probe = _StateProbe(OP_STEP)
    esm = ExpertSplitMerge([{"step": OP_STEP, "op": op, "factor": 2, "weights": "uniform"}], optimizer_state=policy)
    module = _module(top_k=1 if op == "merge" else 2)
    trainer, _ = fit(module, OP_STEP, callbacks=[probe, esm])

    optimizer = trainer.optimizers[0]
    held = [p for g in optimizer.param_groups for p in g["params"]]
    assert [id(p) for p in held] == [id(p) for g in module.build_param_groups() for p in g["params"]]
    assert set(map(id, held)) == set(map(id, module.parameters()))
    # reset: the changed (MoE) parameters start without state, the others keep theirs
    assert len(optimizer.state) == len(held) - (len(probe.before) if policy == "reset" else 0)
    names = {n: p for g in optimizer.param_groups for n, p in zip(g["param_names"], g["params"])}
    assert set(names) == set(probe.before) | {n for n in names if ".ffn." not in n}
    for name, old_state in probe.before.items():
        state = optimizer.state.get(names[name], {})
        if policy == "reset":
            assert state == {}, name
            continue
        assert torch.equal(state["step"], old_state["step"])
        for key, power in (("exp_avg", 1), ("exp_avg_sq", 2)):
            want, fan_out = _expected(op, name, old_state[key])
            if policy == "rescale":
                want = want / fan_out ** power
            torch.testing.assert_close(state[key], want, rtol=1e-6, atol=0, msg=f"{name} {key}")


def test_segment_keeps_the_loss_and_records_the_shape_in_hparams() -> None:
    esm = ExpertSplitMerge([{"step": 2, "op": "segment", "factor": 2, "layers": [1]}])
    module = _module()
    fit(module, 3, callbacks=[esm])
    (record,) = esm.history
    assert record["experts/loss_after"] == pytest.approx(record["experts/loss_before"], rel=1e-6)
    # experts keep their size (8 pieces of half the hidden units); the router gains 4 rows of d_model=32
    assert record["experts/unique_params_after"] == record["experts/unique_params_before"] + 4 * 32
    assert record["blocks"] == [1]  # layers 1 and 3 share block 1
    assert module.hparams["config"]["expert_overrides"] == [
        {"block": 1, "num_experts": 8, "top_k": 4, "expert_d_ff": 16, "segments": 2}]
    assert module.model.blocks[1].ffn.num_experts == 8 and module.model.blocks[0].ffn.num_experts == 4


def test_split_then_load_weighted_merge_round_trip_in_one_fit() -> None:
    esm = ExpertSplitMerge([{"step": 2, "op": "split", "factor": 2},
                            {"step": 4, "op": "merge", "factor": 2}], merge_weights="load")
    module = _module(top_k=1)
    _, rec = fit(module, 5, callbacks=[esm])
    assert [r["op"] for r in esm.history] == ["split", "merge"]
    assert [r["experts/num_experts"] for r in esm.history] == [8.0, 4.0]
    assert module.hparams["config"]["expert_overrides"] is None
    split, merge = esm.history
    assert merge["shapes_after"] == split["shapes_before"]  # the round trip restores every block's shape
    assert merge["experts/unique_params_after"] == split["experts/unique_params_before"]
    assert [s for s, _ in rec.rows] == [1, 2, 3, 4, 5]  # training went on through both ops


CALLBACKS = {
    "split": lambda: [ExpertSplitMerge([{"step": OP_STEP, "op": "split", "factor": 2}], noise=0.05, seed=3)],
    "p2r+split": lambda: [PseudoToReal(delink_step=OP_STEP),
                          ExpertSplitMerge([{"step": OP_STEP, "op": "split", "factor": 2}], noise=0.05, seed=3)],
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple[int, float]]]:
    runs = {}
    for name, make in CALLBACKS.items():
        _, rec = fit(_module(), STEPS, callbacks=make())
        runs[name] = rec.rows
    return runs


@pytest.mark.parametrize("name,stop", [("split", 2), ("split", 4), ("p2r+split", 3)])
def test_resume_before_and_after_the_op_reproduces_the_run(tmp_path: Path, uninterrupted, name: str,
                                                           stop: int) -> None:
    fit(_module(), STEPS, callbacks=CALLBACKS[name](), dirpath=tmp_path / "part", stop=stop)
    ckpt = tmp_path / "part" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)["hyper_parameters"]["config"]
    assert (saved["expert_overrides"] is not None) == (stop >= OP_STEP)
    resumed = _module()
    callbacks = CALLBACKS[name]()
    _, rec = fit(resumed, STEPS, callbacks=callbacks, ckpt_path=str(ckpt))
    assert rec.rows == uninterrupted[name][stop:]
    esm = callbacks[-1]
    assert len(esm.history) == (1 if stop < OP_STEP else 0), "the op must happen exactly once across the resume"
    assert [b.ffn.num_experts for b in resumed.model.blocks] == [8] * len(resumed.model.blocks)


@pytest.mark.parametrize("order", ["p2r first", "split first"])
def test_composes_with_pseudo_to_real_at_the_same_step(order: str) -> None:
    p2r = PseudoToReal(delink_step=2)
    esm = ExpertSplitMerge([{"step": 2, "op": "segment", "factor": 2, "layers": [0]}])
    module = _module()
    trainer, _ = fit(module, 3, callbacks=[p2r, esm] if order == "p2r first" else [esm, p2r])
    experts = [b.ffn.num_experts for b in module.model.blocks]
    # p2r first: layer 0 has its own block when segmented; split first: block 0 (layers 0, 2) is segmented, then
    # delink gives its clone for layer 2 the same shape
    assert experts == ([8, 4, 4, 4] if order == "p2r first" else [8, 4, 8, 4])
    assert p2r.history[0]["p2r/loss_before"] == p2r.history[0]["p2r/loss_after"]
    assert esm.history[0]["experts/loss_after"] == pytest.approx(esm.history[0]["experts/loss_before"], rel=1e-6)
    held = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert held == {id(p) for p in module.parameters()}
    overrides = module.hparams["config"]["expert_overrides"]
    assert [o["block"] for o in overrides] == [b for b, e in enumerate(experts) if e == 8]


def test_checkpoints_after_the_op_validate_and_load(tmp_path: Path) -> None:
    module = _module()
    fit(module, 3, callbacks=[ExpertSplitMerge([{"step": 2, "op": "split", "factor": 2, "layers": [0, 2]}])],
        dirpath=tmp_path)
    for name, experts in (("step=1.ckpt", [4, 4]), ("step=3.ckpt", [8, 4])):
        fresh = _module()
        trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
        metrics = trainer.validate(fresh, loader(size=8), ckpt_path=str(tmp_path / name))
        assert [b.ffn.num_experts for b in fresh.model.blocks] == experts
        saved = torch.load(tmp_path / name, weights_only=True)["state_dict"]
        assert saved.keys() == fresh.state_dict().keys()
        assert all(torch.equal(v, saved[k]) for k, v in fresh.state_dict().items())
        loaded = M6LitModule.load_from_checkpoint(tmp_path / name, weights_only=True)
        assert [b.ffn.num_experts for b in loaded.model.blocks] == experts
        again = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).validate(
            loaded, loader(size=8))
        assert again[0]["val/loss"] == metrics[0]["val/loss"]  # both load paths hold the checkpoint's model


def test_bad_configuration_errors() -> None:
    with pytest.raises(ValueError, match=r"schedule\[0\]: factor=1 must be an integer >= 2"):
        ExpertSplitMerge([{"step": 2, "op": "split", "factor": 1}])
    with pytest.raises(ValueError, match=r"schedule\[1\]: step=2 comes before the previous entry's step=5"):
        ExpertSplitMerge([{"step": 5, "op": "split", "factor": 2}, {"step": 2, "op": "merge", "factor": 2}])
    with pytest.raises(ValueError, match=r"schedule\[0\]: op='grow' must be one of"):
        ExpertSplitMerge([{"step": 2, "op": "grow", "factor": 2}])
    with pytest.raises(ValueError, match=r"schedule\[0\]: unknown key\(s\) \['layer'\]"):
        ExpertSplitMerge([{"step": 2, "op": "split", "factor": 2, "layer": [1]}])
    with pytest.raises(ValueError, match=r"schedule\[0\]: missing key\(s\) \['factor'\]"):
        ExpertSplitMerge([{"step": 2, "op": "split"}])
    with pytest.raises(ValueError, match="optimizer_state='moments'"):
        ExpertSplitMerge([{"step": 2, "op": "split", "factor": 2}], optimizer_state="moments")
    with pytest.raises(ValueError, match="schedule is empty"):
        ExpertSplitMerge([])
    dense_first = {"moe_layers": 2, "num_unique_blocks": 4}
    with pytest.raises(ValueError, match=r"schedule\[0\]: layer 0 is not an MoE layer"):
        fit(_module(**dense_first), 1, callbacks=[ExpertSplitMerge([{"step": 1, "op": "split", "factor": 2,
                                                                     "layers": [0]}])])
    with pytest.raises(ValueError, match=r"schedule\[0\]: layer 1: top_k=2 × factor=4 exceeds num_experts=4; the "
                                         r"merged layer"):
        fit(_module(**dense_first), 1, callbacks=[ExpertSplitMerge([{"step": 1, "op": "merge", "factor": 4}])])
    with pytest.raises(ValueError, match=r"schedule\[1\]: layer 1: top_k=4 × factor=4 exceeds num_experts=8"):
        fit(_module(**dense_first), 1, callbacks=[ExpertSplitMerge([  # the dry run follows the shapes
            {"step": 1, "op": "segment", "factor": 2}, {"step": 2, "op": "merge", "factor": 4, "how": "average"}])])
    with pytest.raises(ValueError, match=r"schedule\[0\]: layer 1: expert_d_ff=32 is not divisible by factor=3"):
        fit(_module(**dense_first), 1, callbacks=[ExpertSplitMerge([{"step": 1, "op": "segment", "factor": 3}])])
    with pytest.warns(UserWarning, match="last scheduled step 5 >= trainer.max_steps=2; no training step follows"):
        fit(_module(), 2, callbacks=[ExpertSplitMerge([{"step": 5, "op": "split", "factor": 2}])])
