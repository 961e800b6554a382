"""HostEngine through SelectiveOffloadStrategy on the CPU path: every overlap mode trains bitwise like resident
training with clipping that triggers, the engine's schedule (inline, threaded, threaded with random delays) changes
no bit, `total_grad_norm()` is `get_total_norm`'s number, and the engine's own queue keeps order and re-raises
errors."""

from __future__ import annotations

import threading

import lightning as L
import pytest
import torch
from _fakes import fit, tiny_config

from m6lit.module import M6LitModule
from m6lit.strategies import SelectiveOffloadStrategy
from m6lit.strategies.host_engine import PHASES, HostEngine
from m6lit.strategies.offload import gpu_wait, window_trials

HALF = ["model.blocks.[1-2]"]
CLIP = 0.5  # the tiny model's gradient norm is ~1.6: every step clips


def _module(optimizer=None, **overrides) -> M6LitModule:
    torch.manual_seed(0)
    return M6LitModule(tiny_config(**overrides), warmup_steps=2,
                       optimizer=optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-2, fused=True)))


def _state(module: M6LitModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _optimizer_state(trainer: L.Trainer) -> list[torch.Tensor]:
    opt = trainer.optimizers[0]
    return [t.clone() for group in opt.param_groups for p in group["params"]
            for t in opt.state[p].values()] if opt.state else []


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _offloaded(steps: int = 4, delay: float = 0.0, **kwargs):
    strategy = SelectiveOffloadStrategy(offload=HALF, **{k: v for k, v in kwargs.items()
                                                         if k in ("optimizer_overlap", "engine")})
    strategy.engine_max_delay_s = delay
    module = _module()
    trainer, rec = fit(module, steps, strategy=strategy, gradient_clip_val=CLIP,
                       **{k: v for k, v in kwargs.items() if k == "accumulate_grad_batches"})
    return module, trainer, rec, strategy


@pytest.mark.parametrize("mode,accumulate", [("exact", 1), ("exact", 2), ("backward", 1)])
def test_every_mode_with_clipping_is_bitwise_identical_to_resident(mode: str, accumulate: int) -> None:
    reference = _module()
    ref_trainer, ref = fit(reference, 4, gradient_clip_val=CLIP, accumulate_grad_batches=accumulate)
    module, trainer, rec, strategy = _offloaded(optimizer_overlap=mode, accumulate_grad_batches=accumulate)
    coefs = [row["clip_coef"] for row in strategy.step_stats[1:]]
    assert coefs and all(c < 1.0 for c in coefs), f"clipping must trigger in this test: {coefs}"
    assert rec.rows == ref.rows
    assert _same(_state(module), _state(reference))
    assert _same(_optimizer_state(trainer), _optimizer_state(ref_trainer)), "Adam state lives in the user's optimizer"
    if mode == "backward":
        assert strategy.redo_units == strategy.speculated_units > 0, "every clipped unit is redone"


class _StaleForward(L.Callback):
    """The delayed update's reference on a resident model: from step `warmup` + 1 on, the offloaded parameters'
    forward and backward use the values they had before the previous optimizer step, and the step (with that
    gradient, clipped as usual) then updates their current values; the other parameters train exactly."""

    def __init__(self, prefixes: tuple[str, ...], warmup: int) -> None:
        self.prefixes, self.warmup = prefixes, warmup
        self.prev: list[torch.Tensor] | None = None
        self.cur: list[torch.Tensor] = []

    def _params(self, module) -> list[torch.Tensor]:
        return [p for n, p in module.named_parameters() if n.startswith(self.prefixes)]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        params = self._params(pl_module)
        self.cur = [p.detach().clone() for p in params]
        if self.prev is not None and trainer.global_step >= self.warmup + 1:
            with torch.no_grad():
                for p, value in zip(params, self.prev):
                    p.copy_(value)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        with torch.no_grad():
            for p, value in zip(self._params(pl_module), self.cur):
                p.copy_(value)
        self.prev = self.cur


def test_delayed_mode_equals_a_reference_that_applies_the_previous_steps_gradient() -> None:
    warmup, steps = 1, 5
    reference = _module()
    fit(reference, steps, gradient_clip_val=CLIP, callbacks=[_StaleForward(("model.blocks.1.", "model.blocks.2."),
                                                                            warmup)])
    exact = _module()
    fit(exact, steps, gradient_clip_val=CLIP)
    strategy = SelectiveOffloadStrategy(offload=HALF, optimizer_overlap="delayed", delay_warmup_steps=warmup)
    strategy.engine_max_delay_s = 0.002
    module = _module()
    fit(module, steps, strategy=strategy, gradient_clip_val=CLIP)
    assert strategy.delayed_steps == steps - warmup and strategy.step_stats[-1]["delayed"] == steps - warmup
    assert _same(_state(module), _state(reference))
    assert not _same(_state(module), _state(exact)), "the delayed update is not the exact one"


@pytest.mark.parametrize("window,units", [(500_000, 1), ("10MB", 2)])
def test_gpu_step_window_is_bitwise_identical_to_resident(window, units: int) -> None:
    reference = _module()
    ref_trainer, ref = fit(reference, 4, gradient_clip_val=CLIP)
    strategy = SelectiveOffloadStrategy(offload=HALF, gpu_step_window=window)
    module = _module()
    trainer, rec = fit(module, 4, strategy=strategy, gradient_clip_val=CLIP)
    assert strategy.window_units == units and strategy.step_stats[-1]["window_units"] == units
    assert strategy.step_stats[-1]["engine_tasks"] == 2 - units, "the other units still step on the engine"
    assert rec.rows == ref.rows
    assert _same(_state(module), _state(reference))
    assert _same(_optimizer_state(trainer), _optimizer_state(ref_trainer))


def test_auto_window_tries_each_size_keeps_the_best_and_stays_bitwise_identical_to_resident() -> None:
    steps = 2 * len(window_trials(2)) + 3
    reference = _module()
    ref_trainer, ref = fit(reference, steps, gradient_clip_val=CLIP)
    strategy = SelectiveOffloadStrategy(offload=HALF, gpu_step_window="auto")
    strategy.window_score = lambda row: abs(row["window_units"] - 1)  # the middle size wins: grow, then shrink
    module = _module()
    trainer, rec = fit(module, steps, strategy=strategy, gradient_clip_val=CLIP)
    assert [row["window_units"] for row in strategy.step_stats] == [0, 0, 1, 1, 2, 2, 1, 1, 1]
    assert strategy.window_scores == {0: 1, 1: 0, 2: 1} and strategy.window_units == 1
    assert rec.rows == ref.rows
    assert _same(_state(module), _state(reference))
    assert _same(_optimizer_state(trainer), _optimizer_state(ref_trainer))


def test_window_trials_and_the_wait_they_are_scored_by() -> None:
    assert window_trials(16) == [0, 4, 8, 12, 16]
    assert window_trials(2) == [0, 1, 2] and window_trials(1) == [0, 1] and window_trials(0) == [0]
    assert gpu_wait({"engine_wait_s": 0.25, "stall_s": 0.5, "h2d_bytes": 9.0}) == 0.75


def test_engine_profile_accounts_its_busy_time_by_kernel_phase() -> None:
    _, _, _, strategy = _offloaded(optimizer_overlap="exact")
    rows = strategy.step_stats[1:]
    phases = [f"engine_{p}_s" for p in PHASES]
    assert all(set(phases) <= row.keys() for row in rows)
    assert sum(row["engine_adam_s"] for row in rows) > 0 and sum(row["engine_clip_s"] for row in rows) > 0
    assert sum(row["engine_backup_s"] + row["engine_restore_s"] for row in rows) == 0, "exact mode keeps no backup"
    total_phases = sum(row[p] for row in rows for p in phases)
    assert total_phases <= sum(row["engine_busy_s"] for row in strategy.step_stats) + 1e-6


def test_backward_mode_without_clipping_keeps_its_speculative_steps() -> None:
    reference = _module()
    fit(reference, 3)
    strategy = SelectiveOffloadStrategy(offload=HALF, optimizer_overlap="backward")
    module = _module()
    fit(module, 3, strategy=strategy)
    assert strategy.speculated_units > 0 and strategy.redo_units == 0
    assert _same(_state(module), _state(reference))


def test_inline_threaded_and_randomly_delayed_engines_give_identical_bits() -> None:
    runs = [_offloaded(engine="inline"), _offloaded(engine="thread"), _offloaded(engine="thread", delay=0.003)]
    states = [_state(m) for m, _, _, _ in runs]
    opt_states = [_optimizer_state(t) for _, t, _, _ in runs]
    assert runs[0][2].rows == runs[1][2].rows == runs[2][2].rows
    assert _same(states[0], states[1]) and _same(states[0], states[2])
    assert _same(opt_states[0], opt_states[1]) and _same(opt_states[0], opt_states[2])
    assert runs[1][3].step_stats[-1]["engine_tasks"] > 0


class _NormProbe(L.Callback):
    """Before each optimizer step: the strategy's norm and `get_total_norm` over the same fp32 gradients (host
    landing buffers for offloaded parameters, `.grad` for resident ones), in the optimizer's order."""

    def __init__(self) -> None:
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        strategy = trainer.strategy
        grads = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                slot = strategy.streamer._slot.get(id(p))
                if slot is None:
                    if p.grad is not None:
                        grads.append(p.grad)
                    continue
                _, g, i = slot
                if g.got_grad[i]:
                    flat = g.grad32 if g.grad32 is not None else g.staging.float()
                    grads.append(g.views(flat)[i].clone())
        self.pairs.append((strategy.total_grad_norm().clone(), torch.nn.utils.get_total_norm(grads)))


def test_total_grad_norm_equals_get_total_norm() -> None:
    probe = _NormProbe()
    fit(_module(), 3, strategy=SelectiveOffloadStrategy(offload=HALF), callbacks=[probe], gradient_clip_val=CLIP)
    assert len(probe.pairs) == 3
    for ours, reference in probe.pairs:
        assert torch.equal(ours, reference), (ours, reference)


def test_nonfinite_gradient_names_an_offloaded_parameter() -> None:
    class Poison(L.Callback):
        def on_after_backward(self, trainer, pl_module) -> None:
            _, g, i = trainer.strategy.streamer._slot[id(pl_module.model.blocks[1].attn.qkv.weight)]
            g.norms[i] = torch.tensor(float("nan"))
            trainer.strategy._norm_cache = None

    with pytest.raises(FloatingPointError, match=r"first in model\.blocks\.1\.attn\.qkv\.weight"):
        fit(_module(), 2, strategy=SelectiveOffloadStrategy(offload=HALF), callbacks=[Poison()])


def test_bad_modes_and_optimizers_are_refused() -> None:
    with pytest.raises(ValueError, match="optimizer_overlap='sometimes'"):
        SelectiveOffloadStrategy(offload=HALF, optimizer_overlap="sometimes")
    with pytest.raises(ValueError, match="engine='process'"):
        SelectiveOffloadStrategy(offload=HALF, engine="process")
    for mode in ("backward", "delayed"):
        with pytest.raises(ValueError, match=f"optimizer_overlap='{mode}' needs accumulate_grad_batches=1"):
            fit(_module(), 1, strategy=SelectiveOffloadStrategy(offload=HALF, optimizer_overlap=mode),
                accumulate_grad_batches=2)
    with pytest.raises(ValueError, match="gpu_step_window=.* works with optimizer_overlap='exact' only"):
        SelectiveOffloadStrategy(offload=HALF, optimizer_overlap="backward", gpu_step_window="1GB")
    with pytest.raises(ValueError, match="gpu_step_window needs accumulate_grad_batches=1"):
        fit(_module(), 1, strategy=SelectiveOffloadStrategy(offload=HALF, gpu_step_window="1GB"),
            accumulate_grad_batches=2)
    with pytest.raises(ValueError, match="delay_warmup_steps=-1"):
        SelectiveOffloadStrategy(offload=HALF, optimizer_overlap="delayed", delay_warmup_steps=-1)
    with pytest.raises(ValueError, match="optimizer is SGD; use Adam/AdamW or set offload_optimizer: false"):
        fit(_module(optimizer=lambda p: torch.optim.SGD(p, lr=0.1)), 1, strategy=SelectiveOffloadStrategy(offload=HALF))


def test_other_optimizers_train_on_the_main_thread_without_the_engine() -> None:
    sgd = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)  # noqa: E731
    reference = _module(optimizer=sgd)
    _, ref = fit(reference, 3, gradient_clip_val=CLIP)
    module = _module(optimizer=sgd)
    strategy = SelectiveOffloadStrategy(offload=HALF, offload_optimizer=False)
    _, rec = fit(module, 3, strategy=strategy, gradient_clip_val=CLIP)
    assert strategy.total_grad_norm() is None
    assert rec.rows == ref.rows and _same(_state(module), _state(reference))


def test_engine_runs_tasks_in_order_on_its_thread_and_reraises_errors() -> None:
    engine = HostEngine(threads=1, max_delay_s=0.002, seed=3)
    seen: list[tuple[int, str]] = []
    tickets = [engine.submit(lambda i=i: seen.append((i, threading.current_thread().name))) for i in range(8)]
    tickets[-1].wait()
    assert [i for i, _ in seen] == list(range(8)) and {n for _, n in seen} == {"m6lit-host-engine"}

    def boom() -> None:
        raise KeyError("unit 3")
    bad = engine.submit(boom)
    with pytest.raises(RuntimeError, match="host optimizer engine task failed: KeyError"):
        bad.wait()
    engine.submit(lambda: None)
    engine.close()
    inline = HostEngine(inline=True)
    order: list[str] = []
    inline.submit(lambda: order.append(threading.current_thread().name))
    assert order == [threading.current_thread().name] and inline.collect()["engine_tasks"] == 1
