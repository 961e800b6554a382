"""SelectiveOffloadStrategy through Lightning on the CPU path: bitwise-identical training with half the blocks
offloaded (gradient accumulation and clipping included), placement, logged transfer counters, checkpoint round trip
and exact resume, delink with offload, the budget plan, and clear errors for bad input."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from _fakes import LossRecorder, fit, loader, tiny_config
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import StrategyRegistry
from m6lit.callbacks import PseudoToReal

from m6lit.module import M6LitModule
from m6lit.strategies import SelectiveOffloadStrategy
from m6lit.strategies.planner import plan_offload

HALF = ["model.blocks.[1-2]"]


def _module(**overrides) -> M6LitModule:
    torch.manual_seed(0)
    return M6LitModule(tiny_config(**overrides), warmup_steps=2,
                       optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2, fused=True))


def _state(module: M6LitModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Placement(L.Callback):
    """At every batch end: nothing streamed is live, offloaded parameters sit in their unit's host master."""

    def __init__(self) -> None:
        self.checks: list[bool] = []
        self.streamed: set[str] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        streamer = trainer.strategy.streamer
        ok = streamer.live_device_bytes() == 0
        for name, p in pl_module.named_parameters():
            if streamer.is_streamed(p):
                self.streamed.add(name)
                master = next(g.master for g in streamer.unit_of(p).groups if any(q is p for q in g.params))
                start = master.data_ptr()
                ok &= start <= p.data_ptr() < start + master.numel() * master.element_size()
        self.checks.append(ok)


class _Memory(Logger):
    """A logger that keeps what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append(dict(metrics))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def test_half_offloaded_training_is_bitwise_identical_to_resident() -> None:
    reference = _module()
    _, ref = fit(reference, 6, gradient_clip_val=0.5, accumulate_grad_batches=2)
    module = _module()
    strategy = SelectiveOffloadStrategy(offload=HALF)
    placement, logger, rec = _Placement(), _Memory(), LossRecorder()
    trainer = L.Trainer(max_steps=6, callbacks=[rec, placement], logger=logger, log_every_n_steps=1,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        deterministic=True, accelerator="cpu", devices=1, strategy=strategy, gradient_clip_val=0.5,
                        accumulate_grad_batches=2)
    trainer.fit(module, loader())
    assert rec.rows == ref.rows
    assert _equal(_state(module), _state(reference))
    assert placement.checks and all(placement.checks)
    assert placement.streamed == {n for n, _ in module.named_parameters() if n.startswith(("model.blocks.1.",
                                                                                            "model.blocks.2."))}
    logged = [row for row in logger.rows if "offload/h2d_bytes" in row]
    assert logged and all(row["offload/h2d_bytes"] > 0 and row["offload/d2h_bytes"] > 0 for row in logged)
    assert len(strategy.step_stats) == 6 and {"stall_s", "optimizer_s"} <= strategy.step_stats[-1].keys()


def test_checkpoint_round_trip_and_exact_resume(tmp_path: Path) -> None:
    _, full = fit(_module(), 6, strategy=SelectiveOffloadStrategy(offload=HALF), dirpath=tmp_path / "full")
    fit(_module(), 6, strategy=SelectiveOffloadStrategy(offload=HALF), dirpath=tmp_path / "part", stop=3)
    ckpt = tmp_path / "part" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert all(v.dtype == torch.float32 for k, v in saved["state_dict"].items() if k.startswith("model.blocks.1."))
    resumed = _module()
    _, rec = fit(resumed, 6, strategy=SelectiveOffloadStrategy(offload=HALF), ckpt_path=str(ckpt),
                 dirpath=tmp_path / "resumed")
    assert rec.rows == full.rows[3:], "resuming with offload continues exactly"
    plain = M6LitModule.load_from_checkpoint(tmp_path / "full" / "last.ckpt", weights_only=True)
    assert _equal(_state(plain), _state(resumed)), "an offload checkpoint loads into a resident module"


def test_delink_with_offload_places_new_blocks_and_continues_exactly() -> None:
    reference = _module(num_unique_blocks=1, moe_layers="all")
    _, ref = fit(reference, 6, callbacks=[PseudoToReal(delink_step=3, optimizer_state="copy")])
    module = _module(num_unique_blocks=1, moe_layers="all")
    strategy = SelectiveOffloadStrategy(offload=["model.blocks.[2-3]"])  # blocks that exist only after the delink
    placement = _Placement()
    _, rec = fit(module, 6, strategy=strategy, callbacks=[PseudoToReal(delink_step=3, optimizer_state="copy"),
                                                          placement])
    assert rec.rows == ref.rows
    assert _equal(_state(module), _state(reference))
    assert strategy.plan is not None and strategy.plan.offload == ["model.blocks.2", "model.blocks.3"]
    assert {n.split(".")[2] for n in placement.streamed} == {"2", "3"} and all(placement.checks)


def test_budget_plan_streams_the_middle_and_trains() -> None:
    module = _module(num_layers=6, num_unique_blocks=6)
    everything = plan_offload(module, offload=[], precision="32-true", micro_batch_tokens=48).estimate.gpu_total
    strategy = SelectiveOffloadStrategy(gpu_memory_budget=int(everything) - 1, micro_batch_tokens=48)
    _, rec = fit(module, 2, strategy=strategy)
    assert strategy.plan is not None and strategy.plan.offload
    assert "model.blocks.0" not in strategy.plan.offload and "model.blocks.5" not in strategy.plan.offload
    assert len(rec.rows) == 2 and all(torch.isfinite(torch.tensor(loss)) for _, loss in rec.rows)


def test_short_name_is_registered() -> None:
    assert "m6_offload" in StrategyRegistry
    trainer = L.Trainer(strategy="m6_offload", accelerator="cpu", devices=1, logger=False)
    assert isinstance(trainer.strategy, SelectiveOffloadStrategy)
    assert trainer.strategy.root_device == torch.device("cpu")


@pytest.mark.parametrize("kwargs,match", [
    ({"offload": ["model.blokcs.[1-2]"]}, r"matches no module\. Closest names: \['model\.blocks"),
    ({"gpu_memory_budget": "1GB"}, "too small even for the resident minimum"),
    ({"offload": HALF, "host_memory_budget": "1KB"}, "host_memory_budget=1.00 KB is exceeded"),
])
def test_bad_input_fails_at_setup_with_a_clear_message(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fit(_module(), 1, strategy=SelectiveOffloadStrategy(**kwargs))


def test_bad_arguments_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="either offload patterns or gpu_memory_budget"):
        SelectiveOffloadStrategy(offload=HALF, gpu_memory_budget="80GB")
    with pytest.raises(TypeError, match="list of patterns"):
        SelectiveOffloadStrategy(offload="model.blocks.1")
    with pytest.raises(ValueError, match="not a memory size"):
        SelectiveOffloadStrategy(gpu_memory_budget="eighty gigs")
    with pytest.raises(ValueError, match="'32-true' and 'bf16-mixed'"):
        fit(_module(), 1, strategy=SelectiveOffloadStrategy(offload=HALF), precision="bf16-true")


class _RecomputeProbe(L.Callback):
    """Once the streaming hooks are installed (and again for blocks a delink makes), records for every block call its
    logical layer, the checkpoint phase, and whether each streamed parameter then sits in live compute storage rather
    than in its host master."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str | None, bool, bool]] = []
        self.hooked: set[int] = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        from m6lit.model.block import checkpoint_phase

        streamer = trainer.strategy.streamer

        def in_master(p: torch.Tensor) -> bool:
            return any(g.master.data_ptr() <= p.data_ptr() < g.master.data_ptr() + g.master.nbytes
                       for g in streamer.unit_of(p).groups)

        def record(block, args) -> None:
            streamed = [p for p in block.parameters() if streamer.is_streamed(p)]
            live = all(p.untyped_storage().nbytes() > 0 and not in_master(p) for p in streamed)
            self.calls.append((int(args[4]), checkpoint_phase(), bool(streamed), live))

        for block in pl_module.model.blocks:
            if id(block) not in self.hooked:
                self.hooked.add(id(block))
                block.register_forward_pre_hook(record)


@pytest.mark.parametrize("overrides,offload,spec,delink", [
    pytest.param({}, HALF, "all", False, id="dense-and-moe"),
    pytest.param({"num_unique_blocks": 2}, ["model.blocks.1"], [0, 1, 3], False, id="shared"),
    pytest.param({"num_unique_blocks": 1, "moe_layers": "all"}, ["model.blocks.[2-3]"], "all", True, id="delink"),
])
def test_activation_checkpointing_with_offloaded_blocks_is_bitwise_identical(overrides: dict, offload: list[str],
                                                                             spec, delink: bool) -> None:
    """Checkpointed offloaded blocks re-run in backward with their weights re-fetched into compute storage (not read
    from the host master), and training equals resident training without checkpointing bit for bit (the same kernels
    on the same values in the same order), gradient accumulation and clipping included; with a delink at step 2
    the new offloaded blocks are checkpointed too."""
    def callbacks() -> list:
        return [PseudoToReal(delink_step=2, optimizer_state="copy")] if delink else []

    reference = _module(**overrides)
    _, ref = fit(reference, 4, callbacks=callbacks(), gradient_clip_val=0.5, accumulate_grad_batches=2)
    module = _module(activation_checkpointing=spec, **overrides)
    probe, placement = _RecomputeProbe(), _Placement()
    _, rec = fit(module, 4, strategy=SelectiveOffloadStrategy(offload=offload),
                 callbacks=[*callbacks(), probe, placement], gradient_clip_val=0.5, accumulate_grad_batches=2)
    assert rec.rows == ref.rows
    assert _equal(_state(module), _state(reference))
    assert placement.checks and all(placement.checks), "nothing stays live after the step"
    layers = [0, 1, 2, 3] if spec == "all" else spec
    per_pass = sorted(layer for layer, phase, _, _ in probe.calls if phase == "recompute")
    assert per_pass == sorted(layers * 8), "every listed layer re-runs once per micro-batch (8 of them)"
    streamed_recomputes = [(layer, live) for layer, phase, streamed, live in probe.calls
                           if phase == "recompute" and streamed]
    assert streamed_recomputes and all(live for _, live in streamed_recomputes)
    assert all(live for _, _, _, live in probe.calls)


def test_exact_resume_with_activation_checkpointing_and_offload(tmp_path: Path) -> None:
    def run(name: str, **kwargs) -> list:
        strategy = SelectiveOffloadStrategy(offload=HALF)
        return fit(_module(activation_checkpointing=[1, 2]), 6, strategy=strategy, dirpath=tmp_path / name,
                   **kwargs)[1].rows

    full = run("full")
    run("part", stop=3)
    resumed = run("resumed", ckpt_path=str(tmp_path / "part" / "last.ckpt"))
    assert resumed == full[3:]
    _, plain = fit(_module(), 6)
    assert plain.rows == full, "checkpointing changes no number"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_checkpointed_offloaded_blocks_refetch_and_match_bf16() -> None:
    """On the GPU under bf16-mixed: the recompute of a checkpointed offloaded block runs on weights fetched back to
    the GPU (a block still on the host would fail with a device mismatch), and training matches the same run
    without checkpointing (the first step bitwise, then within bf16 tolerance)."""
    def run(spec, callbacks=()) -> tuple[list[float], M6LitModule]:
        module = _module(activation_checkpointing=spec, moe_layers="none", d_model=64, d_ff=128)
        recorder = LossRecorder()
        trainer = L.Trainer(max_steps=4, accelerator="gpu", devices=1, precision="bf16-mixed", logger=False,
                            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                            strategy=SelectiveOffloadStrategy(offload=HALF), callbacks=[recorder, *callbacks],
                            gradient_clip_val=0.5)
        trainer.fit(module, loader())
        return [loss for _, loss in recorder.rows], module

    plain, _ = run(None)
    probe = _RecomputeProbe()
    checked, _ = run("all", [probe])
    assert checked[0] == plain[0]
    torch.testing.assert_close(torch.tensor(checked), torch.tensor(plain), rtol=2e-3, atol=2e-3)
    recomputed = [(layer, live) for layer, phase, streamed, live in probe.calls if phase == "recompute" and streamed]
    assert sorted({layer for layer, _ in recomputed}) == [1, 2] and all(live for _, live in recomputed)
