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

Structural changes: both take a delink through `on_parameters_changed` where they can (expert parallel: the clones
keep their expert slices and DDP is rebuilt); what they cannot apply mid-run (FSDP2: any change to sharded blocks,
because `fully_shard` swaps parameters for DTensor shards and forbids copying the module; expert parallel: expert
split/merge/segment, which index the full expert dimension) is refused at setup when a callback schedules it, and at
the step otherwise — never a silently stale wrapper. Such changes go through a checkpoint: make the change under a
single device or DDP, then resume here (the checkpoint's structure is rebuilt before sharding).
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

from m6lit.model.expert_parallel import ExpertParallel, expert_slice, gather_expert_tensor, moe_layers, shard_experts
from m6lit.strategies.patterns import resolve_offload

EXPERT_OPS = ("split", "merge", "segment")


def _sharded_root(lightning_module: nn.Module, strategy: str) -> nn.Module:
    """The module whose `blocks` are the physical blocks (`M6LitModule.model`)."""
    root = getattr(lightning_module, "model", None)
    if root is None or not isinstance(getattr(root, "blocks", None), nn.ModuleList):
        raise TypeError(f"{strategy} parallelizes `<LightningModule>.model.blocks` (an nn.ModuleList of physical "
                        f"blocks); {type(lightning_module).__name__} has no such attribute")
    return root


def _pending_structure_changes(trainer: Any, done_step: int, num_blocks: int) -> list[str]:
    """Structural changes that callbacks of this run will make after `done_step` (human-readable)."""
    from m6lit.callbacks import ExpertSplitMerge, PseudoToReal

    pending = []
    for cb in trainer.callbacks:
        if isinstance(cb, PseudoToReal):
            pending += [f"PseudoToReal delink to {e.num_unique_blocks} blocks at step {e.step}" for e in cb.events
                        if e.step > done_step and e.num_unique_blocks > num_blocks]
        elif isinstance(cb, ExpertSplitMerge):
            pending += [f"ExpertSplitMerge {e.op} x{e.factor} at step {e.step}" for e in cb.events
                        if e.step > done_step]
    return pending


def refuse_scheduled_changes(strategy: Any, trainer: Any, done_step: int, num_blocks: int) -> None:
    """Fail at setup, before any step, when a callback schedules a structural change this strategy cannot apply."""
    which = strategy.unsupported_changes
    pending = [p for p in _pending_structure_changes(trainer, done_step, num_blocks)
               if which == "all" or p.startswith(which)]
    if pending:
        raise RuntimeError(f"{type(strategy).__name__} cannot apply {'; '.join(pending)} mid-run: "
                           f"{strategy.unsupported_reason}. Run the phase up to the change on a single device or ddp, "
                           f"then resume from its checkpoint with {strategy.strategy_name} (the checkpoint's "
                           f"structure is rebuilt before sharding).")


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
    unsupported_changes = "all"
    unsupported_reason = ("fully_shard swaps each block's parameters for DTensor shards and forbids copying the "
                          "module, so the change would fail or train stale shards")

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
        """fully_shard the offloaded units, each block (after activation checkpointing), then the root."""
        from torch.distributed._composable import checkpoint
        from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard

        root = _sharded_root(lightning_module, type(self).__name__)
        if any(isinstance(m, FSDPModule) for m in root.modules()):
            raise RuntimeError(f"{type(self).__name__}: the model is already sharded (fully_shard was applied "
                               f"before the strategy's setup)")
        mesh = self.device_mesh["data_parallel"]
        common = dict(mesh=mesh, mp_policy=self.mixed_precision_policy())
        modules = dict(lightning_module.named_modules())
        self.offloaded = resolve_offload(lightning_module, self.cpu_offload) if self.cpu_offload else []
        # on a CPU-only run everything already lives on the host (and CPUOffloadPolicy needs an accelerator)
        offload = [] if self.root_device.type == "cpu" else self.offloaded
        blocks = {id(b) for b in root.blocks}
        for name in offload:
            if id(modules[name]) not in blocks:  # part of a block: its own unit, inside the block's
                fully_shard(modules[name], offload_policy=CPUOffloadPolicy(),
                            reshard_after_forward=self.reshard_after_forward, **common)
        offloaded_blocks = {id(modules[n]) for n in offload}
        for block in root.blocks:
            if self.activation_checkpointing:
                checkpoint(block)
            extra = {"offload_policy": CPUOffloadPolicy()} if id(block) in offloaded_blocks else {}
            fully_shard(block, reshard_after_forward=self.reshard_after_forward, **common, **extra)
        fully_shard(root, **common)
        rank_zero_info(f"{type(self).__name__}: fully_shard over {mesh.size()} ranks: {len(root.blocks)} blocks + "
                       f"root, activation checkpointing {'on' if self.activation_checkpointing else 'off'}, "
                       f"CPU offload {offload or 'none'}")

    def setup(self, trainer: Any) -> None:
        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        root = _sharded_root(self.lightning_module, type(self).__name__)
        if trainer.state.fn == TrainerFn.FITTING:
            refuse_scheduled_changes(self, trainer, _resumed_step(trainer), len(root.blocks))
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

    def on_parameters_changed(self, param_map: Any = None) -> None:
        from m6lit.structure import describe_change

        raise RuntimeError(f"{type(self).__name__} cannot apply a structural change mid-run "
                           f"({describe_change(param_map)}): its blocks are sharded by fully_shard. Make the change "
                           f"on a single device, ddp or m6_ep and resume from that checkpoint with m6_fsdp.")


class ExpertParallelStrategy(DDPStrategy):
    """DDP for dense parameters + experts sharded over the `expert` dimension of a DeviceMesh.

    Args:
        expert_parallel_size: ranks that share one copy of the experts (each holds E / size of every MoE layer's
            experts); "auto" = all ranks. The world size must be a multiple; the ranks of one expert group are
            consecutive (inside a node first).
        **kwargs: Lightning's DDPStrategy arguments (process_group_backend, timeout, ...).
    """

    strategy_name = "m6_ep"
    unsupported_changes = "ExpertSplitMerge"
    unsupported_reason = "each rank holds a slice of the experts and the op indexes all of them"

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
            refuse_scheduled_changes(self, trainer, _resumed_step(trainer), len(root.blocks))
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
    def on_parameters_changed(self, param_map: Any = None) -> None:
        """After a delink: the clones keep their expert slices; re-register them and rebuild DDP. Expert ops are
        refused (their index maps cover the full expert dimension)."""
        from m6lit.structure import describe_change

        kinds = {link.kind for link in param_map} if param_map is not None else set()
        if kinds & set(EXPERT_OPS):
            raise RuntimeError(f"{type(self).__name__} cannot apply {describe_change(param_map)} mid-run: each rank "
                               f"holds a slice of the experts. Make the change on a single device or ddp and resume "
                               f"from that checkpoint with m6_ep.")
        self._shard()
        self.model = self.lightning_module
        self.configure_ddp()


def _is_expert_state(value: Any, rows: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows


StrategyRegistry.register(FSDP2Strategy.strategy_name, FSDP2Strategy,
                          description="FSDP2 fully_shard per block + root (ModelParallelStrategy), optional "
                                      "activation checkpointing and per-block CPU offload", override=True)
StrategyRegistry.register(ExpertParallelStrategy.strategy_name, ExpertParallelStrategy,
                          description="DDP for dense parameters, experts sharded over an expert-parallel mesh "
                                      "dimension (all_to_all token dispatch)", override=True)

__all__ = ["ExpertParallelStrategy", "FSDP2Strategy"]
