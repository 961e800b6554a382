"""HostEngine: the offloaded units' optimizer work on a worker thread, in order, while the main thread drives the GPU.

Per streamed unit the engine runs small tasks (FIFO, one worker):

- `land`: once the unit's gradient copy has landed (gradient accumulation only), add it into the unit's fp32
  accumulator and re-make the bf16 stream copy that the gradient overwrote;
- `step`: clip (multiply by the step's clip coefficient, the same per-tensor multiply `clip_grad_norm_` does), run
  Adam/AdamW's own fused kernel (`torch.optim.adam.adam(..., fused=True)`) on the unit's fp32 masters with its
  parameter group's hyperparameters and the user optimizer's own `optimizer.state[p]`, then write the bf16 stream
  copy and mark the unit updated;
- in `backward` overlap mode, `speculate` steps the unit during backward (clip coefficient assumed 1, state backed
  up first) and `settle` keeps the result or restores the backup and redoes the step with the real coefficient;
- in `delayed` mode, `stash` moves the step's gradient aside and writes the stream copy from the masters as they are
  (the next forward waits only for this), then `apply` steps the masters while the next step runs: the next step's
  gradients are computed on weights one update old (ZeRO-Offload's delayed parameter update; approximate).

The forward's fetch waits for the unit's last ticket instead of re-making copies itself. Every task runs the same
kernels on the same values whether the engine runs inline, threaded, or threaded with random delays, so the bits do
not depend on scheduling. Optimizer state stays in the user's optimizer: checkpoints are unchanged.
"""

from __future__ import annotations

import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim.adam import adam as adam_functional
from torch import Tensor

from m6lit.strategies.streaming import StreamUnit

OVERLAP_MODES = ("exact", "backward", "delayed")  # see SelectiveOffloadStrategy.optimizer_overlap


class Ticket:
    """Completion of one engine task; `wait()` re-raises the task's error on the caller's thread."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self.error: BaseException | None = None

    def set(self, error: BaseException | None = None) -> None:
        self.error = error
        self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self) -> None:
        self._done.wait()
        if self.error is not None:
            raise RuntimeError(f"host optimizer engine task failed: {self.error!r}") from self.error


class HostEngine:
    """A FIFO of host tasks run by one worker thread (or inline, on the caller's thread).

    Args:
        threads: intra-op threads for the worker's kernels (default: all host cores but two, at least one).
        inline: run each task at submission on the calling thread (the reference schedule).
        max_delay_s: sleep a random time up to this before each task (tests: scheduling must not change bits).
        seed: seed of those random delays.
    """

    def __init__(self, threads: int | None = None, inline: bool = False, max_delay_s: float = 0.0,
                 seed: int = 0) -> None:
        self.threads = threads if threads is not None else max(1, (os.cpu_count() or 1) - 2)
        self.inline = inline
        self.max_delay_s = max_delay_s
        self._random = random.Random(seed)
        self._queue: queue.SimpleQueue[tuple[Callable[[], None], Ticket] | None] = queue.SimpleQueue()
        self._last: Ticket | None = None
        self._thread: threading.Thread | None = None
        self.busy_s = 0.0
        self.tasks = 0
        self.phases = PhaseTimes()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="m6lit-host-engine", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        if self.threads != torch.get_num_threads():
            torch.set_num_threads(self.threads)
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._execute(*item)

    def _execute(self, fn: Callable[[], None], ticket: Ticket) -> None:
        if self.max_delay_s > 0:
            time.sleep(self._random.uniform(0.0, self.max_delay_s))
        start = time.perf_counter()
        try:
            with torch.no_grad():
                fn()
        except BaseException as err:  # noqa: BLE001 - handed to whoever waits on the ticket
            ticket.set(err)
        else:
            ticket.set()
        self.busy_s += time.perf_counter() - start
        self.tasks += 1

    def submit(self, fn: Callable[[], None]) -> Ticket:
        """Queue `fn` after every earlier task; returns its ticket."""
        ticket = Ticket()
        self._last = ticket
        if self.inline:
            self._execute(fn, ticket)
        else:
            self._start()
            self._queue.put((fn, ticket))
        return ticket

    def drain(self) -> None:
        """Wait until every submitted task has run (re-raising the first error of the last one)."""
        if self._last is not None:
            last, self._last = self._last, None
            last.wait()

    def close(self) -> None:
        """Drain and stop the worker."""
        try:
            self.drain()
        finally:
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join()
                self._thread = None

    def collect(self) -> dict[str, float]:
        """Busy seconds, task count and seconds per kernel phase (`engine_<phase>_s`) since the last call (then
        reset)."""
        out = {"engine_busy_s": self.busy_s, "engine_tasks": float(self.tasks), **self.phases.collect()}
        self.busy_s, self.tasks = 0.0, 0
        return out


PHASES = ("upcast", "clip", "adam", "downcast", "accumulate", "backup", "restore")


class PhaseTimes:
    """Seconds the engine's tasks spend in each kind of kernel (see `PHASES`): the per-task profile behind the
    engine's busy time. Written by the one worker thread, read between steps."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start

    def collect(self) -> dict[str, float]:
        out = {f"engine_{k}_s": v for k, v in self.seconds.items()}
        self.seconds = dict.fromkeys(PHASES, 0.0)
        return out


def wait_event(event: Any) -> None:
    """Wait for a CUDA event from the worker by polling (no synchronising call, so the main thread's sync debug
    mode sees nothing)."""
    if event is None:
        return
    while not event.query():
        time.sleep(20e-6)


@dataclass
class GroupHyper:
    """An optimizer parameter group's hyperparameters frozen at the moment its step was decided."""

    lr: Any
    beta1: Any
    beta2: Any
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool
    decoupled_weight_decay: bool

    @classmethod
    def of(cls, group: dict[str, Any]) -> GroupHyper:
        lr = group["lr"]
        lr = lr.clone() if isinstance(lr, Tensor) else lr
        beta1, beta2 = group["betas"]
        return cls(lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                   amsgrad=bool(group.get("amsgrad", False)), maximize=bool(group.get("maximize", False)),
                   decoupled_weight_decay=bool(group.get("decoupled_weight_decay", False)))


@dataclass
class StepPlan:
    """What one optimizer step of the offloaded units needs: per parameter (by id) its optimizer and group
    hyperparameters, and the clip coefficient (a host scalar tensor, None without clipping) with the CUDA event after
    which its host copy is valid."""

    optimizer: torch.optim.Optimizer
    hyper: dict[int, GroupHyper]
    coef: Tensor | None = None
    coef_ready: Any = None
    redo: list[int] = field(default_factory=list)


def check_adam(optimizer: torch.optim.Optimizer) -> None:
    """The engine runs Adam/AdamW's own fused kernel; anything else must use `offload_optimizer: false`."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise ValueError(f"SelectiveOffloadStrategy(offload_optimizer=True) steps offloaded parameters with the fused "
                         f"Adam/AdamW kernel, but the optimizer is {type(optimizer).__name__}; use Adam/AdamW or set "
                         f"offload_optimizer: false (the optimizer then steps host gradients on the main thread)")
    for group in optimizer.param_groups:
        if group.get("differentiable"):
            raise ValueError("SelectiveOffloadStrategy(offload_optimizer=True): differentiable Adam groups are not "
                             "supported; set offload_optimizer: false")


def init_state(optimizer: torch.optim.Optimizer, p: Tensor, master: Tensor, amsgrad: bool) -> dict[str, Tensor]:
    """Adam's lazy state for `p` (on the main thread, as `Adam._init_group` makes it for fused groups)."""
    state = optimizer.state[p]
    if len(state) == 0:
        state["step"] = torch.zeros((), dtype=torch.float32, device=master.device)
        state["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
        if amsgrad:
            state["max_exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
    return state


def fused_adam_step(hyper: GroupHyper, items: Sequence[tuple[Tensor, Tensor, dict[str, Tensor]]]) -> None:
    """One fused Adam/AdamW step (torch's own kernel) over `(param, grad, state)` triples that share the group
    hyperparameters `hyper`; the state holds `exp_avg`, `exp_avg_sq`, `step` (and `max_exp_avg_sq` with amsgrad)."""
    adam_functional(
        [p for p, _, _ in items], [g for _, g, _ in items], [s["exp_avg"] for _, _, s in items],
        [s["exp_avg_sq"] for _, _, s in items],
        [s["max_exp_avg_sq"] for _, _, s in items] if hyper.amsgrad else [],
        [s["step"] for _, _, s in items], foreach=False, capturable=False, differentiable=False,
        fused=True, grad_scale=None, found_inf=None, has_complex=False,
        decoupled_weight_decay=hyper.decoupled_weight_decay, amsgrad=hyper.amsgrad, beta1=hyper.beta1,
        beta2=hyper.beta2, lr=hyper.lr, weight_decay=hyper.weight_decay, eps=hyper.eps, maximize=hyper.maximize)


class UnitWork:
    """The host-side kernels of one unit's gradients and step (run on the engine's thread)."""

    def __init__(self, unit: StreamUnit, scratch: Callable[[int], Tensor], phases: PhaseTimes | None = None) -> None:
        self.unit = unit
        self.scratch = scratch
        self.phases = phases if phases is not None else PhaseTimes()
        self.backup: list[tuple[Tensor, Tensor]] = []

    def grads(self, g: Any, with_grad: Sequence[bool]) -> list[Tensor | None]:
        """fp32 gradient views of a group's parameters (None where none): the accumulator, the fp32 landing buffer,
        or the bf16 landing (the stream copy) upcast into the engine's scratch."""
        if g.acc is not None:
            flat = g.acc
        elif g.low_precision:
            flat = self.scratch(g.numel)
            with self.phases.timed("upcast"):
                flat.copy_(g.staging)
        else:
            flat = g.grad32
        views = g.views(flat)
        return [v if has else None for v, has in zip(views, with_grad)]

    def land(self) -> None:
        """Add this micro-batch's landed gradients into the fp32 accumulators; re-make the bf16 stream copies."""
        for g in self.unit.groups:
            if not any(g.got_grad):
                continue
            src = g.staging if g.low_precision else g.grad32
            with self.phases.timed("accumulate"):
                for i, (o, p) in enumerate(zip(g.offsets, g.params)):
                    if not g.got_grad[i]:
                        continue
                    n = p.numel()
                    if g.acc_has[i]:
                        g.acc[o:o + n].add_(src[o:o + n])
                    else:
                        g.acc[o:o + n].copy_(src[o:o + n])
                    g.acc_has[i] = True
                g.norms = [torch.linalg.vector_norm(v) if has else None
                           for v, has in zip(g.views(g.acc), g.acc_has)]
            if g.low_precision:
                with self.phases.timed("downcast"):
                    g.staging.copy_(g.master)
            g.staging_valid = True

    def _has(self, g: Any) -> list[bool]:
        return list(g.acc_has) if g.acc is not None else list(g.got_grad)

    def step(self, plan: StepPlan, coef: Tensor | None) -> None:
        """Clip and step every parameter of the unit that has a gradient, then write the stream copies."""
        for g in self.unit.groups:
            has = self._has(g)
            if any(has):
                grads = self.grads(g, has)
                self._adam(plan, g, grads, coef)
            self._finish(g)

    def _adam(self, plan: StepPlan, g: Any, grads: list[Tensor | None], coef: Tensor | None) -> None:
        by_group: dict[int, tuple[GroupHyper, list[tuple[Tensor, Tensor, dict[str, Tensor]]]]] = {}
        for p, master, grad in zip(g.params, g.master_views, grads):
            if grad is None:
                continue
            hyper = plan.hyper.get(id(p))
            if hyper is None:
                continue
            if coef is not None:
                with self.phases.timed("clip"):
                    grad.mul_(coef)
            state = plan.optimizer.state[p]
            by_group.setdefault(id(hyper), (hyper, []))[1].append((master, grad, state))
        with self.phases.timed("adam"):
            for hyper, items in by_group.values():
                fused_adam_step(hyper, items)

    def _finish(self, g: Any) -> None:
        if g.low_precision:
            with self.phases.timed("downcast"):
                g.staging.copy_(g.master)
        g.staging_valid = True
        if g.acc is not None:
            g.acc_has = [False] * len(g.params)
        g.got_grad = [False] * len(g.params)

    # ------------------------------------------------------------------ delayed update
    def stash(self) -> None:
        """Move this step's gradients into the fp32 stash and write the stream copies from the current masters."""
        for g in self.unit.groups:
            has = self._has(g)
            g.pending_has = has
            if any(has):
                with self.phases.timed("upcast"):
                    g.pending.copy_(g.acc if g.acc is not None else g.staging)
            self._finish(g)

    def apply(self, plan: StepPlan, coef: Tensor | None) -> None:
        """Step the masters with the stashed gradients (the stream copies keep the weights before this step)."""
        for g in self.unit.groups:
            if any(g.pending_has):
                views = g.views(g.pending)
                self._adam(plan, g, [v if has else None for v, has in zip(views, g.pending_has)], coef)
            g.pending_has = [False] * len(g.params)

    # ------------------------------------------------------------------ backward overlap
    def speculate(self, plan: StepPlan, backup: bool = True) -> None:
        """Step the unit as if the clip coefficient were 1, after backing up its masters and Adam state (`backup`:
        only when clipping may ask for a redo)."""
        self.backup = []
        for g in self.unit.groups:
            has = self._has(g)
            if not any(has):
                continue
            for p, master, grad_has in zip(g.params, g.master_views, has):
                if not (backup and grad_has and id(p) in plan.hyper):
                    continue
                state = plan.optimizer.state[p]
                with self.phases.timed("backup"):
                    for t in (master, *state.values()):
                        self.backup.append((t, t.clone()))
            self._adam(plan, g, self.grads(g, has), None)

    def settle(self, plan: StepPlan, coef: Tensor | None) -> bool:
        """Keep the speculative step when the coefficient is 1 (or there is none); otherwise restore the backup and
        redo the step with the coefficient. Returns whether it redid."""
        redo = coef is not None and bool(coef.item() < 1.0)
        if redo and not self.backup:
            raise RuntimeError(f"unit {self.unit.name}: clipping scaled the gradients but no backup was kept")
        if redo:
            with self.phases.timed("restore"):
                for t, saved in self.backup:
                    t.copy_(saved)
            for g in self.unit.groups:
                has = self._has(g)
                if any(has):
                    self._adam(plan, g, self.grads(g, has), coef)
        self.backup = []
        for g in self.unit.groups:
            self._finish(g)
        return redo


__all__ = ["GroupHyper", "HostEngine", "OVERLAP_MODES", "PHASES", "PhaseTimes", "StepPlan", "Ticket", "UnitWork", "check_adam", "fused_adam_step",
           "init_state", "wait_event"]
