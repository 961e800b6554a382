"""SelectiveOffloadStrategy: a single-device Lightning strategy that keeps chosen modules in host memory and streams
them to the GPU just in time, the rest staying resident.

Choose the modules with `offload` patterns over the LightningModule's module names (globs and integer ranges:
`model.blocks.[4-11]`, `*.experts`) or let `gpu_memory_budget` pick them (`planner.plan_offload`). Offloaded
parameters keep their fp32 master, gradient and optimizer state in (pinned) host memory; `streaming.ParamStreamer`
moves their compute copies. With `offload_optimizer` (default), Adam/AdamW run their fused kernels on both devices
from the user's one optimizer: fused CUDA AdamW for resident parameters in `optimizer.step()`, and for the host
masters a `host_engine.HostEngine` worker thread that steps each unit (in forward order, pipelined into the next
forward, which waits per unit for "updated") with the optimizer's own state. The gradient norm is taken once, on the
device, before each gradient leaves it (`total_grad_norm()`); Lightning's `gradient_clip_val` uses it, and the clip
coefficient is applied inside each unit's step. `optimizer_overlap: backward` steps units during backward already
(redone from a backup when clipping then scales the gradients); `delayed` is ZeRO-Offload's one-step delayed update
(approximate); `gpu_step_window` steps the units whose gradients arrive last on the GPU.

Use it by class path (`trainer.strategy.class_path: m6lit.strategies.SelectiveOffloadStrategy`) or, once
`m6lit.strategies` is imported, by the short name `m6_offload`. Without CUDA the same streaming path runs with host
and compute device both the CPU (said once at setup).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from lightning.fabric.utilities.init import _EmptyInit
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import SingleDeviceStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from m6lit.strategies.host_engine import (
    OVERLAP_MODES,
    GroupHyper,
    HostEngine,
    StepPlan,
    UnitWork,
    check_adam,
    init_state,
    wait_event,
)
from m6lit.strategies.patterns import resident_params, resolve_offload
from m6lit.strategies.planner import OffloadPlan, plan_offload
from m6lit.strategies.sizes import format_bytes, parse_bytes
from m6lit.strategies.streaming import ParamStreamer, StreamUnit

_CPU_ANNOUNCED = False


def _announce_cpu() -> None:
    global _CPU_ANNOUNCED
    if not _CPU_ANNOUNCED:
        _CPU_ANNOUNCED = True
        rank_zero_info("SelectiveOffloadStrategy: no CUDA device, so host and compute device are both the CPU; "
                       "offloaded modules still run through the streaming path (synchronous copies)")


def _host_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def use_fused_adam(optimizer: torch.optim.Optimizer) -> bool:
    """Switch an Adam/AdamW optimizer to its fused kernels (CPU and CUDA), in place; other optimizers are left as
    they are. Returns whether it switched. `step` counters move to their parameter's device, as fused expects."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return False
    if any(g.get("differentiable") for g in optimizer.param_groups):
        return False
    for group in optimizer.param_groups:
        group["fused"] = True
        group["foreach"] = False
    optimizer.defaults["fused"] = True
    optimizer.defaults["foreach"] = False
    # fused Adam can unscale fp16 gradients itself, and Lightning then refuses gradient clipping; under bf16 (the
    # only mixed precision this strategy accepts) there is no scaler, so clipping is safe and the flag must go
    optimizer._step_supports_amp_scaling = False
    for p, state in optimizer.state.items():
        step = state.get("step")
        if isinstance(step, Tensor) and step.device != p.device:
            state["step"] = step.to(device=p.device, dtype=torch.float32)
    return True


def state_to_param_devices(optimizer: torch.optim.Optimizer) -> None:
    """Move each parameter's optimizer state to the device its parameter now lives on (after a re-plan)."""
    fused = {id(p): bool(g.get("fused") or g.get("capturable")) for g in optimizer.param_groups for p in g["params"]}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if not isinstance(value, Tensor) or value.device == p.device:
                continue
            if key == "step" and value.dim() == 0 and not fused.get(id(p), False):
                continue
            state[key] = value.to(p.device)


class SelectiveOffloadStrategy(SingleDeviceStrategy):
    """Single-device training with chosen modules in host memory, streamed to the GPU around their use.

    Args:
        offload: module-name patterns over the LightningModule (`model.blocks.[4-11]`, `*.experts`); a pattern that
            matches nothing fails at setup with the closest names.
        gpu_memory_budget: instead of patterns, the GPU memory to plan for (`80GB`, `96GiB`, bytes); embeddings, head
            and the first and last layers' blocks stay resident, other blocks stream until the estimate fits.
        host_memory_budget: host memory the offloaded state may take; exceeding it fails at setup.
        prefetch: how many streamed modules to copy ahead of use (forward) or behind it (backward).
        pin_memory: page-lock host buffers (CUDA only; needed for copies that overlap compute).
        offload_optimizer: run Adam/AdamW with fused kernels on both devices, the host part on the engine thread
            (false: host gradients become `.grad` and the optimizer steps them on the main thread, any optimizer).
        optimizer_overlap: `exact` (default: offloaded units step after backward, bitwise as resident training),
            `backward` (each unit steps as its gradients land; with clipping a unit is redone from a backup copy of
            its state when the coefficient is below 1, counted in `offload/redo_units`; needs
            accumulate_grad_batches=1) or `delayed` (approximate, opt-in: after `delay_warmup_steps` exact steps the
            offloaded units' update of step t runs while step t+1 computes, so step t+1's gradients of offloaded
            parameters come from weights one update old; resident parameters stay exact; logged as
            `offload/delayed`).
        delay_warmup_steps: exact steps (in each fit) before `delayed` starts delaying.
        gpu_step_window: device memory (bytes, `8GB`, or `auto`) for stepping on the GPU, in `exact` mode, the
            offloaded units whose gradients arrive last in backward (the first in forward order): their gradients
            stay on the device, their master and Adam state are copied in from pinned host memory during backward
            (16 bytes per parameter of window), stepped by the fused CUDA kernel, and copied back (26 bytes per
            parameter over the link each step). `auto` measures it: the first steps try the window sizes of
            `window_trials` (none, a quarter, half, three quarters, all of the streamed units, two steps each), score
            each by the time the GPU then waited for the host engine and the copies, and keep the best, within what
            the plan leaves of `gpu_memory_budget` (without a budget: 80 % of the device's free memory). 0
            (default): every offloaded unit steps on the host engine.
        engine_threads: host threads for the engine's kernels (default: all cores but two).
        engine: `thread` (default) or `inline` (every engine task runs on the main thread; same bits, for debugging).
        micro_batch_tokens: tokens per micro-batch for the budget plan's activation estimate (default: the data
            module's batch_size times the model's max_seq_len, else 8192).
        device: the compute device (default: the Trainer's device).
    """

    strategy_name = "m6_offload"

    def __init__(self, offload: list[str] | None = None, gpu_memory_budget: int | str | None = None,
                 host_memory_budget: int | str | None = None, prefetch: int = 1, pin_memory: bool = True,
                 offload_optimizer: bool = True, micro_batch_tokens: int | None = None,
                 optimizer_overlap: str = "exact", delay_warmup_steps: int = 10,
                 gpu_step_window: int | str = 0, engine_threads: int | None = None, engine: str = "thread",
                 device: str | torch.device | None = None, accelerator: Any = None, checkpoint_io: Any = None,
                 precision_plugin: Any = None) -> None:
        super().__init__(device=device if device is not None else "cpu", accelerator=accelerator,
                         checkpoint_io=checkpoint_io, precision_plugin=precision_plugin)
        if offload is not None and gpu_memory_budget is not None:
            raise ValueError("SelectiveOffloadStrategy: give either offload patterns or gpu_memory_budget, not both")
        if isinstance(offload, str):
            raise TypeError(f"SelectiveOffloadStrategy.offload must be a list of patterns, got the string "
                            f"{offload!r} (write [{offload!r}])")
        if prefetch < 0:
            raise ValueError(f"SelectiveOffloadStrategy.prefetch={prefetch}: must be >= 0")
        if optimizer_overlap not in OVERLAP_MODES:
            raise ValueError(f"SelectiveOffloadStrategy.optimizer_overlap={optimizer_overlap!r}: choose one of "
                             f"{OVERLAP_MODES}")
        if gpu_step_window not in (0, "0", "auto"):
            gpu_step_window = parse_bytes(gpu_step_window)
        if gpu_step_window and optimizer_overlap != "exact":
            raise ValueError(f"SelectiveOffloadStrategy.gpu_step_window={gpu_step_window!r} works with "
                             f"optimizer_overlap='exact' only (got {optimizer_overlap!r})")
        if delay_warmup_steps < 0:
            raise ValueError(f"SelectiveOffloadStrategy.delay_warmup_steps={delay_warmup_steps}: must be >= 0")
        if engine not in ("thread", "inline"):
            raise ValueError(f"SelectiveOffloadStrategy.engine={engine!r}: choose 'thread' or 'inline'")
        if micro_batch_tokens is not None and micro_batch_tokens < 1:
            raise ValueError(f"SelectiveOffloadStrategy.micro_batch_tokens={micro_batch_tokens}: must be >= 1")
        self.offload = list(offload) if offload is not None else None
        self.gpu_memory_budget = parse_bytes(gpu_memory_budget) if gpu_memory_budget is not None else None
        self.host_memory_budget = parse_bytes(host_memory_budget) if host_memory_budget is not None else None
        self.prefetch = prefetch
        self.pin_memory = pin_memory
        self.offload_optimizer = offload_optimizer
        self.micro_batch_tokens = micro_batch_tokens
        self._explicit_device = device is not None
        self.parallel_devices: list[torch.device] | None = None
        self.num_nodes = 1  # set by the Trainer, like parallel_devices; more than one is refused (_configure_launcher)
        self.streamer: ParamStreamer | None = None
        self.plan: OffloadPlan | None = None
        self.step_stats: list[dict[str, float]] = []
        self._backward_end = 0.0
        self._optimizer_time = 0.0
        self.optimizer_overlap = optimizer_overlap
        self.delay_warmup_steps = delay_warmup_steps
        self.gpu_step_window: int | str = 0 if gpu_step_window in ("0",) else gpu_step_window
        self._window: list[StreamUnit] | None = None
        self._window_state: dict[int, Any] = {}
        self._window_fixups: dict[int, list[tuple[Any, list[tuple[Tensor, Tensor]]]]] = {}
        self.window_units = 0
        self.window_params = 0
        self.window_scores: dict[int, float] = {}
        self.window_score: Callable[[dict[str, float]], float] = gpu_wait
        self._window_trials: list[int] | None = None
        self._window_choice: int | None = None
        self._trial_steps = 0
        self._releases = 0
        self.delayed_steps = 0
        self.engine_threads = engine_threads
        self.engine_kind = engine
        self.engine_max_delay_s = 0.0  # tests: random delays before each engine task must not change any bit
        self.engine: HostEngine | None = None
        self._norm_cache: Tensor | None = None
        self._clip_coef: Tensor | None = None
        self._spec_plans: dict[int, StepPlan] = {}
        self._last_coef: tuple[Tensor, Any] | None = None
        self.redo_units = 0
        self.speculated_units = 0
        self._accumulate = 1
        self._works: dict[int, UnitWork] = {}
        self._scratch: Tensor | None = None

    # ------------------------------------------------------------------ device
    @property
    def root_device(self) -> torch.device:
        if self._explicit_device:
            return self._root_device
        if self.parallel_devices:
            return self.parallel_devices[0]
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")

    def _configure_launcher(self) -> None:
        """The Trainer calls this once `devices` and `num_nodes` are known: this strategy runs one process on one
        device, so asking for more is an error (not a silent single process)."""
        devices = len(self.parallel_devices or [])
        if devices > 1 or self.num_nodes > 1:
            raise ValueError(f"SelectiveOffloadStrategy trains one process on one device, but the Trainer asks for "
                             f"devices={devices} and num_nodes={self.num_nodes}. For several devices use its "
                             f"data-parallel form DDPOffloadStrategy (strategy: m6_offload_ddp, or class_path: "
                             f"m6lit.strategies.DDPOffloadStrategy), which takes the same offload arguments; or set "
                             f"trainer.devices: 1 and trainer.num_nodes: 1")
        super()._configure_launcher()

    @contextmanager
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        """Modules made in `configure_model` start on the CPU: offloaded ones must never materialise on the GPU."""
        with _EmptyInit(enabled=bool(empty_init)), torch.device("cpu"), self.precision_plugin.tensor_init_context():
            yield

    # ------------------------------------------------------------------ placement
    def setup(self, trainer: Trainer) -> None:
        """Lightning's setup without its final move of every optimizer state to the GPU."""
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        assert self.model is not None
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.model = self._setup_model(self.model)
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if self.offload_optimizer:
            self.engine = HostEngine(threads=self.engine_threads, inline=self.engine_kind == "inline",
                                     max_delay_s=self.engine_max_delay_s)
            # Lightning's gradient_clip_val clips through the precision plugin: point it at the device-side norm
            self.precision_plugin.clip_grad_by_norm = self._clip_grad_by_norm  # type: ignore[method-assign]

    def model_to_device(self) -> None:
        module = self.lightning_module
        assert module is not None
        self._place(module)

    def _low_precision(self) -> torch.dtype | None:
        plugin = self.precision_plugin
        if isinstance(plugin, MixedPrecision):
            if plugin.precision != "bf16-mixed":
                raise ValueError(f"SelectiveOffloadStrategy supports precision '32-true' and 'bf16-mixed', got "
                                 f"{plugin.precision!r} (fp16 would need a gradient scaler across two devices)")
            return torch.bfloat16
        if type(plugin) is not Precision:
            raise ValueError(f"SelectiveOffloadStrategy supports precision '32-true' and 'bf16-mixed', got the "
                             f"{type(plugin).__name__} plugin (the fp32 masters live on the host; a true-low-precision "
                             f"module would have none)")
        return None

    def _tokens(self, module: LightningModule) -> int:
        if self.micro_batch_tokens is not None:
            return self.micro_batch_tokens
        trainer = getattr(module, "_trainer", None)
        batch = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
        config = getattr(getattr(module, "model", None), "config", None)
        if isinstance(batch, int) and config is not None and hasattr(config, "max_seq_len"):
            return batch * int(config.max_seq_len)
        return 8192

    def make_plan(self, module: LightningModule) -> OffloadPlan:
        """The placement for `module` now (patterns re-resolved, or the budget re-planned)."""
        lp = self._low_precision()
        trainer = getattr(module, "_trainer", None)
        accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        return plan_offload(module, gpu_memory_budget=self.gpu_memory_budget, offload=self.offload,
                            precision="bf16-mixed" if lp is not None else "32-true",
                            micro_batch_tokens=self._tokens(module), prefetch=self.prefetch,
                            accumulate_grad_batches=accumulate, host_memory_budget=self.host_memory_budget,
                            host_layout=(f"engine-{self.optimizer_overlap}" if self.optimizer_overlap != "exact"
                                         else "engine") if self.offload_optimizer else "legacy")

    def _place(self, module: LightningModule) -> None:
        device = self.root_device
        if device.type != "cuda":
            _announce_cpu()
        lp = self._low_precision()
        plan = self.make_plan(module)
        names = resolve_offload(module, plan.offload) if self.offload is None else resolve_offload(module, self.offload)
        shared = {r.name for r in plan.rows if len(r.layers) > 1}
        keep = resident_params(module, names)
        available = _host_available_bytes()
        if self.host_memory_budget is None and available is not None and plan.estimate.host_total > available:
            rank_zero_warn(f"SelectiveOffloadStrategy: the offloaded state needs about "
                           f"{format_bytes(plan.estimate.host_total)} of host memory but only "
                           f"{format_bytes(available)} is available; set host_memory_budget to fail fast")
        if self.streamer is None:
            trainer = getattr(module, "_trainer", None)
            self._accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
            if self.gpu_step_window and self._accumulate > 1:
                raise ValueError(f"SelectiveOffloadStrategy.gpu_step_window needs accumulate_grad_batches=1 (got "
                                 f"{self._accumulate}); gradients of the window would have to accumulate on the GPU")
            if self.optimizer_overlap != "exact" and self._accumulate > 1:
                raise ValueError(f"SelectiveOffloadStrategy.optimizer_overlap={self.optimizer_overlap!r} needs "
                                 f"accumulate_grad_batches=1 (got {self._accumulate}); use 'exact'")
            self.streamer = ParamStreamer([], device, prefetch=self.prefetch, pin_memory=self.pin_memory,
                                          low_precision=lp, keep=keep, shared=shared, lean=self.offload_optimizer,
                                          accumulate=self._accumulate > 1,
                                          delayed=self.optimizer_overlap == "delayed")
            self.streamer.on_unit_grads = self._on_unit_grads
        streamer = self.streamer
        streamer.keep, streamer.shared = keep, shared
        wanted = {(n, id(module.get_submodule(n))) for n in names}
        for unit in list(streamer.units):
            if (unit.name, id(unit.module)) not in wanted:
                streamer.remove_unit(unit)
        have = {(u.name, id(u.module)) for u in streamer.units}
        for name in names:
            sub = module.get_submodule(name)
            if (name, id(sub)) not in have:
                streamer.add_unit(name, sub)
        with self._streamed_hidden(module):
            module.to(device)
        self.plan = plan
        rank_zero_info(self.placement_table())

    @contextmanager
    def _streamed_hidden(self, module: nn.Module) -> Iterator[None]:
        """Hide streamed parameters from `module.to()` so it moves everything else (resident parameters, buffers,
        metric states, the module's device record) and leaves the host masters alone."""
        hidden = []
        streamer = self.streamer
        for mod in module.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None and streamer is not None and streamer.is_streamed(p):
                    hidden.append((mod, name, p))
                    mod._parameters[name] = None
        try:
            yield
        finally:
            for mod, name, p in hidden:
                mod._parameters[name] = p

    def placement_table(self) -> str:
        """The setup table: the plan's rows plus the streamer's actual host bytes."""
        assert self.plan is not None
        streamer = self.streamer
        host = streamer.host_bytes() if streamer is not None else 0
        pinned = streamer.pinned_bytes() if streamer is not None else 0
        head = (f"SelectiveOffloadStrategy on {self.root_device}: {len(streamer.units) if streamer else 0} streamed "
                f"modules, {format_bytes(host)} of host buffers allocated ({format_bytes(pinned)} pinned), "
                f"prefetch {self.prefetch}, optimizer overlap {self.optimizer_overlap}")
        return head + "\n" + self.plan.table()

    def on_parameters_changed(self, param_map: Any = None) -> None:
        """After a delink or expert split: re-plan, place new modules, and move optimizer state to its parameters'
        new devices."""
        module = self.lightning_module
        assert module is not None
        self.drain()
        self._works.clear()
        self._window = None
        self._window_trials, self._window_choice, self.window_scores = None, None, {}
        self._window_state.clear()
        if self.streamer is not None:
            self.streamer.device_grad_units = set()
            self.streamer.release_all()
        self._place(module)
        for optimizer in self.optimizers:
            state_to_param_devices(optimizer)
            if self.offload_optimizer:
                use_fused_adam(optimizer)

    # ------------------------------------------------------------------ optimizers
    def setup_optimizers(self, trainer: Trainer) -> None:
        super().setup_optimizers(trainer)
        if self.offload_optimizer:
            for optimizer in self.optimizers:
                if self.streamer is not None and self.streamer.units:
                    check_adam(optimizer)
                use_fused_adam(optimizer)

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """The optimizer's state dict once the engine has finished its steps."""
        self.drain()
        return super().optimizer_state(optimizer)

    def drain(self) -> None:
        """Wait for every host engine task (state dict save/load, re-plan, teardown need quiet masters)."""
        if self.engine is not None:
            self.engine.drain()
        if self.streamer is not None:
            for unit in self.streamer.units:
                unit.ticket = None
                if unit.gpu_done is not None:
                    unit.gpu_done.synchronize()
        self._apply_window_fixups()

    # ------------------------------------------------------------------ gradient norm and clipping
    def _streamed_slot(self, p: Tensor) -> Any:
        streamer = self.streamer
        return streamer._slot.get(id(p)) if streamer is not None and self.offload_optimizer else None

    def _optimizer_params(self) -> list[Tensor]:
        out, seen = [], set()
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if id(p) not in seen:
                        seen.add(id(p))
                        out.append(p)
        return out

    def _param_norms(self) -> tuple[list[Tensor], list[Tensor | None]]:
        """Per parameter with a gradient (in the optimizers' order): a tensor standing for the gradient's (device,
        dtype) as `get_total_norm` would group it, and the cached norm of an offloaded one (None for resident)."""
        keys: list[Tensor] = []
        cached: list[Tensor | None] = []
        for p in self._optimizer_params():
            slot = self._streamed_slot(p)
            if slot is None:
                if p.grad is not None:
                    keys.append(p.grad)
                    cached.append(None)
                continue
            unit, g, i = slot
            if self._accumulate > 1:
                self.streamer.await_unit(unit)  # the engine's landing computes the accumulated norms
            norm = g.norms[i]
            if norm is not None:
                keys.append(g.master_views[i])
                cached.append(norm)
        return keys, cached

    def total_grad_norm(self) -> Tensor | None:
        """The global 2-norm of all gradients (resident and offloaded), as `torch.nn.utils.get_total_norm` over the
        optimizers' parameters computes it: per-parameter norms (offloaded ones taken on the device before their
        copy) grouped by device and dtype in the same order, then the norm of their stack. Cached until the next
        backward; None without the host engine (then gradients are ordinary host tensors)."""
        if self._norm_cache is not None:
            return self._norm_cache
        if not self.offload_optimizer or self.streamer is None or not self.streamer.units:
            return None
        from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype, _has_foreach_support

        keys, cached = self._param_norms()
        if not keys:
            return None
        grouped = _group_tensors_by_device_and_dtype([keys], with_indices=True)  # type: ignore[list-item]
        ordered: list[Tensor] = []
        for (device, _), ([tensors], indices) in grouped.items():
            if all(cached[j] is None for j in indices):
                if _has_foreach_support(tensors, device):  # type: ignore[arg-type]
                    values = list(torch._foreach_norm(tensors, 2.0))  # type: ignore[arg-type]
                else:
                    values = [torch.linalg.vector_norm(t, 2.0) for t in tensors]
            else:
                values = [cached[j] if cached[j] is not None else torch.linalg.vector_norm(t, 2.0)
                          for j, t in zip(indices, tensors)]
            ordered.extend(values)
        device = self.root_device
        self._norm_cache = torch.linalg.vector_norm(torch.stack([n.to(device) for n in ordered]), 2.0)
        return self._norm_cache

    def first_nonfinite_grad(self) -> str | None:
        """The name of the first parameter whose gradient is not finite (a slow path, for the error message)."""
        module = self.lightning_module
        for name, p in module.named_parameters():
            slot = self._streamed_slot(p)
            if slot is not None:
                norm = slot[1].norms[slot[2]]
                if norm is not None and not bool(torch.isfinite(norm)):
                    return name
            elif p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                return name
        return None

    def _clip_grad_by_norm(self, optimizer: Any, clip_val: float) -> None:
        """Clip by the cached device-side norm: resident gradients are multiplied now (as `clip_grad_norm_` does),
        offloaded ones inside their unit's step on the engine."""
        total = self.total_grad_norm()
        if total is None:
            type(self.precision_plugin).clip_grad_by_norm(self.precision_plugin, optimizer, clip_val)
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if self._streamed_slot(p) is None]
        torch.nn.utils.clip_grads_with_norm_(params, float(clip_val), total)
        self._clip_coef = torch.clamp(float(clip_val) / (total + 1e-6), max=1.0)

    # ------------------------------------------------------------------ host engine
    def _work(self, unit: StreamUnit) -> UnitWork:
        work = self._works.get(id(unit))
        if work is None or work.unit is not unit:
            phases = self.engine.phases if self.engine is not None else None
            work = self._works[id(unit)] = UnitWork(unit, self._scratch_of, phases)
        return work

    def _scratch_of(self, numel: int) -> Tensor:
        """The engine's one fp32 buffer for upcast bf16 gradients (sized to the largest group; tasks run in order)."""
        if self._scratch is None or self._scratch.numel() < numel:
            streamer = self.streamer
            biggest = max((g.numel for u in streamer.units for g in u.groups if g.low_precision),
                          default=numel) if streamer else numel
            self._scratch = torch.empty(max(biggest, numel), dtype=torch.float32)
        return self._scratch[:numel]

    def _step_plan(self, optimizer: Any) -> StepPlan:
        hyper: dict[int, GroupHyper] = {}
        for group in optimizer.param_groups:
            snapshot = GroupHyper.of(group)
            for p in group["params"]:
                if self._streamed_slot(p) is not None:
                    hyper[id(p)] = snapshot
        return StepPlan(optimizer=optimizer, hyper=hyper)

    def _owner(self, unit: StreamUnit) -> Any:
        ids = {id(p) for p in unit.parameters()}
        for optimizer in self.optimizers:
            if any(id(p) in ids for group in optimizer.param_groups for p in group["params"]):
                return optimizer
        return None

    def _release_delayed(self, plan: StepPlan, coef: Tensor | None, ready: Any) -> None:
        """Delayed update: per unit, stash the gradients and re-make the stream copy (the next forward waits for
        this only), then, behind all of those, step the masters while the next step computes."""
        engine, streamer = self.engine, self.streamer
        assert engine is not None and streamer is not None
        units = [u for u in streamer.forward_order() if any(id(p) in plan.hyper for p in u.parameters())]
        for unit in units:
            work, event = self._work(unit), unit.d2h_done

            def stash(work: UnitWork = work, event: Any = event, unit: StreamUnit = unit) -> None:
                wait_event(event)
                _init_states(plan, unit)
                work.stash()
            unit.ticket = engine.submit(stash)
            unit.d2h_done = None
        for unit in units:
            def apply(work: UnitWork = self._work(unit)) -> None:
                wait_event(ready)
                work.apply(plan, coef)
            engine.submit(apply)
        self.delayed_steps += 1

    def _on_unit_grads(self, unit: StreamUnit) -> None:
        """A unit's gradients of this backward are all issued: land them (accumulation) or, in `backward` overlap
        mode, step the unit speculatively."""
        engine = self.engine
        if engine is None:
            return
        event = unit.d2h_done
        if self._accumulate > 1:
            work = self._work(unit)

            def land() -> None:
                wait_event(event)
                work.land()
            unit.ticket = engine.submit(land)
        elif self.optimizer_overlap == "backward":
            optimizer = self._owner(unit)
            if optimizer is None:
                return
            plan = self._spec_plans.get(id(optimizer))
            if plan is None:
                plan = self._spec_plans[id(optimizer)] = self._step_plan(optimizer)
            work = self._work(unit)
            self.speculated_units += 1
            trainer = getattr(self.lightning_module, "_trainer", None)
            backup = bool(getattr(trainer, "gradient_clip_val", None))

            def speculate() -> None:
                wait_event(event)
                _init_states(plan, unit)
                work.speculate(plan, backup)
            unit.ticket = engine.submit(speculate)

    def _release(self, optimizer: Any) -> None:
        """The optimizer has stepped its resident parameters: hand the offloaded units' steps to the engine, in the
        order the next forward needs them."""
        engine, streamer = self.engine, self.streamer
        assert engine is not None and streamer is not None
        coef, ready = None, None
        if self._clip_coef is not None:
            if self._clip_coef.device.type == "cuda":
                coef = torch.empty((), dtype=torch.float32, pin_memory=True)
                coef.copy_(self._clip_coef, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record()
            else:
                coef = self._clip_coef
            self._last_coef = (coef, ready)
        speculative = self._spec_plans.pop(id(optimizer), None)
        plan = speculative or self._step_plan(optimizer)
        self._releases += 1
        window = {id(u) for u in self._window or []}
        self._window_copy_back([(unit, *self._window_step(unit, plan)) for unit in self._window or []])
        if self.optimizer_overlap == "delayed" and self._releases > self.delay_warmup_steps:
            self._release_delayed(plan, coef, ready)
            return
        for unit in streamer.forward_order():
            if id(unit) in window or not any(id(p) in plan.hyper for p in unit.parameters()):
                continue
            work, event = self._work(unit), unit.d2h_done
            if speculative is not None:
                def settle(work: UnitWork = work) -> None:
                    wait_event(ready)
                    if work.settle(plan, coef):
                        self.redo_units += 1
                unit.ticket = engine.submit(settle)
            else:
                def step(work: UnitWork = work, event: Any = event, unit: StreamUnit = unit) -> None:
                    wait_event(event)
                    wait_event(ready)
                    _init_states(plan, unit)
                    work.step(plan, coef)
                unit.ticket = engine.submit(step)
            unit.d2h_done = None
        if self.gpu_step_window and self.gpu_step_window != "auto" and self._window is None:
            self._choose_window()

    # ------------------------------------------------------------------ GPU step window
    def _window_bytes(self) -> int:
        """The window's device memory: the configured size, or for `auto` the spare memory it may use."""
        if self.gpu_step_window != "auto":
            return int(self.gpu_step_window)
        plan, streamer = self.plan, self.streamer
        if plan is not None and plan.gpu_memory_budget is not None:
            return max(0, int(plan.gpu_memory_budget - plan.estimate.gpu_total))
        if streamer is not None and streamer.cuda:
            return int(0.8 * torch.cuda.mem_get_info(streamer.device)[0])
        return 1 << 62  # the CPU path: host memory is the device's

    def _choose_window(self, units_limit: int | None = None) -> None:
        """The units first in forward order (their gradients arrive last) whose device step fits the window (at most
        `units_limit` of them): from the next backward on, their gradients stay on the device. Units that leave the
        window wait here for their last copy back (one host sync, only when the window changes)."""
        streamer = self.streamer
        assert streamer is not None
        units = streamer.forward_order()
        left, chosen = self._window_bytes(), []
        for unit in units[:units_limit]:
            need = 16 * unit.numel
            if need > left:
                break
            chosen.append(unit)
            left -= need
        kept = {id(u) for u in chosen}
        for unit in self._window or []:
            if id(unit) not in kept:
                if streamer.cuda and unit.gpu_done is not None:
                    unit.gpu_done.synchronize()
                self._apply_window_fixups(unit)
        self._window = chosen
        self.window_units = len(chosen)
        self.window_params = sum(u.numel for u in chosen)
        streamer.device_grad_units = {u.index for u in chosen}
        rank_zero_info(f"SelectiveOffloadStrategy: GPU step window of {format_bytes(16 * self.window_params)} holds "
                       f"{len(chosen)} of {len(units)} offloaded units ({[u.name for u in chosen][:4]}...)")

    def _search_window(self, row: dict[str, float]) -> None:
        """`gpu_step_window: auto`: after each trial's second step, score it by the GPU's wait in that step (engine
        wait + copy stall), start the next trial, and after the last keep the best (fewest units on ties)."""
        streamer = self.streamer
        assert streamer is not None
        if self._window_trials is None:
            self._window_trials = window_trials(len(streamer.units))
            self._trial_steps = 0
        self._trial_steps += 1
        if self._trial_steps < WINDOW_TRIAL_STEPS or self._window_choice is not None:
            return
        self._trial_steps = 0
        self.window_scores[self.window_units] = self.window_score(row)
        todo = [k for k in self._window_trials if k not in self.window_scores]
        if todo:
            self._choose_window(todo[0])
            if self.window_units in self.window_scores:  # capped by memory: nothing new to try
                self._window_trials = [k for k in self._window_trials if k <= self.window_units]
            return
        best = min(sorted(self.window_scores), key=lambda k: self.window_scores[k])
        self._window_choice = best
        self._choose_window(best)
        table = ", ".join(f"{k}: {v:.3f} s" for k, v in sorted(self.window_scores.items()))
        rank_zero_info(f"SelectiveOffloadStrategy: gpu_step_window auto keeps {best} units (GPU wait per step by "
                       f"window units: {table})")

    def _pin(self, unit: StreamUnit, tensor: Tensor) -> None:
        from m6lit.strategies.streaming import register_host_memory

        big = tensor.numel() * tensor.element_size() >= 1 << 20  # small ones go through pinned temporaries
        if self.streamer is not None and self.streamer.cuda and big and not tensor.is_pinned():
            if register_host_memory(tensor):
                unit.registered.append(tensor)

    def _window_prefetch(self) -> None:
        """Start of backward: copy the window units' masters and Adam state to the device on the copy stream."""
        streamer = self.streamer
        if not self._window or streamer is None:
            return
        device = streamer.device
        for unit in self._window:
            streamer.await_unit(unit)
            self._apply_window_fixups(unit)
            if streamer.cuda and unit.gpu_done is not None:
                streamer.h2d_stream.wait_event(unit.gpu_done)
            state_of = {}
            for g in unit.groups:
                self._pin(unit, g.master)
                for p in g.params:
                    for optimizer in self.optimizers:
                        if p in optimizer.state and len(optimizer.state[p]):
                            state_of[id(p)] = optimizer.state[p]
                            for t in optimizer.state[p].values():
                                self._pin(unit, t)
            copies: dict[str, Any] = {"masters": [], "state": {}}
            stream = torch.cuda.stream(streamer.h2d_stream) if streamer.cuda else _null()
            if streamer.cuda:
                streamer.h2d_stream.wait_stream(torch.cuda.current_stream(device))
            with stream:
                for g in unit.groups:
                    flat = torch.empty(g.numel, dtype=g.master.dtype, device=device)
                    src = g.master
                    if streamer.cuda and not src.is_pinned():
                        src = torch.empty(src.shape, dtype=src.dtype, pin_memory=True).copy_(src)
                    flat.copy_(src, non_blocking=True)
                    copies["masters"].append(flat)
                    streamer.stats.h2d_bytes += flat.numel() * flat.element_size()
                    for p in g.params:
                        state = state_of.get(id(p))
                        if state is not None:
                            dev = {k: _to_device(v, device) for k, v in state.items()}
                            copies["state"][id(p)] = dev
                            streamer.stats.h2d_bytes += sum(v.numel() * v.element_size() for v in state.values())
                if streamer.cuda:
                    ready = torch.cuda.Event()
                    ready.record()
                    copies["ready"] = ready
            self._window_state[id(unit)] = copies

    def _window_step(self, unit: StreamUnit, plan: StepPlan) -> tuple[list[Any], list[Any]]:
        """Clip and step a window unit with the fused kernel on the device, write its stream copy there, and copy
        master, Adam state and stream copy back to the host behind the step."""
        from m6lit.strategies.host_engine import fused_adam_step

        streamer = self.streamer
        copies = self._window_state.pop(id(unit), None)
        if streamer is None or copies is None:
            return [], []
        device = streamer.device
        compute = torch.cuda.current_stream(device) if streamer.cuda else None
        if compute is not None and "ready" in copies:
            compute.wait_event(copies["ready"])
        coef = self._clip_coef
        first: list[tuple[Tensor, Tensor]] = []
        backs: list[tuple[Tensor, Tensor]] = []
        for g, master_dev in zip(unit.groups, copies["masters"]):
            views = g.views(master_dev)
            grads = g.views(g.dev_grad) if g.dev_grad is not None else [None] * len(g.params)
            by_group: dict[int, tuple[GroupHyper, list[Any]]] = {}
            for p, host_master, view, grad, has in zip(g.params, g.master_views, views, grads, g.got_grad):
                hyper = plan.hyper.get(id(p))
                if not has or hyper is None or grad is None:
                    continue
                if coef is not None:
                    grad.mul_(coef)
                dev = copies["state"].get(id(p))
                host_state = init_state(plan.optimizer, p, host_master, hyper.amsgrad)
                if dev is None:
                    dev = {k: torch.zeros_like(v, device=device) for k, v in host_state.items()}
                    copies["state"][id(p)] = dev
                for k, v in dev.items():
                    backs.append((host_state[k], v))
                by_group.setdefault(id(hyper), (hyper, []))[1].append((view, grad, dev))
            for hyper, items in by_group.values():
                fused_adam_step(hyper, items)
            if g.low_precision:
                first.append((g.staging, master_dev.to(g.staging.dtype)))
                backs.append((g.master, master_dev))
            else:
                first.append((g.master, master_dev))  # the master is the stream copy
            g.dev_grad = None
            g.got_grad = [False] * len(g.params)
            g.staging_valid = True
        return first, backs

    def _window_copy_back(self, items: list[tuple[StreamUnit, list[Any], list[Any]]]) -> None:
        """Copy the window's results to the host: every unit's stream copy first (the next forward waits only for
        its own), then masters and Adam state. Pageable destinations land in pinned memory and are copied over at
        the next backward's start (or a drain)."""
        streamer = self.streamer
        if streamer is None or not items:
            return
        for _, first, rest in items:
            streamer.stats.d2h_bytes += sum(h.numel() * h.element_size() for h, _ in first + rest)
        if not streamer.cuda:
            for _, first, rest in items:
                for host, dev in first + rest:
                    host.copy_(dev)
            return
        streamer.d2h_stream.wait_stream(torch.cuda.current_stream(streamer.device))
        with torch.cuda.stream(streamer.d2h_stream):
            for phase in (1, 2):
                for unit, first, rest in items:
                    fixups: list[tuple[Tensor, Tensor]] = []
                    for host, dev in first if phase == 1 else rest:
                        if host.is_pinned():
                            host.copy_(dev, non_blocking=True)
                        else:
                            landing = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
                            landing.copy_(dev, non_blocking=True)
                            fixups.append((host, landing))
                        dev.record_stream(streamer.d2h_stream)
                    event = torch.cuda.Event()
                    event.record()
                    if phase == 1:
                        unit.gpu_staging = event
                    else:
                        unit.gpu_done = event
                    if fixups:
                        self._window_fixups.setdefault(id(unit), []).append((event, fixups))

    def _apply_window_fixups(self, unit: StreamUnit | None = None) -> None:
        """Copy results that landed in pinned temporaries into their pageable host tensors."""
        keys = [id(unit)] if unit is not None else list(self._window_fixups)
        for key in keys:
            for event, fixups in self._window_fixups.pop(key, []):
                event.synchronize()
                for host, landing in fixups:
                    host.copy_(landing)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Load without Lightning's move to the GPU: `load_state_dict` already puts each state on its parameter's
        device (host for offloaded masters)."""
        self.drain()
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            optimizer.load_state_dict(state)
            state_to_param_devices(optimizer)
            if self.offload_optimizer:
                use_fused_adam(optimizer)

    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self.streamer is not None and self.streamer.units:
            if self.engine is not None:
                self._release(optimizer)
            else:
                # the bf16 stream copies are re-made lazily, at each unit's next fetch, where the host work overlaps
                # the GPU's compute of the units before it
                self.streamer.mark_dirty()
            self._clip_coef = None
            self._optimizer_time += time.perf_counter() - self._backward_end
            self._record_stats()
        return out

    def _record_stats(self) -> None:
        assert self.streamer is not None
        row = {key: float(value) for key, value in self.streamer.collect_stats().as_dict().items()}
        row["optimizer_s"] = self._optimizer_time
        self._optimizer_time = 0.0
        if self.engine is not None:
            row.update(self.engine.collect())
            row["redo_units"] = float(self.redo_units)
            row["speculated_units"] = float(self.speculated_units)
            row["delayed"] = float(self.delayed_steps)
            row["window_units"] = float(self.window_units)
        row["clip_coef"] = float("nan")
        if self._last_coef is not None:
            coef, ready = self._last_coef
            if ready is None or ready.query():
                row["clip_coef"] = float(coef)
        self.step_stats = [*self.step_stats[-999:], row]
        if self.gpu_step_window == "auto" and self.engine is not None and self._accumulate == 1:
            self._search_window(row)
        module = self.lightning_module
        trainer = getattr(module, "_trainer", None)
        if trainer is None or not trainer.loggers:
            return
        every = max(int(getattr(trainer, "log_every_n_steps", 50) or 1), 1)
        if trainer.global_step % every == 0:
            metrics = {f"offload/{k}": v for k, v in row.items()}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    # ------------------------------------------------------------------ steps and backward
    def _begin_pass(self) -> None:
        if self.streamer is not None:
            self.streamer.begin_pass()

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        self._begin_pass()
        return super().training_step(*args, **kwargs)

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        self._begin_pass()
        return super().validation_step(*args, **kwargs)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        self._begin_pass()
        return super().test_step(*args, **kwargs)

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        self._begin_pass()
        return super().predict_step(*args, **kwargs)

    def pre_backward(self, closure_loss: Tensor) -> None:
        super().pre_backward(closure_loss)
        self._norm_cache = None
        if self.streamer is not None:
            self.streamer.pre_backward()
            self._window_prefetch()

    def post_backward(self, closure_loss: Tensor) -> None:
        if self.streamer is not None:
            self.streamer.post_backward()
        self._backward_end = time.perf_counter()
        super().post_backward(closure_loss)

    # ------------------------------------------------------------------ checkpoints and teardown
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The full fp32 state: offloaded parameters read from their host masters."""
        self.drain()
        if self.streamer is not None:
            self.streamer.release_all()
        return super().lightning_module_state_dict()

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """Weights load into the host masters and resident parameters in place; bf16 stream copies are re-made."""
        self.drain()
        if self.streamer is not None:
            self.streamer.release_all()
        super().load_model_state_dict(checkpoint, strict=strict)
        if self.streamer is not None:
            self.streamer.mark_dirty()

    def teardown(self) -> None:
        """Uninstall the streaming hooks and unpin host buffers; parameters keep their values and places.

        Unlike Lightning's default this does not copy the resident parameters and optimizer state to the CPU: with
        the offloaded state already filling host memory, that copy is what runs the host out of memory (call
        `.cpu()` on the module yourself when the GPU copy must go)."""
        self.drain()
        if self.engine is not None:
            self.engine.close()
            self.engine = None
            self.precision_plugin.__dict__.pop("clip_grad_by_norm", None)
        self._works.clear()
        if self.streamer is not None:
            self.streamer.remove()
            self.streamer = None
        self.precision_plugin.teardown()
        assert self.accelerator is not None
        self.accelerator.teardown()
        self.checkpoint_io.teardown()


WINDOW_TRIAL_STEPS = 2  # a window set after step t is paid in step t+1's backward and step t+2's forward


def window_trials(units: int) -> list[int]:
    """The window sizes (in units, first in forward order) that `gpu_step_window: auto` tries: none, a quarter,
    half, three quarters and all of the streamed units."""
    return sorted({0, units // 4, units // 2, (3 * units) // 4, units})


def gpu_wait(row: dict[str, float]) -> float:
    """The seconds of a step in which the GPU waited for the host: for the engine's updates and for copies."""
    return row.get("engine_wait_s", 0.0) + row.get("stall_s", 0.0)


@contextmanager
def _null() -> Iterator[None]:
    yield


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    """Copy a host tensor to the device without blocking the host: pageable memory goes through a pinned temporary
    (the caching host allocator keeps it until the copy is done)."""
    if device.type == "cuda" and not host.is_pinned():
        host = torch.empty(host.shape, dtype=host.dtype, pin_memory=True).copy_(host)
    return host.to(device, non_blocking=True)


def _init_states(plan: StepPlan, unit: StreamUnit) -> None:
    """Adam's lazy state for the unit's parameters that have a gradient now (engine thread, before their step)."""
    for g in unit.groups:
        has = g.acc_has if g.acc is not None else g.got_grad
        for p, master, grad_has in zip(g.params, g.master_views, has):
            hyper = plan.hyper.get(id(p))
            if grad_has and hyper is not None:
                init_state(plan.optimizer, p, master, hyper.amsgrad)


StrategyRegistry.register(SelectiveOffloadStrategy.strategy_name, SelectiveOffloadStrategy,
                          description="m6lit selective CPU offload: chosen modules in host memory, streamed just in "
                                      "time", override=True)

__all__ = ["SelectiveOffloadStrategy", "gpu_wait", "window_trials", "state_to_param_devices", "use_fused_adam"]
