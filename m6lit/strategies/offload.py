"""SelectiveOffloadStrategy: a single-device Lightning strategy that keeps chosen modules in host memory and streams
them to the GPU just in time, the rest staying resident.

Choose the modules with `offload` patterns over the LightningModule's module names (globs and integer ranges:
`model.blocks.[4-11]`, `*.experts`) or let `gpu_memory_budget` pick them (`planner.plan_offload`). Offloaded
parameters keep their fp32 master, gradient and optimizer state in (pinned) host memory; `streaming.ParamStreamer`
moves their compute copies. With `offload_optimizer`, Adam/AdamW run their fused kernels on both devices from the
user's one optimizer (fused CPU AdamW for the host masters, fused CUDA AdamW for resident parameters).

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

from m6lit.strategies.planner import (
    OffloadPlan,
    format_bytes,
    parse_bytes,
    plan_offload,
    resident_params,
    resolve_offload,
)
from m6lit.strategies.streaming import ParamStreamer

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
        offload_optimizer: run Adam/AdamW with fused kernels on both devices (CPU for offloaded masters).
        micro_batch_tokens: tokens per micro-batch for the budget plan's activation estimate (default: the data
            module's batch_size times the model's max_seq_len, else 8192).
        device: the compute device (default: the Trainer's device).
    """

    strategy_name = "m6_offload"

    def __init__(self, offload: list[str] | None = None, gpu_memory_budget: int | str | None = None,
                 host_memory_budget: int | str | None = None, prefetch: int = 1, pin_memory: bool = True,
                 offload_optimizer: bool = True, micro_batch_tokens: int | None = None,
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
        self.streamer: ParamStreamer | None = None
        self.plan: OffloadPlan | None = None
        self.step_stats: list[dict[str, float]] = []
        self._backward_end = 0.0
        self._optimizer_time = 0.0

    # ------------------------------------------------------------------ device
    @property
    def root_device(self) -> torch.device:
        if self._explicit_device:
            return self._root_device
        if self.parallel_devices:
            return self.parallel_devices[0]
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")

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
                            accumulate_grad_batches=accumulate, host_memory_budget=self.host_memory_budget)

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
            self.streamer = ParamStreamer([], device, prefetch=self.prefetch, pin_memory=self.pin_memory,
                                          low_precision=lp, keep=keep, shared=shared)
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
        pinned = all(u.pinned for u in streamer.units) if streamer is not None and streamer.units else False
        head = (f"SelectiveOffloadStrategy on {self.root_device}: {len(streamer.units) if streamer else 0} streamed "
                f"modules, {format_bytes(host)} of host buffers allocated"
                + (" (pinned)" if pinned else "") + f", prefetch {self.prefetch}")
        return head + "\n" + self.plan.table()

    def on_parameters_changed(self, param_map: Any = None) -> None:
        """After a delink or expert split: re-plan, place new modules, and move optimizer state to its parameters'
        new devices."""
        module = self.lightning_module
        assert module is not None
        if self.streamer is not None:
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
                use_fused_adam(optimizer)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Load without Lightning's move to the GPU: `load_state_dict` already puts each state on its parameter's
        device (host for offloaded masters)."""
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            optimizer.load_state_dict(state)
            state_to_param_devices(optimizer)
            if self.offload_optimizer:
                use_fused_adam(optimizer)

    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        out = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self.streamer is not None and self.streamer.units:
            # the bf16 stream copies are re-made lazily, at each unit's next fetch, where the host work overlaps the
            # GPU's compute of the units before it
            self.streamer.mark_dirty()
            self._optimizer_time += time.perf_counter() - self._backward_end
            self._record_stats()
        return out

    def _record_stats(self) -> None:
        assert self.streamer is not None
        row = {key: float(value) for key, value in self.streamer.collect_stats().as_dict().items()}
        row["optimizer_s"] = self._optimizer_time
        self._optimizer_time = 0.0
        self.step_stats = [*self.step_stats[-999:], row]
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
        if self.streamer is not None:
            self.streamer.pre_backward()

    def post_backward(self, closure_loss: Tensor) -> None:
        if self.streamer is not None:
            self.streamer.post_backward()
        self._backward_end = time.perf_counter()
        super().post_backward(closure_loss)

    # ------------------------------------------------------------------ checkpoints and teardown
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The full fp32 state: offloaded parameters read from their host masters."""
        if self.streamer is not None:
            self.streamer.release_all()
        return super().lightning_module_state_dict()

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """Weights load into the host masters and resident parameters in place; bf16 stream copies are re-made."""
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
        if self.streamer is not None:
            self.streamer.remove()
            self.streamer = None
        self.precision_plugin.teardown()
        assert self.accelerator is not None
        self.accelerator.teardown()
        self.checkpoint_io.teardown()


StrategyRegistry.register(SelectiveOffloadStrategy.strategy_name, SelectiveOffloadStrategy,
                          description="m6lit selective CPU offload: chosen modules in host memory, streamed just in "
                                      "time", override=True)

__all__ = ["SelectiveOffloadStrategy", "state_to_param_devices", "use_fused_adam"]
