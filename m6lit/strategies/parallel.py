"""Many-GPU strategies on PyTorch's and Lightning's own engines: FSDP2 and expert parallelism.

`FSDP2Strategy` (short name `m6_fsdp`) is Lightning's `ModelParallelStrategy` with the parallelize step built in:
`fully_shard` per physical block and on the model root, optional activation checkpointing per block
(`torch.distributed._composable.checkpoint`, which keeps parameter names), FSDP2's own `CPUOffloadPolicy` for the
blocks named by offload patterns (the offload strategy's pattern language, `resolve_offload`), and a
`MixedPrecisionPolicy` from the trainer precision. Checkpoints are Lightning's distributed checkpoints (a folder);
a resume restores before setup (as DDP does), so the module rebuilds the checkpoint's structure (delinked blocks,
expert shapes) on the unsharded model, and the shards load once the model is sharded.

`ExpertParallelStrategy` (short name `m6_ep`) is Lightning's `DDPStrategy` with the experts of every MoE layer sharded
over the `expert` dimension of a DeviceMesh (`expert_data` × `expert`): dense parameters stay data-parallel under
DDP, expert gradients are summed over the `expert_data` dimension only (never all-reduced with the dense ones), and
checkpoints hold the full experts, so a resume at another expert-parallel size re-shards them.

Structural changes mid-run go through `m6lit.structure.apply_structure_change`, which calls
`before_parameters_change(model, op)` before the pure op and `on_parameters_changed(param_map)` after the optimizer
rewrite. FSDP2: the blocks the op replaces are gathered into plain blocks built from the config holding the full
tensors (on the host), with the optimizer pointing at them and holding their full state; afterwards every plain
block is sharded again (same mesh, mixed precision, activation checkpointing, offload patterns resolved against the
new structure), its optimizer state moved to the matching DTensor shards, and the root FSDP state re-runs its lazy
initialisation to register the new units. A block whose FSDP unit no longer manages its parameters is an error,
never a stale wrapper. Expert parallel: a delink keeps each clone's expert slice and rebuilds DDP; an expert op
gathers the changed layers' experts (and their optimizer state) first and re-shards them for the new count after,
or fails before changing anything when the expert-parallel size does not divide that count (checked at setup for
an `ExpertSplitMerge` schedule too).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.init import _materialize_distributed_module
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from m6lit.model.expert_parallel import (EXPERT_PARAMS, ExpertParallel, expert_slice, gather_expert_tensor, moe_layers,
                                         shard_experts)
from m6lit.strategies.patterns import resolve_offload

EXPERT_OPS = ("split", "merge", "segment")


def _sharded_root(lightning_module: nn.Module, strategy: str) -> nn.Module:
    """The module whose `blocks` are the physical blocks (`M6LitModule.model`)."""
    root = getattr(lightning_module, "model", None)
    if root is None or not isinstance(getattr(root, "blocks", None), nn.ModuleList):
        raise TypeError(f"{strategy} parallelizes `<LightningModule>.model.blocks` (an nn.ModuleList of physical "
                        f"blocks); {type(lightning_module).__name__} has no such attribute")
    return root


def check_scheduled_expert_counts(trainer: Any, model: nn.Module, done_step: int, expert_parallel_size: int) -> None:
    """Fail at setup, before any step, when an `ExpertSplitMerge` entry after `done_step` would leave a layer with
    an expert count the expert-parallel size does not divide (the same shape rule the ops apply, layer by layer)."""
    from m6lit.callbacks import ExpertSplitMerge
    from m6lit.model.experts import moe_blocks_of

    config = model.config
    for cb in trainer.callbacks:
        if not isinstance(cb, ExpertSplitMerge):
            continue
        shapes = {layer: config.expert_shape(block) for layer, block in enumerate(model.layer_to_block)}
        for i, event in enumerate(cb.events):
            for layer in [layer for runs in moe_blocks_of(model, event.layers).values() for layer in runs]:
                try:
                    shapes[layer] = shapes[layer].after(event.op, event.factor, config.router, event.how)
                except ValueError:
                    return  # an invalid entry: the callback names it at fit start
                if event.step > done_step and shapes[layer].num_experts % expert_parallel_size:
                    raise ValueError(f"ExpertSplitMerge.schedule[{i}] ({event.op} x{event.factor} at step "
                                     f"{event.step}) leaves layer {layer} with {shapes[layer].num_experts} experts, "
                                     f"not divisible by expert_parallel_size={expert_parallel_size}")


def _resumed_step(trainer: Any) -> int:
    """The global step of the checkpoint this fit restored (before setup), 0 for a fresh run."""
    loaded = getattr(trainer._checkpoint_connector, "_loaded_checkpoint", None) or {}
    return int(loaded.get("global_step", 0))


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (`fully_shard`) per physical block + root, through Lightning's ModelParallelStrategy.

    Args:
        activation_checkpointing: recompute each block's activations in backward.
        cpu_offload: module patterns (as `SelectiveOffloadStrategy.offload`, e.g. `["model.blocks.[4-11]"]`) whose
            blocks FSDP2 keeps on the host (`CPUOffloadPolicy`: sharded parameters, gradients and the optimizer step
            on the CPU). A pattern may name a block or a part of one (its own FSDP unit then).
        reshard_after_forward: free each block's gathered parameters after its forward (ZeRO-3); False keeps them
            until backward (ZeRO-2-like, more memory, fewer all-gathers).
        data_parallel_size: ranks that shard the parameters; "auto" = all ranks.
        save_distributed_checkpoint: a folder of shards (True) or one consolidated file written by rank 0.

    Lightning's `ModelParallelStrategy` requires the LightningModule to override `configure_model` and parallelize
    there; this strategy parallelizes itself (the module stays placement-free), so `setup` is the parent's without
    that check.
    """

    strategy_name = "m6_fsdp"

    def __init__(self, activation_checkpointing: bool = False, cpu_offload: Optional[list[str]] = None,
                 reshard_after_forward: bool = True, data_parallel_size: Union[Literal["auto"], int] = "auto",
                 save_distributed_checkpoint: bool = True, process_group_backend: Optional[str] = None,
                 timeout: Optional[timedelta] = default_pg_timeout) -> None:
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)
        if isinstance(cpu_offload, str):
            raise TypeError(f"FSDP2Strategy.cpu_offload must be a list of patterns, got the string {cpu_offload!r}")
        self.activation_checkpointing = activation_checkpointing
        self.cpu_offload = list(cpu_offload or [])
        self.reshard_after_forward = reshard_after_forward
        self.offloaded: list[str] = []
        self._resume_path: Optional[Path] = None

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def mixed_precision_policy(self) -> Any:
        """FSDP2 casts parameters for compute and reduces gradients in fp32 under `*-mixed` precision."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        precision = str(getattr(self.precision_plugin, "precision", "32-true"))
        if precision == "bf16-mixed":
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if precision == "16-mixed":
            return MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
        return MixedPrecisionPolicy()

    def parallelize(self, lightning_module: nn.Module) -> None:
        """fully_shard each block (its offloaded parts first, after activation checkpointing), then the root."""
        from torch.distributed.fsdp import FSDPModule, fully_shard

        root = _sharded_root(lightning_module, type(self).__name__)
        if any(isinstance(m, FSDPModule) for m in root.modules()):
            raise RuntimeError(f"{type(self).__name__}: the model is already sharded (fully_shard was applied "
                               f"before the strategy's setup)")
        offload = self._resolve_offload(lightning_module)
        for index in range(len(root.blocks)):
            self._shard_block(lightning_module, index, offload)
        fully_shard(root, mesh=self.device_mesh["data_parallel"], mp_policy=self.mixed_precision_policy())
        rank_zero_info(f"{type(self).__name__}: fully_shard over {self.device_mesh['data_parallel'].size()} ranks: "
                       f"{len(root.blocks)} blocks + root, activation checkpointing "
                       f"{'on' if self.activation_checkpointing else 'off'}, CPU offload {offload or 'none'}")

    def _resolve_offload(self, lightning_module: nn.Module) -> list[str]:
        """Module names the offload patterns pick in the current structure (none on a CPU run: everything already
        lives on the host, and CPUOffloadPolicy needs an accelerator)."""
        self.offloaded = resolve_offload(lightning_module, self.cpu_offload) if self.cpu_offload else []
        return [] if self.root_device.type == "cpu" else self.offloaded

    def _shard_block(self, lightning_module: nn.Module, index: int, offload: list[str]) -> None:
        """Activation checkpointing (when on) and fully_shard for block `index`; its offloaded parts get their own
        unit with `CPUOffloadPolicy` first, an offloaded block gets the policy itself."""
        from torch.distributed._composable import checkpoint
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        block = _sharded_root(lightning_module, type(self).__name__).blocks[index]
        modules = dict(lightning_module.named_modules())
        name = next(n for n, m in modules.items() if m is block)
        common = dict(mesh=self.device_mesh["data_parallel"], mp_policy=self.mixed_precision_policy(),
                      reshard_after_forward=self.reshard_after_forward)
        for part in offload:
            if part.startswith(name + "."):  # part of a block: its own unit, inside the block's
                fully_shard(modules[part], offload_policy=CPUOffloadPolicy(), **common)
        if self.activation_checkpointing:
            checkpoint(block)
        extra = {"offload_policy": CPUOffloadPolicy()} if name in offload else {}
        fully_shard(block, **common, **extra)

    def setup(self, trainer: Any) -> None:
        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        # shard first (fully_shard moves each unit's shards to the device, or keeps offloaded ones on the host),
        # then materialise meta-initialised shards and move what is left — never the whole model on one device
        self.parallelize(self.lightning_module)
        _materialize_distributed_module(self.model, self.root_device)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)
        if self._resume_path is not None:
            self._load_sharded_state(self._resume_path)
            self._resume_path = None

    # ------------------------------------------------------------------ checkpoints
    @property
    def restore_checkpoint_after_setup(self) -> bool:
        """Restore before setup, like DDP: the module's `on_load_checkpoint` rebuilds the checkpoint's structure
        (delinked blocks, expert shapes) on the unsharded model; the shards are loaded at the end of setup."""
        return False

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """The checkpoint's metadata (everything but weights and optimizer state, which load after sharding)."""
        path = Path(self.broadcast(checkpoint_path))
        self._resume_path = path
        if path.is_dir():
            return torch.load(path / _METADATA_FILENAME, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)

    def _load_sharded_state(self, path: Path) -> None:
        from lightning.fabric.strategies.model_parallel import _load_checkpoint

        state = {"state_dict": self.model, **{f"optimizer_{i}": opt for i, opt in enumerate(self.optimizers)}}
        _load_checkpoint(path=path, state=state, strict=self.lightning_module.strict_loading,
                         optimizer_states_from_list=True, weights_only=True)

    def model_to_device(self) -> None:
        """Move what FSDP2 does not manage (the LightningModule's metrics); the sharded model stays where
        fully_shard put it (a `.to()` would pull offloaded shards onto the device)."""
        assert self.model is not None
        root = _sharded_root(self.lightning_module, type(self).__name__)
        for child in self.lightning_module.children():
            if child is not root:
                child.to(self.root_device)

    # ------------------------------------------------------------------ structural changes
    def before_parameters_change(self, model: nn.Module, op: Any) -> None:
        """Swap each block `op` replaces for a plain block built from the config holding its full tensors (on the
        host), and point the optimizer at those with full state: the pure op and the optimizer rewrite then run as
        on one device. Every rank holds the full affected blocks and their state until `on_parameters_changed`
        shards them again."""
        from torch.distributed.fsdp import FSDPModule

        root = _sharded_root(self.lightning_module, type(self).__name__)
        _reshard_all(root)  # a no-grad forward (the transaction's measurement) leaves the root unsharded
        swaps: dict[int, tuple[nn.Parameter, nn.Parameter, Any]] = {}
        for index in op.blocks(root):
            block = root.blocks[index]
            if not isinstance(block, FSDPModule):
                raise RuntimeError(f"{type(self).__name__}: blocks.{index} is not sharded (fully_shard) before a "
                                   f"structural change")
            plain = _gathered_block(root, index)
            new = dict(plain.named_parameters())
            for pname, p in block.named_parameters():
                swaps[id(p)] = (p, new[pname], _full_tensor)
            root.blocks[index] = plain
        _swap_optimizer_params(self.optimizers, swaps)

    def on_parameters_changed(self, param_map: Any = None) -> None:
        """Shard the new (plain) blocks with this strategy's mesh, mixed-precision, offload and activation
        checkpointing (offload patterns are resolved again against the new structure), move their optimizer state
        to the matching DTensor shards, and make the root FSDP module register them at its next forward. A block
        that is still an FSDP unit but no longer holds the parameters its unit manages, or a plain block holding
        shards, is an error: the change bypassed `before_parameters_change` and would train stale shards."""
        from m6lit.structure import describe_change
        from torch.distributed.fsdp import FSDPModule

        what = describe_change(param_map) if param_map is not None else "a structural change"
        module = self.lightning_module
        root = _sharded_root(module, type(self).__name__)
        for index, block in enumerate(root.blocks):
            if isinstance(block, FSDPModule):
                if not _manages_its_parameters(block):
                    raise RuntimeError(f"{type(self).__name__} cannot apply {what}: "
                                       f"blocks.{index} is an FSDP unit whose parameters were replaced without "
                                       f"gathering it first (apply structural changes through "
                                       f"m6lit.structure.apply_structure_change)")
            elif any(_is_dtensor(p) for p in block.parameters()):
                raise RuntimeError(f"{type(self).__name__} cannot apply {what}: blocks.{index} "
                                   f"holds DTensor shards outside an FSDP unit (its source was not gathered)")
        plain = [i for i, b in enumerate(root.blocks) if not isinstance(b, FSDPModule)]
        offload = self._resolve_offload(module)
        swaps: dict[int, tuple[nn.Parameter, nn.Parameter, Any]] = {}
        for index in plain:
            before = dict(root.blocks[index].named_parameters())
            self._shard_block(module, index, offload)
            after = dict(root.blocks[index].named_parameters())
            for pname, p in before.items():
                swaps[id(p)] = (p, after[pname], _shard_like(after[pname]))
        _swap_optimizer_params(self.optimizers, swaps)
        _reset_lazy_init(root)
        rank_zero_info(f"{type(self).__name__}: re-sharded blocks {plain} after {what}; CPU "
                       f"offload {offload or 'none'}")


class ExpertParallelStrategy(DDPStrategy):
    """DDP for dense parameters + experts sharded over the `expert` dimension of a DeviceMesh.

    Args:
        expert_parallel_size: ranks that share one copy of the experts (each holds E / size of every MoE layer's
            experts); "auto" = all ranks. The world size must be a multiple; the ranks of one expert group are
            consecutive (inside a node first).
        **kwargs: Lightning's DDPStrategy arguments (process_group_backend, timeout, ...).
    """

    strategy_name = "m6_ep"

    def __init__(self, expert_parallel_size: Union[Literal["auto"], int] = "auto", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if expert_parallel_size != "auto" and (not isinstance(expert_parallel_size, int) or expert_parallel_size < 1):
            raise ValueError(f"ExpertParallelStrategy.expert_parallel_size={expert_parallel_size!r}: must be a "
                             f"positive integer or 'auto'")
        self._expert_parallel_size = expert_parallel_size
        self.device_mesh: Any = None
        self.expert_names: list[str] = []

    @property
    def expert_parallel_size(self) -> int:
        size = self._expert_parallel_size
        return self.world_size if size == "auto" else int(size)

    def setup_environment(self) -> None:
        super().setup_environment()
        from torch.distributed.device_mesh import init_device_mesh

        ep = self.expert_parallel_size
        if self.world_size % ep:
            raise ValueError(f"ExpertParallelStrategy: world size {self.world_size} is not a multiple of "
                             f"expert_parallel_size={ep}")
        self.device_mesh = init_device_mesh(self.root_device.type, (self.world_size // ep, ep),
                                            mesh_dim_names=("expert_data", "expert"))

    def _shard(self) -> None:
        """Shard the experts (idempotent) and keep DDP off the expert parameters."""
        module = self.lightning_module
        self.expert_names = shard_experts(module, self.device_mesh["expert"].get_group())
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, self.expert_names)

    def setup(self, trainer: Any) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            root = _sharded_root(self.lightning_module, type(self).__name__)
            check_scheduled_expert_counts(trainer, root, _resumed_step(trainer), self.expert_parallel_size)
        self._shard()
        super().setup(trainer)

    # ------------------------------------------------------------------ gradients
    def post_backward(self, closure_loss: torch.Tensor) -> None:
        """At an optimizer-step boundary, sum expert gradients over `expert_data` and scale them as DDP scales the
        dense ones (mean over all ranks): each owner already holds the sum over its expert group's tokens."""
        super().post_backward(closure_loss)
        trainer = self.lightning_module.trainer
        if trainer.training and trainer.fit_loop._should_accumulate():
            return
        group = self.device_mesh["expert_data"].get_group()
        for p in self._expert_params():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if self.device_mesh["expert_data"].size() > 1:
                dist.all_reduce(p.grad, group=group)
            p.grad.div_(self.world_size)

    def _expert_params(self) -> list[nn.Parameter]:
        params = dict(self.lightning_module.named_parameters())
        return [params[n] for n in self.expert_names]

    def _runner_of(self) -> dict[int, ExpertParallel]:
        """id(expert parameter) → the ExpertParallel of its layer."""
        out = {}
        for _, layer in moe_layers(self.lightning_module):
            for p in layer.experts.parameters():
                out[id(p)] = layer.expert_parallel
        return out

    # ------------------------------------------------------------------ checkpoints hold the full experts
    def lightning_module_state_dict(self) -> dict[str, Any]:
        state = super().lightning_module_state_dict()
        runners = self._runner_of()
        params = dict(self.lightning_module.named_parameters())
        for name in self.expert_names:
            state[name] = gather_expert_tensor(params[name].detach(), runners[id(params[name])]).cpu()
        return state

    def _expert_state_slots(self, optimizer: torch.optim.Optimizer) -> dict[int, ExpertParallel]:
        """Optimizer state-dict index of every expert parameter → its layer's runner."""
        runners = self._runner_of()
        slots = {}
        index = 0
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in runners:
                    slots[index] = runners[id(p)]
                index += 1
        return slots

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        state = optimizer.state_dict()
        for index, ep in self._expert_state_slots(optimizer).items():
            entry = state["state"].get(index, {})
            state["state"][index] = {k: gather_expert_tensor(v, ep) if _is_expert_state(v, ep.num_local) else v
                                     for k, v in entry.items()}
        return state

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        states = checkpoint["optimizer_states"]
        for optimizer, saved in zip(self.optimizers, states):
            slots = self._expert_state_slots(optimizer)
            local = {**saved, "state": dict(saved["state"])}
            for index, ep in slots.items():
                entry = local["state"].get(index, {})
                local["state"][index] = {k: expert_slice(v, ep) if _is_expert_state(v, ep.num_experts) else v
                                         for k, v in entry.items()}
            optimizer.load_state_dict(local)

    # ------------------------------------------------------------------ structural changes
    def before_parameters_change(self, model: nn.Module, op: Any) -> None:
        """Before an expert split/merge/segment: check the new expert counts divide the expert-parallel size, then
        gather the changing layers' experts (and their optimizer state) into full tensors on every rank, so the
        op indexes all experts as on one device. A delink needs nothing (the clones keep their slices)."""
        shapes = op.shapes_after(model)
        size = self.expert_parallel_size
        bad = {b: s.num_experts for b, s in shapes.items() if s.num_experts % size}
        if bad:
            raise ValueError(f"{type(self).__name__}: {type(op).__name__} would leave "
                             + ", ".join(f"blocks.{b} with {n} experts" for b, n in bad.items())
                             + f", not divisible by expert_parallel_size={size}")
        swaps: dict[int, tuple[nn.Parameter, nn.Parameter, Any]] = {}
        for index in shapes:
            layer = model.blocks[index].ffn
            runner = layer.expert_parallel
            if runner is None:
                continue
            for pname in EXPERT_PARAMS:
                local = getattr(layer.experts, pname)
                full = nn.Parameter(gather_expert_tensor(local.detach(), runner), requires_grad=local.requires_grad)
                setattr(layer.experts, pname, full)
                swaps[id(local)] = (local, full, _gather_state(runner))
            layer.expert_parallel = None
        _swap_optimizer_params(self.optimizers, swaps)

    def on_parameters_changed(self, param_map: Any = None) -> None:
        """After a change: layers whose experts were gathered are sharded again over the expert group for their new
        count (their optimizer state sliced to match); delinked clones keep their slices. Then DDP is rebuilt."""
        full = {name: p for name, p in self.lightning_module.named_parameters()}
        self._shard()
        params = dict(self.lightning_module.named_parameters())
        runners = self._runner_of()
        swaps = {id(full[n]): (full[n], params[n], _slice_state(runners[id(params[n])])) for n in self.expert_names
                 if params[n] is not full[n]}
        _swap_optimizer_params(self.optimizers, swaps)
        self.model = self.lightning_module
        self.configure_ddp()


def _is_expert_state(value: Any, rows: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows


def _gather_state(ep: ExpertParallel) -> Any:
    """Optimizer-state transform local expert slice → full experts (a collective)."""
    return lambda v: gather_expert_tensor(v, ep) if _is_expert_state(v, ep.num_local) else v


def _slice_state(ep: ExpertParallel) -> Any:
    """Optimizer-state transform full experts → this rank's slice."""
    return lambda v: expert_slice(v, ep).clone() if _is_expert_state(v, ep.num_experts) else v


def _swap_optimizer_params(optimizers: list[Any],
                           swaps: dict[int, tuple[nn.Parameter, nn.Parameter, Any]]) -> None:
    """Put `new` where each `old` parameter sits in every optimizer's groups (`swaps`: id(old) → (old, new, fn);
    holding `old` keeps its id from being reused), same position, and carry its state through `fn` (applied to
    every tensor of the state). Groups are walked in order, so a collective inside `fn` runs in the same order on
    every rank."""
    for optimizer in optimizers:
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        for group in optimizer.param_groups:
            for i, p in enumerate(group["params"]):
                old, new, fn = swaps.get(id(p), (None, None, None))
                if old is not p:
                    continue
                state = optimizer.state.pop(p, None)
                if state:
                    optimizer.state[new] = {k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in state.items()}
                group["params"][i] = new


# ---------------------------------------------------------------------------------------------- FSDP2 helpers
def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of a DTensor shard (a collective, over the shard's mesh device even when the shard is
    offloaded to the host), on the host; a plain tensor is copied as it is (e.g. Adam's step)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t.detach().clone()
    local = t.to_local()
    device = t.device_mesh.device_type
    if local.device.type != device:
        t = DTensor.from_local(local.to(device), t.device_mesh, t.placements, run_check=False, shape=t.shape,
                               stride=t.stride())
    return t.full_tensor().detach().cpu()


def _shard_like(param: torch.Tensor) -> Any:
    """Optimizer-state transform: a full tensor shaped like `param` → a DTensor sharded as `param` (this rank's
    rows of FSDP2's dim-0 chunks, on the shard's device); other values (Adam's step) unchanged."""
    from torch.distributed.tensor import DTensor

    local = param.to_local()

    def shard(v: torch.Tensor) -> torch.Tensor:
        if isinstance(v, DTensor) or v.dim() == 0 or tuple(v.shape) != tuple(param.shape):
            return v
        mesh = param.device_mesh
        chunks = torch.chunk(v, mesh.size(), dim=0)
        rank = mesh.get_local_rank()
        mine = chunks[rank] if rank < len(chunks) else v[:0]
        if tuple(mine.shape) != tuple(local.shape):
            raise RuntimeError(f"FSDP2 re-shard: optimizer state chunk {tuple(mine.shape)} does not match the "
                               f"parameter shard {tuple(local.shape)}")
        return DTensor.from_local(mine.to(local.device).clone(), mesh, param.placements, run_check=False,
                                  shape=param.shape, stride=param.stride())

    return shard


def _gathered_block(root: nn.Module, index: int) -> nn.Module:
    """A plain block built from the config (on the meta device, no random numbers) holding the full tensors of
    the sharded block `index`, on the host, in the same train/eval mode."""
    source = root.blocks[index]
    with torch.device("meta"):
        plain = root.build_block(getattr(source, "is_moe", False), index)
    ours = {n for n, _ in plain.named_parameters()} | {n for n, _ in plain.named_buffers()}
    theirs = {n for n, _ in source.named_parameters()} | {n for n, _ in source.named_buffers()}
    if ours != theirs:
        raise ValueError(f"FSDP2 gather: blocks.{index} does not match a block built from the config: tensors only "
                         f"in the model {sorted(theirs - ours)}, only in the config's block {sorted(ours - theirs)}")
    sources = dict(source.named_modules())
    with torch.no_grad():
        for name, module in plain.named_modules():
            old = sources[name]
            for pname, p in old._parameters.items():
                if p is not None:
                    module._parameters[pname] = nn.Parameter(_full_tensor(p), requires_grad=p.requires_grad)
            for bname, b in old._buffers.items():
                if b is not None:
                    module._buffers[bname] = _full_tensor(b)
            module.training = old.training
    return plain


def _manages_its_parameters(block: nn.Module) -> bool:
    """Whether an FSDP unit's module parameters are exactly the sharded parameters its FSDP groups manage (its
    own units' and those of FSDP units inside it)."""
    from torch.distributed.fsdp import FSDPModule

    managed: set[int] = set()
    for m in block.modules():
        if isinstance(m, FSDPModule):
            for group in m._get_fsdp_state()._fsdp_param_groups:
                managed |= {id(fp.sharded_param) for fp in group.fsdp_params}
    return {id(p) for p in block.parameters()} == managed


def _reshard_all(root: nn.Module) -> None:
    """Register the sharded parameters on every FSDP unit of `root` (freeing gathered ones)."""
    from torch.distributed.fsdp import FSDPModule

    for m in root.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _reset_lazy_init(root: nn.Module) -> None:
    """Make the root FSDP state run its lazy initialisation again at the next forward, so it registers the units
    that replaced old ones (it collects every FSDP state of its tree once, at its first forward). This resets
    FSDP2's private state (`_is_root`, `_state_ctx`, as in torch 2.13); a torch whose FSDP2 lacks them is an error
    here rather than a root that silently skips the new units."""
    from torch.distributed.fsdp import FSDPModule

    try:
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPStateContext
    except ImportError as err:
        raise RuntimeError(f"FSDP2 re-registration after a structural change needs FSDP2's FSDPStateContext "
                           f"(torch 2.13 layout): {err}") from err
    states = [m._get_fsdp_state() for m in root.modules() if isinstance(m, FSDPModule)]
    missing = [s for s in states if not hasattr(s, "_is_root") or not hasattr(s, "_state_ctx")]
    if missing:
        raise RuntimeError(f"FSDP2 re-registration after a structural change: this torch ({torch.__version__}) has "
                           f"no FSDPState._is_root/_state_ctx; the root would not register the new blocks")
    for state in states:
        state._is_root = None
    root._get_fsdp_state()._state_ctx = FSDPStateContext()


StrategyRegistry.register(FSDP2Strategy.strategy_name, FSDP2Strategy,
                          description="FSDP2 fully_shard per block + root (ModelParallelStrategy), optional "
                                      "activation checkpointing and per-block CPU offload", override=True)
StrategyRegistry.register(ExpertParallelStrategy.strategy_name, ExpertParallelStrategy,
                          description="DDP for dense parameters, experts sharded over an expert-parallel mesh "
                                      "dimension (all_to_all token dispatch)", override=True)

__all__ = ["ExpertParallelStrategy", "FSDP2Strategy"]
