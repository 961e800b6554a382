"""PseudoToReal: exact function at delink, optimizer surgery per policy, resume equivalence, progressive schedules,
DDP, bad configuration."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _fakes import fit, loader, tiny_config

from m6lit.callbacks import DelinkEvent, PseudoToReal
from m6lit.structure import rewrite_optimizer
from m6lit.model import delink, lm_loss
from m6lit.module import M6LitModule

STEPS = 8


def _module(**overrides) -> M6LitModule:
    torch.manual_seed(0)
    return M6LitModule(tiny_config(**overrides), warmup_steps=2)


def test_loss_identical_just_before_and_after_delink() -> None:
    p2r = PseudoToReal(delink_step=3)
    module = _module(num_unique_blocks=2)
    fit(module, 4, callbacks=[p2r])
    record = p2r.history[0]
    assert record["p2r/loss_before"] == record["p2r/loss_after"]
    added = sum(p.numel() for b in module.model.blocks[2:] for p in b.parameters())  # cycle: 2, 3 copy 0, 1
    assert record["p2r/unique_params_after"] == record["p2r/unique_params_before"] + added
    assert len(module.model.blocks) == 4
    assert module.hparams["config"]["num_unique_blocks"] == 4


@pytest.mark.parametrize("policy", ["copy", "rescale", "reset"])
def test_optimizer_holds_exactly_the_new_parameters_with_state_per_policy(policy: str) -> None:
    module = _module(num_unique_blocks=1, moe_layers="none")
    optimizer = torch.optim.AdamW(module.build_param_groups(), lr=1e-2)
    batch = next(iter(loader()))
    for _ in range(2):
        optimizer.zero_grad()
        out = module.model(batch)
        (lm_loss(out.logits, batch["labels"]) + out.aux_loss).backward()
        optimizer.step()
    shared = {name: p for name, p in module.model.named_parameters() if name.startswith("blocks.")}
    before = {name: {k: v.clone() for k, v in optimizer.state[p].items()} for name, p in shared.items()}

    param_map = delink(module.model)
    rewrite_optimizer(optimizer, module.build_param_groups(), param_map, policy)

    held = [p for g in optimizer.param_groups for p in g["params"]]
    assert [id(p) for p in held] == [id(p) for g in module.build_param_groups() for p in g["params"]]
    assert {id(p) for p in held} == {id(p) for p in module.model.parameters()}
    assert not ({id(p) for p in held} & {id(p) for p in shared.values()}), "stale shared parameters remain"
    assert all(old not in optimizer.state for old in shared.values())
    n = 4
    for link in param_map:
        old_state = before[link.source_names[0]]
        state = optimizer.state.get(link.new, {})
        if policy == "reset":
            assert state == {}
            continue
        assert torch.equal(state["step"], old_state["step"])
        div_m, div_v = (1.0, 1.0) if policy == "copy" else (n, n * n)
        torch.testing.assert_close(state["exp_avg"], old_state["exp_avg"] / div_m, rtol=0, atol=0)
        torch.testing.assert_close(state["exp_avg_sq"], old_state["exp_avg_sq"] / div_v, rtol=0, atol=0)
    names = [n for g in optimizer.param_groups for n in g["param_names"]]
    assert "model.blocks.3.attn.qkv.weight" in names

    snapshot = [[p.detach().clone() for p in blk.parameters()] for blk in module.model.blocks]
    optimizer.zero_grad()
    out = module.model(batch)
    lm_loss(out.logits, batch["labels"]).backward()
    for blk in list(module.model.blocks)[1:]:
        for p in blk.parameters():
            p.grad = None
    optimizer.step()
    moved = [any(not torch.equal(a, b) for a, b in zip(blk.parameters(), snap))
             for blk, snap in zip(module.model.blocks, snapshot)]
    assert moved == [True, False, False, False], "a step on one layer's block must leave the other layers alone"


def _uninterrupted(policy: str, tmp_path: Path) -> list[tuple[int, float]]:
    module = _module(num_unique_blocks=1, moe_layers="all")
    _, rec = fit(module, STEPS, callbacks=[PseudoToReal(delink_step=4, optimizer_state=policy, rewarmup_steps=2)],
                 dirpath=tmp_path / "full")
    return rec.rows


@pytest.mark.parametrize("stop", [3, 4, 5])
def test_resume_before_at_and_after_delink_reproduces_the_run(tmp_path: Path, stop: int) -> None:
    reference = _uninterrupted("rescale", tmp_path)
    first = _module(num_unique_blocks=1, moe_layers="all")
    fit(first, STEPS, callbacks=[PseudoToReal(delink_step=4, optimizer_state="rescale", rewarmup_steps=2)],
        dirpath=tmp_path / "part", stop=stop)
    ckpt = tmp_path / "part" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["config"]["num_unique_blocks"] == (
        4 if stop >= 4 else 1)
    resumed = _module(num_unique_blocks=1, moe_layers="all")
    p2r = PseudoToReal(delink_step=4, optimizer_state="rescale", rewarmup_steps=2)
    _, rec = fit(resumed, STEPS, callbacks=[p2r], ckpt_path=str(ckpt), dirpath=tmp_path / "resumed")
    assert rec.rows == reference[stop:]
    assert len(p2r.history) == (1 if stop < 4 else 0), "delink must happen exactly once across the resume"
    assert len(resumed.model.blocks) == 4


def test_progressive_schedule_keeps_the_function_at_each_step() -> None:
    p2r = PseudoToReal(schedule=[DelinkEvent(2, 2), DelinkEvent(4, 4)])
    module = _module(num_unique_blocks=1, moe_layers="none")
    fit(module, 5, callbacks=[p2r])
    assert [int(r["p2r/num_unique_blocks"]) for r in p2r.history] == [2, 4]
    assert all(r["p2r/loss_before"] == r["p2r/loss_after"] for r in p2r.history)
    assert len(module.model.blocks) == 4


def test_accumulation_changes_after_the_delink() -> None:
    p2r = PseudoToReal(delink_step=2, accumulate_grad_batches_after=1)
    module = _module(num_unique_blocks=2)
    trainer, rec = fit(module, 4, callbacks=[p2r], accumulate_grad_batches=2)
    assert trainer.accumulate_grad_batches == 1
    steps = [s for s, _ in rec.rows]
    assert steps == [0, 1, 1, 2, 3, 4], steps


def test_validate_works_on_checkpoints_before_and_after_delink(tmp_path: Path) -> None:
    import lightning as L

    module = _module(num_unique_blocks=1, moe_layers="all")
    fit(module, 4, callbacks=[PseudoToReal(delink_step=2)], dirpath=tmp_path)
    for name, blocks in (("step=1.ckpt", 1), ("step=3.ckpt", 4)):
        fresh = _module(num_unique_blocks=1, moe_layers="all")
        trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
        metrics = trainer.validate(fresh, loader(size=8), ckpt_path=str(tmp_path / name))
        assert len(fresh.model.blocks) == blocks
        saved = torch.load(tmp_path / name, weights_only=True)["state_dict"]
        assert saved.keys() == fresh.state_dict().keys()
        assert all(torch.equal(v, saved[k]) for k, v in fresh.state_dict().items())
        loaded = M6LitModule.load_from_checkpoint(tmp_path / name, weights_only=True)
        assert len(loaded.model.blocks) == blocks
        again = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).validate(
            loaded, loader(size=8))
        assert again[0]["val/loss"] == metrics[0]["val/loss"]  # both load paths hold the checkpoint's model


@pytest.mark.skipif(sys.platform != "linux", reason="gloo DDP on two local processes")
def test_ddp_two_ranks_stay_identical_after_delink(tmp_path: Path) -> None:
    script = Path(__file__).parent / "scripts" / "ddp_delink.py"
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent), str(here)]), "M6LIT_TEST_OUT": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sums = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert sums[0]["after_delink"] == sums[1]["after_delink"]
    assert sums[0]["final"] == sums[1]["final"]
    assert sums[0]["blocks"] == sums[1]["blocks"] == 4
    assert sums[0]["after_delink"] != sums[0]["final"], "training must continue after the delink"


def test_bad_configuration_errors() -> None:
    with pytest.raises(ValueError, match="exactly one of delink_step or schedule"):
        PseudoToReal(delink_step=2, schedule=[DelinkEvent(2, 4)])
    with pytest.raises(ValueError, match=r"schedule\[1\].*greater than the previous"):
        PseudoToReal(schedule=[DelinkEvent(5, 2), DelinkEvent(3, 4)])
    with pytest.raises(ValueError, match=r"schedule\[1\].*multiple"):
        PseudoToReal(schedule=[DelinkEvent(2, 2), DelinkEvent(3, 3)])
    with pytest.raises(ValueError, match="optimizer_state='moments'"):
        PseudoToReal(delink_step=2, optimizer_state="moments")
    with pytest.raises(ValueError, match=r"schedule\[0\].*divide num_layers=4"):
        fit(_module(num_unique_blocks=1, moe_layers="all"), 2, callbacks=[PseudoToReal(schedule=[DelinkEvent(1, 3)])])
    with pytest.raises(ValueError, match="already has 4 unique blocks"):
        fit(_module(num_unique_blocks=4), 2, callbacks=[PseudoToReal(delink_step=1)])
    with pytest.warns(UserWarning, match="delink step 5 > trainer.max_steps=3.*does not become real"):
        fit(_module(num_unique_blocks=2), 3, callbacks=[PseudoToReal(delink_step=5)])


def test_delink_at_max_steps_warns_truthfully_and_delinks() -> None:
    p2r = PseudoToReal(delink_step=3)
    module = _module(num_unique_blocks=2)
    with pytest.warns(UserWarning, match="delinked after the final step.*never trained as real"):
        fit(module, 3, callbacks=[p2r])
    assert len(module.model.blocks) == 4


def test_schedule_that_cannot_run_on_the_model_fails_at_fit_start_naming_the_key() -> None:
    # 3 shared blocks on 4 layers: delinking to 4 is impossible; the error must come before any step, not at step 20
    module = _module(num_unique_blocks=3, moe_layers="all")
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match=r"PseudoToReal.delink_step: cannot delink the model's 3 blocks.* into 4"):
        fit(module, 30, callbacks=[PseudoToReal(delink_step=20)])
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters())), "it trained before failing"
    with pytest.raises(ValueError, match=r"PseudoToReal.schedule\[0\]: cannot delink the model's 2 blocks.* into 3"):
        fit(_module(num_unique_blocks=2, num_layers=6, moe_layers="all"), 4,
            callbacks=[PseudoToReal(schedule=[DelinkEvent(1, 3), DelinkEvent(2, 6)])])


def test_inactive_without_delink_step_or_schedule_and_twice_is_an_error() -> None:
    idle = PseudoToReal()
    assert not idle.active
    module = _module(num_unique_blocks=2)
    fit(module, 2, callbacks=[idle])
    assert len(module.model.blocks) == 2
    # two schedules would fight over one model: Lightning refuses a second callback with the same state key
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `PseudoToReal`"):
        fit(_module(num_unique_blocks=2), 2, callbacks=[PseudoToReal(delink_step=1), PseudoToReal(delink_step=1)])
