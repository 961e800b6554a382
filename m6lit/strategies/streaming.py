"""ParamStreamer: keep chosen modules' parameters in host memory and stream them to the compute device just in time.

Each streamed module (a *unit*) owns, per stream dtype, one flat fp32 **master** buffer in host memory (pinned
where CUDA is present) whose views are the parameters' `.data` between uses, one flat buffer on the compute device
whose storage is allocated only while the unit is *live*, and a flat fp32 gradient accumulator on the host.

- Forward: a unit's forward pre-hook makes it live (waits for its prefetch, or copies now) and prefetches the next
  `prefetch` streamed units of the previous pass's call order on a side stream; the post-hook releases the device
  storage unless the unit is used again within the prefetch window (a shared block used by consecutive layers is
  not re-streamed). Parameters that autocast would cast to bf16 anyway (matmul weights) are streamed as bf16 copies
  (half the bytes, the same numbers); everything else streams in fp32.
- Backward: tensors that autograd saves from a unit's device storage are tagged (saved-tensor hooks); unpacking one
  makes the unit live again (the storage is re-filled in place, so saved views stay valid) and prefetches the units
  before it in reverse order. After the last gradient of a unit accumulates, its gradients are copied to the host
  on a second side stream and its device storage is released.
- `post_backward()` waits for those copies, adds them into the fp32 accumulators (gradient accumulation) and points
  each parameter's `.grad` at its host accumulator, so clipping and the optimizer see ordinary host gradients and
  step the fp32 masters where they live.

Without CUDA the same code runs with host and compute device both the CPU: copies are synchronous and "device"
storage is a second CPU buffer, so every path is testable on any machine.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from m6lit.model.block import checkpoint_phase
from m6lit.model.moe import GroupedExperts

_TAG = object()
ALIGN = 64  # elements: every parameter view starts 128-byte aligned (bf16) or better
LOW_PRECISION_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def autocast_consumed(module: nn.Module, name: str) -> bool:
    """True for parameters that bf16 autocast casts before use (so a bf16 stream copy changes no number):
    weights and biases of linear/conv layers and the expert matrices of `GroupedExperts`."""
    if isinstance(module, LOW_PRECISION_MODULES):
        return name in ("weight", "bias")
    if isinstance(module, GroupedExperts):
        return name in ("w_gate", "w_up", "w_down")
    return False


def register_host_memory(tensor: Tensor) -> bool:
    """Page-lock `tensor`'s memory in place (exact size: the caching pinned allocator rounds up to a power of two).
    Returns False when CUDA is absent or registration fails."""
    if not torch.cuda.is_available() or tensor.numel() == 0:
        return False
    err = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), tensor.numel() * tensor.element_size(), 0)
    return int(getattr(err, "value", err)) == 0


def unregister_host_memory(tensor: Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())


@dataclass
class StreamStats:
    """Counters since the last `collect_stats`: bytes each way, copies issued, time the compute waited for copies
    (`stall_s`), time the host waited for gradient copies (`host_wait_s`), and host time adding gradients into
    the fp32 accumulators (`accumulate_s`) and re-making bf16 stream copies (`refresh_s`), and time the main thread
    waited for the host engine to finish a unit before fetching it (`engine_wait_s`, the exposed host time)."""

    h2d_bytes: int = 0
    d2h_bytes: int = 0
    fetches: int = 0
    stall_s: float = 0.0
    host_wait_s: float = 0.0
    accumulate_s: float = 0.0
    refresh_s: float = 0.0
    engine_wait_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {"h2d_bytes": float(self.h2d_bytes), "d2h_bytes": float(self.d2h_bytes), "fetches": float(self.fetches),
                "stall_s": self.stall_s, "host_wait_s": self.host_wait_s, "accumulate_s": self.accumulate_s,
                "refresh_s": self.refresh_s, "engine_wait_s": self.engine_wait_s}


@dataclass
class _Group:
    """The parameters of one unit that stream in one dtype, laid out in flat buffers."""

    dtype: torch.dtype
    params: list[nn.Parameter]
    names: list[str]
    offsets: list[int]
    numel: int
    master: Tensor
    staging: Tensor  # what is copied to the device: `master` itself for fp32, a bf16 copy otherwise
    device_flat: Tensor
    master_views: list[Tensor] = field(default_factory=list)
    device_views: list[Tensor] = field(default_factory=list)
    staging_valid: bool = True
    device_full: Tensor | None = None  # fp32 device storage for low-precision groups used outside autocast
    full_views: list[Tensor] = field(default_factory=list)
    acc: Tensor | None = None
    stage32: Tensor | None = None
    had_grad: list[bool] = field(default_factory=list)
    got_grad: list[bool] = field(default_factory=list)
    target: Tensor | None = None
    grad32: Tensor | None = None  # lean layout: pinned landing buffer of fp32-streamed gradients
    pending: Tensor | None = None  # delayed update: the fp32 gradient the engine applies while the next step runs
    dev_grad: Tensor | None = None  # GPU step window: the fp32 gradients kept on the device for a device step
    pending_has: list[bool] = field(default_factory=list)
    acc_has: list[bool] = field(default_factory=list)
    norms: list[Tensor | None] = field(default_factory=list)

    def views(self, flat: Tensor) -> list[Tensor]:
        return [flat[o:o + p.numel()].view(p.shape) for o, p in zip(self.offsets, self.params)]

    @property
    def low_precision(self) -> bool:
        return self.staging is not self.master

    @property
    def stream_nbytes(self) -> int:
        return self.numel * self.device_flat.element_size()

    def device_target(self, full: bool) -> tuple[Tensor, list[Tensor]]:
        """The device storage (and parameter views) to fill: the stream-dtype one, or an fp32 one when a
        low-precision group is used outside autocast."""
        if not (full and self.low_precision):
            return self.device_flat, self.device_views
        if self.device_full is None:
            self.device_full = torch.empty(self.numel, dtype=self.master.dtype, device=self.device_flat.device)
            self.full_views = self.views(self.device_full)
            self.device_full.untyped_storage().resize_(0)
        return self.device_full, self.full_views

    def device_flats(self) -> list[Tensor]:
        return [t for t in (self.device_flat, self.device_full) if t is not None]

    def host_buffers(self) -> list[Tensor]:
        out = [self.master] + ([self.staging] if self.staging is not self.master else [])
        return out + [t for t in (self.acc, self.stage32, self.grad32, self.pending) if t is not None]

    def host_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.host_buffers())

    def pinned_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.host_buffers() if t.is_pinned())

    def copied_nbytes(self) -> int:
        """Bytes of the buffers that cross PCIe (the stream copy and the gradient landing): what is pinned under CUDA
        in the lean layout."""
        copied = [self.staging] + ([self.grad32] if self.grad32 is not None else [])
        return sum(t.numel() * t.element_size() for t in copied)


@dataclass
class StreamUnit:
    """One streamed module: its groups, hook handles and live state."""

    index: int
    name: str
    module: nn.Module
    groups: list[_Group]
    pinned: bool
    live: bool = False
    full: bool = False  # live (or last used) in fp32 rather than the low-precision stream dtype
    ready: Any = None  # CUDA event recorded after the H2D copy
    need_events: list[tuple[Any, Any]] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)
    pending: set[int] = field(default_factory=set)
    grads_done: bool = False
    registered: list[Tensor] = field(default_factory=list)
    ticket: Any = None  # the host engine's last task for this unit: the fetch waits for it
    d2h_done: Any = None  # CUDA event after the unit's last gradient copy of this backward
    gpu_done: Any = None  # CUDA event after a device step's results were copied back to the host
    gpu_staging: Any = None  # CUDA event after a device step's stream copy was copied back
    grads_reported: bool = False

    @property
    def stream_nbytes(self) -> int:
        return sum(g.stream_nbytes for g in self.groups)

    def live_nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for g in self.groups for t in g.device_flats())

    @property
    def numel(self) -> int:
        return sum(g.numel for g in self.groups)

    def parameters(self) -> Iterable[nn.Parameter]:
        for g in self.groups:
            yield from g.params


class ParamStreamer:
    """Streams the parameters of `units` ((name, module) pairs, disjoint) between host and `device`.

    Args:
        units: modules whose parameters live in host memory; their buffers are left alone (the caller keeps them on
            the device). Parameters whose id is in `keep` are not streamed either.
        device: the compute device (CUDA, or CPU for the host-only path).
        prefetch: how many streamed units ahead (forward) or behind (backward) to copy while computing.
        pin_memory: page-lock the host buffers when CUDA is present (required for asynchronous copies).
        low_precision: the autocast dtype (bf16) when training under autocast: parameters that autocast consumes in
            that dtype (`autocast_consumed`) stream as copies in it; None streams everything in its own dtype.
        shared: names of units that run more than once per pass (shared blocks). They stream in full precision: a
            bf16 leaf would sum its per-use gradients in bf16, where autocast's per-use casts sum them in fp32.
        lean: the host engine's layout (`host_engine.HostEngine` steps the units): only what is copied is pinned
            (bf16 stream copies, fp32-streamed masters and their gradient landing buffers), gradients are not exposed
            as `.grad` but left where they land for the engine, each parameter's gradient norm is taken on the
            device before its copy, and there is no fp32 accumulator unless `accumulate`.
        accumulate: (lean) gradients of several micro-batches add up in host fp32 accumulators.
        delayed: (lean) the layout of the one-step delayed update: every group streams from its own copy (fp32
            groups get an fp32 stream copy apart from the master, which the engine updates while the copy is in
            use) and keeps an fp32 stash of the gradient that the next step applies.
    """

    def __init__(self, units: Sequence[tuple[str, nn.Module]], device: torch.device, *, prefetch: int = 1,
                 pin_memory: bool = True, low_precision: torch.dtype | None = None,
                 keep: set[int] | None = None, shared: Iterable[str] = (), lean: bool = False,
                 accumulate: bool = False, delayed: bool = False) -> None:
        if prefetch < 0:
            raise ValueError(f"ParamStreamer prefetch={prefetch}: must be >= 0")
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.prefetch = prefetch
        self.pin_memory = pin_memory and self.cuda
        self.low_precision = low_precision
        self.keep = set(keep or ())
        self.shared = set(shared)
        self.lean = lean
        self.accumulate = accumulate
        self.delayed = delayed and lean
        self.on_unit_grads: Callable[[StreamUnit], None] | None = None
        # data parallel: starts a gradient's average over ranks, returns what waits for it (see `_average`)
        self.reduce_grad: Callable[[Tensor], Callable[[], Tensor]] | None = None
        self.device_grad_units: set[int] = set()  # units whose gradients stay on the device (GPU step window)
        self.units: list[StreamUnit] = []
        self.stats = StreamStats()
        self._slot: dict[int, tuple[StreamUnit, _Group, int]] = {}
        self._live_ptrs: dict[int, StreamUnit] = {}
        self._trace: list[int] = []
        self._prev_trace: list[int] = []
        self._following = True
        self._hook_stack: list[Any] = []
        self._backward_callback_queued = False
        self._in_backward = False
        self._checkpointed_uses: list[tuple[int, int]] = []  # (trace position, unit) of uses under checkpointing
        self._recompute_pos: int | None = None
        self._by_index: dict[int, StreamUnit] = {}
        self._next_index = 0
        if self.cuda:
            self.h2d_stream = torch.cuda.Stream(self.device)
            self.d2h_stream = torch.cuda.Stream(self.device)
        for name, module in units:
            self.add_unit(name, module)

    # ------------------------------------------------------------------ building and removing units
    def add_unit(self, name: str, module: nn.Module) -> StreamUnit:
        """Move `module`'s parameters (except `keep`) into new host buffers and install the streaming hooks."""
        owned = {id(p) for p in self.parameters()}
        by_dtype: dict[torch.dtype, list[tuple[str, nn.Parameter]]] = {}
        seen: set[int] = set()
        for mod_name, mod in module.named_modules():
            for p_name, p in mod.named_parameters(recurse=False):
                if id(p) in seen or id(p) in self.keep:
                    continue
                if id(p) in owned:
                    raise ValueError(f"ParamStreamer: parameter {name}.{mod_name}.{p_name} already belongs to "
                                     f"another streamed unit; units must be disjoint")
                if not p.is_floating_point():
                    raise ValueError(f"ParamStreamer: parameter {name}.{mod_name}.{p_name} is {p.dtype}; only "
                                     f"floating-point parameters can be streamed")
                seen.add(id(p))
                lp = (self.low_precision is not None and name not in self.shared
                      and autocast_consumed(mod, p_name))
                dtype = self.low_precision if lp else p.dtype
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                by_dtype.setdefault(dtype, []).append((full, p))
        unit = StreamUnit(index=self._next_index, name=name, module=module, groups=[], pinned=False)
        self._next_index += 1
        for dtype, items in by_dtype.items():
            unit.groups.append(self._build_group(unit, dtype, items))
        unit.pinned = self.pin_memory and all(g.staging.is_pinned() for g in unit.groups)
        self.units.append(unit)
        self._by_index[unit.index] = unit
        for g in unit.groups:
            for i, p in enumerate(g.params):
                self._slot[id(p)] = (unit, g, i)
                if p.requires_grad:
                    unit.handles.append(p.register_post_accumulate_grad_hook(self._grad_ready))
        unit.handles.append(module.register_forward_pre_hook(self._make_pre_hook(unit)))
        unit.handles.append(module.register_forward_hook(self._make_post_hook(unit), always_call=True))
        return unit

    def _build_group(self, unit: StreamUnit, dtype: torch.dtype,
                     items: list[tuple[str, nn.Parameter]]) -> _Group:
        params = [p for _, p in items]
        offsets, total = [], 0
        for p in params:
            offsets.append(total)
            total += -(-p.numel() // ALIGN) * ALIGN  # aligned views: vectorised kernels and grouped_mm need it
        master_dtype = params[0].dtype
        if any(p.dtype != master_dtype for p in params):
            raise ValueError(f"ParamStreamer: unit {unit.name} mixes parameter dtypes in one stream group")
        own_copy = dtype != master_dtype or self.delayed
        copied = not own_copy or not self.lean  # the lean layout pins only what crosses PCIe
        master = self._host_empty(unit, total, master_dtype, pin=copied).zero_()
        staging = self._host_empty(unit, total, dtype).zero_() if own_copy else master
        device_flat = torch.empty(total, dtype=dtype, device=self.device)
        group = _Group(dtype=dtype, params=params, names=[n for n, _ in items], offsets=offsets, numel=total,
                       master=master, staging=staging, device_flat=device_flat)
        group.master_views = group.views(master)
        group.device_views = group.views(device_flat)
        device_flat.untyped_storage().resize_(0)
        with torch.no_grad():
            for view, p in zip(group.master_views, params):
                view.copy_(p.data)
                p.data = view
                if p.grad is not None:
                    p.grad = None
        group.staging_valid = staging is master
        group.had_grad = [False] * len(params)
        group.got_grad = [False] * len(params)
        group.acc_has = [False] * len(params)
        group.norms = [None] * len(params)
        if self.lean:
            if not group.low_precision:
                group.grad32 = self._host_empty(unit, total, master_dtype).zero_()
            if self.accumulate:
                group.acc = self._host_empty(unit, total, master_dtype, pin=False).zero_()
            if self.delayed:
                group.pending = self._host_empty(unit, total, master_dtype, pin=False).zero_()
                group.pending_has = [False] * len(params)
        return group

    def _host_empty(self, unit: StreamUnit, numel: int, dtype: torch.dtype, pin: bool = True) -> Tensor:
        tensor = torch.empty(numel, dtype=dtype)
        if not (pin and self.pin_memory):
            return tensor
        if not register_host_memory(tensor):
            return torch.empty(numel, dtype=dtype, pin_memory=True)
        unit.registered.append(tensor)
        return tensor

    def remove_unit(self, unit: StreamUnit, to_device: bool = False) -> None:
        """Uninstall a unit's hooks and free its device storage. Its parameters keep their host values (moved to the
        compute device when `to_device`); its host buffers are unpinned and freed once nothing references them."""
        self._release(unit)
        for handle in unit.handles:
            handle.remove()
        unit.handles.clear()
        for g in unit.groups:
            for p in g.params:
                self._slot.pop(id(p), None)
                if to_device:
                    p.data = p.data.to(self.device, copy=True)
                    if p.grad is not None:
                        p.grad = p.grad.to(self.device)
        for tensor in unit.registered:
            unregister_host_memory(tensor)
        unit.registered.clear()
        self.units.remove(unit)
        self._by_index.pop(unit.index, None)

    def remove(self) -> None:
        """Uninstall every unit (parameters stay in host memory)."""
        for unit in list(self.units):
            self.remove_unit(unit)

    # ------------------------------------------------------------------ queries
    def parameters(self) -> list[nn.Parameter]:
        return [p for u in self.units for p in u.parameters()]

    def is_streamed(self, p: nn.Parameter) -> bool:
        return id(p) in self._slot

    def unit_of(self, p: nn.Parameter) -> StreamUnit:
        return self._slot[id(p)][0]

    def live_device_bytes(self) -> int:
        """Bytes of device storage currently held by streamed units (0 between steps)."""
        return sum(u.live_nbytes() for u in self.units)

    def host_bytes(self) -> int:
        return sum(g.host_nbytes() for u in self.units for g in u.groups)

    def pinned_bytes(self) -> int:
        return sum(g.pinned_nbytes() for u in self.units for g in u.groups)

    def copied_bytes(self) -> int:
        return sum(g.copied_nbytes() for u in self.units for g in u.groups)

    def forward_order(self) -> list[StreamUnit]:
        """Units in the order the last pass first used them, then any not used."""
        order = [self._by_index[i] for i in dict.fromkeys(self._prev_trace or self._trace) if i in self._by_index]
        seen = {id(u) for u in order}
        return order + [u for u in self.units if id(u) not in seen]

    # ------------------------------------------------------------------ passes and state changes
    def begin_pass(self) -> None:
        """Start a new pass (a training, validation or prediction step): the last pass's unit order becomes the
        prefetch schedule, and any unit still live is released."""
        self.release_all()
        if self._trace:
            self._prev_trace = self._trace
        self._trace = []
        self._checkpointed_uses = []
        self._following = True
        self._recompute_pos = None

    def release_all(self) -> None:
        for unit in self.units:
            self._release(unit)

    def mark_dirty(self) -> None:
        """The masters changed (optimizer step, checkpoint load): bf16 stream copies must be re-made."""
        for u in self.units:
            for g in u.groups:
                if g.staging is not g.master:
                    g.staging_valid = False

    def refresh(self) -> None:
        """Re-make every stale bf16 stream copy from its master now (instead of at the next fetch)."""
        for u in self.units:
            for g in u.groups:
                self._refresh_group(g)

    def _refresh_group(self, g: _Group) -> None:
        if not g.staging_valid:
            start = time.perf_counter()
            with torch.no_grad():
                g.staging.copy_(g.master)
            g.staging_valid = True
            self.stats.refresh_s += time.perf_counter() - start

    # ------------------------------------------------------------------ fetch and release
    def _fetch(self, unit: StreamUnit, full: bool | None = None) -> None:
        """Allocate the unit's device storage and issue its copy (on the side stream under CUDA). `full` picks fp32
        over the low-precision stream dtype (default: the unit's mode at its last forward)."""
        full = unit.full if full is None else full
        if unit.live:
            if full == unit.full:
                return
            self._release(unit)
        if self.lean:
            self.await_unit(unit)
        ready = unit.gpu_done if full else (unit.gpu_staging or unit.gpu_done)
        if self.cuda and ready is not None:
            self.h2d_stream.wait_event(ready)
        unit.full = full
        plan = []
        for g in unit.groups:
            flat, views = g.device_target(full)
            if full or (g.target is g.staging and g.low_precision):
                src = g.master  # fp32 wanted, or gradients are landing in the bf16 copy: read the master
            else:
                self._refresh_group(g)
                src = g.staging
            plan.append((g, flat, views, src))
        start = time.perf_counter()
        if self.cuda:
            compute = torch.cuda.current_stream(self.device)
            for _, flat, _, _ in plan:
                flat.untyped_storage().resize_(flat.numel() * flat.element_size())
            allocated = torch.cuda.Event()
            allocated.record(compute)
            self.h2d_stream.wait_event(allocated)
            with torch.cuda.stream(self.h2d_stream):
                for _, flat, _, src in plan:
                    flat.copy_(src, non_blocking=True)
                unit.ready = torch.cuda.Event(enable_timing=True)
                unit.ready.record()
        else:
            with torch.no_grad():
                for _, flat, _, src in plan:
                    flat.untyped_storage().resize_(flat.numel() * flat.element_size())
                    flat.copy_(src)
            self.stats.stall_s += time.perf_counter() - start
        for g, flat, views, src in plan:
            for view, p in zip(views, g.params):
                p.data = view
            ptr = flat.untyped_storage().data_ptr()
            if ptr:
                self._live_ptrs[ptr] = unit
            self.stats.h2d_bytes += src.numel() * src.element_size()
        unit.live = True
        self.stats.fetches += 1

    def await_unit(self, unit: StreamUnit) -> None:
        """Wait until the host engine has finished with the unit (its masters and stream copies are current)."""
        ticket = unit.ticket
        if ticket is not None:
            start = time.perf_counter()
            ticket.wait()
            self.stats.engine_wait_s += time.perf_counter() - start
            unit.ticket = None

    def _ensure_live(self, unit: StreamUnit, full: bool | None = None) -> None:
        """Make the unit usable on the current stream: fetch it if needed, then wait for its copy."""
        self._fetch(unit, full)
        if self.cuda and unit.ready is not None:
            compute = torch.cuda.current_stream(self.device)
            need = torch.cuda.Event(enable_timing=True)
            need.record(compute)
            compute.wait_event(unit.ready)
            unit.need_events.append((need, unit.ready))

    def _release(self, unit: StreamUnit) -> None:
        if not unit.live:
            return
        if self.cuda and unit.ready is not None:
            # the memory returns to the compute stream's pool: order it after the copy (a prefetch may be unused)
            torch.cuda.current_stream(self.device).wait_event(unit.ready)
        for g in unit.groups:
            for view, p in zip(g.master_views, g.params):
                p.data = view
            for flat in g.device_flats():
                self._live_ptrs.pop(flat.untyped_storage().data_ptr(), None)
                flat.untyped_storage().resize_(0)
        unit.live = False

    def _full_precision_now(self) -> bool:
        """Whether a forward now needs fp32 weights: no low-precision streaming, or autocast to it is off."""
        if self.low_precision is None:
            return False
        kind = self.device.type
        return not (torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == self.low_precision)

    def _prefetch(self, indices: Iterable[int], full: bool | None = None) -> None:
        """Issue copies for the units at these trace positions (skipping live ones and, during backward, units whose
        gradients are already done)."""
        for idx in indices:
            unit = self._by_index.get(idx)
            if unit is None or (unit.grads_done and self._in_backward):
                continue
            self._fetch(unit, full)

    # ------------------------------------------------------------------ forward hooks
    def _make_pre_hook(self, unit: StreamUnit) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: Any) -> None:
            phase = checkpoint_phase()
            if phase == "recompute":
                self._hook_stack.append(None)
                self._refetch_for_recompute(unit)
                return
            pos = len(self._trace)
            self._trace.append(unit.index)
            if len(self._trace) > 1_000_000:
                self._trace = self._trace[-1:]
                self._checkpointed_uses = []
                pos = 0
            if phase == "forward":
                self._checkpointed_uses.append((pos, unit.index))
            full = self._full_precision_now()
            self._ensure_live(unit, full)
            prev = self._prev_trace
            if self._following and pos < len(prev) and prev[pos] == unit.index:
                self._prefetch(prev[pos + 1:pos + 1 + self.prefetch], full)
            else:
                self._following = False
            if torch.is_grad_enabled() and phase is None:  # under checkpointing, checkpoint's own hooks must save
                hooks = torch.autograd.graph.saved_tensors_hooks(self._pack_for(unit, pos), self._unpack)
                hooks.__enter__()
                self._hook_stack.append(hooks)
            else:
                self._hook_stack.append(None)
        return pre_hook

    def _make_post_hook(self, unit: StreamUnit) -> Callable[..., None]:
        def post_hook(module: nn.Module, args: Any, output: Any) -> None:
            hooks = self._hook_stack.pop() if self._hook_stack else None
            if hooks is not None:
                hooks.__exit__(None, None, None)
            if checkpoint_phase() == "recompute":
                return  # backward reads the recomputed tensors next; the unit goes once its gradients are done
            pos = len(self._trace) - 1
            prev = self._prev_trace
            window = prev[pos + 1:pos + 1 + max(self.prefetch, 1)] if self._following else []
            if unit.index in window:
                return  # used again within the prefetch window: keep it live
            if torch.is_grad_enabled() and self._following and len(prev) - 1 - pos < max(self.prefetch, 1):
                return  # among the last units of the pass: backward needs it next
            self._release(unit)
        return post_hook

    def _refetch_for_recompute(self, unit: StreamUnit) -> None:
        """A checkpointed block re-runs during backward: make the unit live again and prefetch the units the
        forward ran before this use (recomputes come in reverse forward order: walk the checkpointed uses back)."""
        self._note_backward()
        uses = self._checkpointed_uses
        end = len(uses) if self._recompute_pos is None else self._recompute_pos
        i = next((i for i in range(end - 1, -1, -1) if uses[i][1] == unit.index), None)
        self._ensure_live(unit, self._full_precision_now())
        if i is not None:
            self._recompute_pos = i
            pos = uses[i][0]
            self._prefetch(self._trace[p] for p in range(pos - 1, max(pos - 1 - self.prefetch, -1), -1)
                           if p < len(self._trace))

    # ------------------------------------------------------------------ backward hooks
    def _pack_for(self, unit: StreamUnit, pos: int) -> Callable[[Tensor], Any]:
        def pack(t: Tensor) -> Any:
            if t.device != self.device or t.layout != torch.strided:
                return t
            owner = self._live_ptrs.get(t.untyped_storage().data_ptr())
            if owner is None:
                return t
            return (_TAG, owner, pos, t)
        return pack

    def _unpack(self, packed: Any) -> Tensor:
        if not (isinstance(packed, tuple) and len(packed) == 4 and packed[0] is _TAG):
            return packed
        _, unit, pos, tensor = packed
        self._note_backward()
        if unit.index in self._by_index:
            self._ensure_live(unit)
            self._prefetch(self._trace[p] for p in range(pos - 1, max(pos - 1 - self.prefetch, -1), -1))
        return tensor

    def _note_backward(self) -> None:
        if not self._backward_callback_queued:
            self._backward_callback_queued = True
            self._in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)

    def _backward_done(self) -> None:
        self._backward_callback_queued = False
        self._in_backward = False
        self._recompute_pos = None
        self.release_all()

    def _grad_ready(self, p: Tensor) -> None:
        slot = self._slot.get(id(p))
        if slot is None or p.grad is None:
            return
        unit, g, i = slot
        self._note_backward()
        if unit.index in self.device_grad_units:
            self._keep_on_device(unit, g, i, p)
            return
        target = g.target if g.target is not None else self._choose_target(unit, g)
        view = target[g.offsets[i]:g.offsets[i] + p.numel()].view(p.shape)
        grad = p.grad
        if self.reduce_grad is not None:
            grad = self._average(grad, g, i)
        elif self.lean and not self.accumulate:
            g.norms[i] = self._norm(grad)
        if self.cuda:
            self.d2h_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.d2h_stream):
                view.copy_(grad, non_blocking=True)
            grad.record_stream(self.d2h_stream)
        else:
            with torch.no_grad():
                view.copy_(grad)
        p.grad = None
        g.got_grad[i] = True
        self.stats.d2h_bytes += grad.numel() * grad.element_size()
        unit.pending.discard(id(p))
        if not unit.pending:
            unit.grads_done = True
            self._release(unit)
            if self.lean:
                self._report_grads(unit)

    def _average(self, grad: Tensor, g: _Group, i: int) -> Tensor:
        """Data parallel: start the gradient's all-reduce (`reduce_grad`), then wait for it and take the norm of the
        average. Under CUDA both happen on the copy stream, so the compute stream goes on with backward while the
        collective runs; on the CPU path the wait blocks."""
        assert self.reduce_grad is not None
        finish = self.reduce_grad(grad)
        if self.cuda:
            self.d2h_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.d2h_stream) if self.cuda else contextlib.nullcontext():
            grad = finish()
            if self.lean and not self.accumulate:
                g.norms[i] = self._norm(grad)
        return grad

    def _keep_on_device(self, unit: StreamUnit, g: _Group, i: int, p: Tensor) -> None:
        """GPU step window: the gradient stays on the device, upcast into the unit's fp32 device buffer."""
        if g.dev_grad is None:
            g.dev_grad = torch.zeros(g.numel, dtype=g.master.dtype, device=self.device)
        grad = p.grad
        g.norms[i] = self._norm(grad)
        with torch.no_grad():
            g.dev_grad[g.offsets[i]:g.offsets[i] + p.numel()].view(p.shape).copy_(grad)
        p.grad = None
        g.got_grad[i] = True
        unit.pending.discard(id(p))
        if not unit.pending:
            unit.grads_done = True
            self._release(unit)

    def _norm(self, grad: Tensor) -> Tensor:
        """The gradient's 2-norm in fp32 on the compute stream (on the CPU path from an fp32 copy, so it is the very
        number `get_total_norm` computes from the host fp32 gradient)."""
        if self.cuda:
            return torch.linalg.vector_norm(grad, dtype=torch.float32)
        return torch.linalg.vector_norm(grad.float())

    def _report_grads(self, unit: StreamUnit) -> None:
        if unit.grads_reported:
            return
        unit.grads_reported = True
        if self.cuda:
            unit.d2h_done = torch.cuda.Event()
            unit.d2h_done.record(self.d2h_stream)
        if self.on_unit_grads is not None:
            self.on_unit_grads(unit)

    def _choose_target(self, unit: StreamUnit, g: _Group) -> Tensor:
        """Where this backward's gradients land on the host: the bf16 stream copy (then upcast), the fp32
        accumulator itself, or an fp32 stage when adding to gradients already accumulated (lean layout: the bf16 stream
        copy or the fp32 landing buffer; the engine accumulates)."""
        if self.lean:
            if g.low_precision:
                g.staging_valid = False
                g.target = g.staging
            else:
                g.target = g.grad32
            return g.target
        if g.acc is None:
            g.acc = self._host_empty(unit, g.numel, g.master.dtype).zero_()  # pinned: fp32 gradients land here
        if g.staging is not g.master:
            g.staging_valid = False
            g.target = g.staging
        elif any(g.had_grad):
            if g.stage32 is None:
                g.stage32 = self._host_empty(unit, g.numel, g.master.dtype)
            g.target = g.stage32
        else:
            g.target = g.acc
        return g.target

    def pre_backward(self) -> None:
        """Call before each backward: host gradients from earlier micro-batches are held aside (autograd would
        otherwise add device gradients into them) and each unit expects its trainable parameters' gradients."""
        for u in self.units:
            u.pending = {id(p) for p in u.parameters() if p.requires_grad}
            u.grads_done = False
            u.grads_reported = False
            if self.lean:
                self.await_unit(u)  # a landing from the last micro-batch must be done before this one's copies
            for g in u.groups:
                g.norms = [None] * len(g.params)
                g.had_grad = [p.grad is not None for p in g.params]
                g.got_grad = [False] * len(g.params)
                g.target = None
                for p in g.params:
                    p.grad = None

    def post_backward(self) -> None:
        """Call after each backward: wait for the gradient copies and expose host fp32 gradients as `.grad`."""
        self._backward_callback_queued = False
        self._in_backward = False
        self.release_all()
        if self.lean:
            for u in self.units:
                if any(any(g.got_grad) for g in u.groups):
                    self._report_grads(u)
                for g in u.groups:
                    g.target = None
            self.begin_pass()
            return
        start = time.perf_counter()
        if self.cuda:
            self.d2h_stream.synchronize()
            self.h2d_stream.synchronize()
        self.stats.host_wait_s += time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            for u in self.units:
                for g in u.groups:
                    self._accumulate(g)
        self.stats.accumulate_s += time.perf_counter() - start
        self.begin_pass()

    def _accumulate(self, g: _Group) -> None:
        acc, src = g.acc, g.target
        if any(g.got_grad) and acc is not None and src is not None and src is not acc:
            if all(g.got_grad) and not any(g.had_grad):
                acc.copy_(src)
            elif all(g.got_grad) and all(g.had_grad):
                acc.add_(src)
            else:
                for i, (o, p) in enumerate(zip(g.offsets, g.params)):
                    if g.got_grad[i]:
                        part = src[o:o + p.numel()]
                        if g.had_grad[i]:
                            acc[o:o + p.numel()].add_(part)
                        else:
                            acc[o:o + p.numel()].copy_(part)
        views = g.views(acc) if acc is not None else [None] * len(g.params)
        for p, view, had, got in zip(g.params, views, g.had_grad, g.got_grad):
            p.grad = view if (had or got) else None
        g.target = None

    def backward(self, loss: Tensor) -> None:
        """`loss.backward()` bracketed by `pre_backward` and `post_backward` (for use outside Lightning)."""
        self.pre_backward()
        loss.backward()
        self.post_backward()

    # ------------------------------------------------------------------ statistics
    def collect_stats(self) -> StreamStats:
        """Counters since the last call (then reset). Under CUDA the stall is measured with events: for each use,
        how long after the compute stream reached it the copy finished; call after a synchronisation."""
        for u in self.units:
            for need, ready in u.need_events:
                if ready.query() and need.query():
                    self.stats.stall_s += max(0.0, need.elapsed_time(ready)) / 1000.0
            u.need_events.clear()
        stats, self.stats = self.stats, StreamStats()
        return stats


__all__ = ["ParamStreamer", "StreamStats", "StreamUnit", "autocast_consumed", "register_host_memory"]
