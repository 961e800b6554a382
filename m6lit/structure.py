"""One transaction for every structural change made mid-fit (a delink, an expert segment / split / merge).

`apply_structure_change(trainer, module, op)` runs, in this order and nowhere else:
1. measure — the current batch's loss (and, for a load-weighted merge, the experts' token counts) with dropout off;
2. the strategy brings the blocks the op replaces into plain full tensors where it shards them
   (`prepare_strategy`: `before_parameters_change(model, op)` where it has one, e.g. FSDP2 gathers the blocks,
   expert parallelism gathers the experts, optimizer state following), then the pure op of the model package
   (`delink`, `apply_expert_op`) returns the `ParamMap` old → new;
3. the module's structural hyperparameters (`sync_structure_hparams`), so later checkpoints rebuild the new shape;
4. every optimizer's groups rewritten **in place** (`rewrite_optimizer`: same group order and hyperparameters, so LR
   schedulers keep their references and a resume loads the state without remapping), state moved per policy;
5. the strategy re-plans (`notify_strategy`): `on_parameters_changed(param_map)` where it has one, a re-wrap for
   Lightning's plain DDP, nothing for a plain single device, and an error naming any other strategy — at this step,
   before it could train the replaced parameters;
6. the loss again, one record to every logger and the history, one line to the console.
Callbacks (`PseudoToReal`, `ExpertSplitMerge`) decide *when* and *what*; this module does the *how*.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from m6lit.model import ExpertShape, ParamMap, apply_expert_op, delink, lm_loss
from m6lit.model.experts import moe_blocks_of

StatePolicy = Literal["copy", "rescale", "reset"]
STATE_POLICIES = ("copy", "rescale", "reset")
SECOND_MOMENT_KEYS = ("exp_avg_sq", "max_exp_avg_sq")


# ---------------------------------------------------------------------------------------------- the ops
class StructureOp(ABC):
    """What to change, for `apply_structure_change`. A subclass names who asked (`owner`, for messages) and its
    metric namespace (`prefix`), applies the pure op (`apply`), and reports what it did (`metrics`, `details`,
    `summary`, valid after `apply`). One instance describes one change."""

    owner: str = "structure"
    prefix: str = "structure"

    @property
    def needs_loads(self) -> bool:
        """Whether `apply` needs the experts' token counts on the current batch."""
        return False

    @abstractmethod
    def apply(self, model: nn.Module, loads: Optional[dict[int, Tensor]]) -> ParamMap:
        """Run the pure op on `model` and return its ParamMap."""

    def blocks(self, model: nn.Module) -> list[int]:
        """The physical blocks whose parameters `apply` replaces (default: every block)."""
        return list(range(len(model.blocks)))

    def shapes_after(self, model: nn.Module) -> dict[int, ExpertShape]:
        """Physical block → its expert shape after `apply`, for the blocks whose experts change (none by default)."""
        return {}

    def metrics(self, model: nn.Module) -> dict[str, float]:
        """Op-specific values logged as `<prefix>/<key>` (after the step, before the parameter counts)."""
        return {}

    def details(self) -> dict[str, Any]:
        """Extra, non-scalar facts for the callback's history."""
        return {}

    @abstractmethod
    def summary(self) -> tuple[str, str]:
        """(what was done, what changed), for the line '<owner>: <what> at step N: <change>; parameters ...'."""


@dataclass
class Delink(StructureOp):
    """Go to `num_unique_blocks` physical blocks (`m6lit.model.delink`)."""

    num_unique_blocks: int
    owner: str = "PseudoToReal"
    prefix: str = "p2r"
    _before: int = field(default=0, init=False, repr=False)

    def apply(self, model: nn.Module, loads: Optional[dict[int, Tensor]]) -> ParamMap:
        self._before = len(model.blocks)
        return delink(model, self.num_unique_blocks)

    def metrics(self, model: nn.Module) -> dict[str, float]:
        return {"num_unique_blocks": float(self.num_unique_blocks)}

    def summary(self) -> tuple[str, str]:
        return "delinked", f"{self._before} → {self.num_unique_blocks} unique blocks"


@dataclass
class ExpertChange(StructureOp):
    """Apply `op` ("segment" | "split" | "merge") by `factor` to the MoE blocks of `layers`
    (`m6lit.model.apply_expert_op`)."""

    op: str
    factor: int
    layers: Sequence[int] | str = "all"
    noise: float = 0.0
    generator: Optional[torch.Generator] = None
    weights: Literal["load", "uniform"] = "uniform"
    how: Literal["auto", "concat", "average"] = "auto"
    owner: str = "ExpertSplitMerge"
    prefix: str = "experts"
    _blocks: dict[int, list[int]] = field(default_factory=dict, init=False, repr=False)
    _before: dict[int, ExpertShape] = field(default_factory=dict, init=False, repr=False)
    _after: dict[int, ExpertShape] = field(default_factory=dict, init=False, repr=False)

    @property
    def needs_loads(self) -> bool:
        return self.op == "merge" and self.weights == "load"

    def apply(self, model: nn.Module, loads: Optional[dict[int, Tensor]]) -> ParamMap:
        self._blocks = moe_blocks_of(model, self.layers)
        self._before = {b: model.config.expert_shape(b) for b in self._blocks}
        param_map = apply_expert_op(model, self.op, self.factor, self.layers, noise=self.noise,
                                    generator=self.generator, weights=self.weights, loads=loads, how=self.how)
        self._after = {b: model.config.expert_shape(b) for b in self._blocks}
        return param_map

    def blocks(self, model: nn.Module) -> list[int]:
        return sorted(moe_blocks_of(model, self.layers))

    def shapes_after(self, model: nn.Module) -> dict[int, ExpertShape]:
        config = model.config
        return {b: config.expert_shape(b).after(self.op, self.factor, config.router, self.how)
                for b in self.blocks(model)}

    def metrics(self, model: nn.Module) -> dict[str, float]:
        return {"factor": float(self.factor),
                "num_experts": float(max(s.num_experts for s in self._after.values()))}

    def details(self) -> dict[str, Any]:
        return {"op": self.op, "blocks": sorted(self._blocks),
                "shapes_before": {b: s._asdict() for b, s in self._before.items()},
                "shapes_after": {b: s._asdict() for b, s in self._after.items()}}

    def summary(self) -> tuple[str, str]:
        changes = ", ".join(f"block {b} (layers {layers}): {_shape_text(self._before[b])} → "
                            f"{_shape_text(self._after[b])}" for b, layers in self._blocks.items())
        return f"{self.op} ×{self.factor}", changes


def _shape_text(shape: ExpertShape) -> str:
    return f"{shape.num_experts} experts top-{shape.top_k} d_ff {shape.expert_d_ff}"


# ---------------------------------------------------------------------------------------------- the transaction
@dataclass
class Measurement:
    """LM + aux loss of a batch and each MoE layer's expert token counts (logical layer → [E])."""

    loss: float
    loads: dict[int, Tensor]


@torch.no_grad()
def measure(module: LightningModule, batch: dict[str, Tensor]) -> Measurement:
    """Loss and expert loads of `batch` with dropout off (the training flag is restored)."""
    was_training = module.training
    module.eval()
    try:
        out = module.model(batch)
        loss = float(lm_loss(out.logits, batch["labels"]) + out.aux_loss)
        return Measurement(loss, {layer: aux.expert_counts for layer, aux in out.moe_stats.items()})
    finally:
        module.train(was_training)


def apply_structure_change(trainer: Trainer, module: LightningModule, op: StructureOp, *,
                           batch: Optional[dict[str, Tensor]] = None, optimizer_state: StatePolicy = "copy",
                           log_loss: bool = True, history: Optional[list[dict[str, Any]]] = None) -> ParamMap:
    """Change `module.model`'s structure per `op` inside a running fit (see the module docstring for the steps)
    and return the ParamMap old → new parameters.

    `module` is an `M6LitModule` (`model`, `sync_structure_hparams`, `build_param_groups`). `batch` is measured
    before and after when `log_loss` (and before when the op needs expert loads); the record logged as
    `<op.prefix>/...` is appended to `history` with the op's details.
    """
    if optimizer_state not in STATE_POLICIES:
        raise ValueError(f"optimizer_state={optimizer_state!r}: must be one of {STATE_POLICIES}")
    if (log_loss or op.needs_loads) and batch is None:
        raise ValueError(f"{op.owner}: measuring the change needs the current batch (batch=None)")
    model = module.model
    step = trainer.global_step
    params_before = model.num_parameters(unique=True)
    loss_before, loads = math.nan, None
    if log_loss or op.needs_loads:
        before = measure(module, batch)
        loss_before, loads = before.loss, before.loads
        if op.needs_loads and getattr(trainer, "world_size", 1) > 1:  # every rank merges on the same (global) loads
            loads = {k: trainer.strategy.reduce(v.clone(), reduce_op="sum") for k, v in loads.items()}
    prepare_strategy(trainer, model, op)
    param_map = op.apply(model, loads)
    module.sync_structure_hparams()
    for optimizer in trainer.optimizers:
        rewrite_optimizer(optimizer, module.build_param_groups(), param_map, optimizer_state)
    notify_strategy(trainer, param_map)
    loss_after = measure(module, batch).loss if log_loss else math.nan
    params_after = model.num_parameters(unique=True)
    prefix = op.prefix
    record = {f"{prefix}/step": float(step), **{f"{prefix}/{k}": v for k, v in op.metrics(model).items()},
              f"{prefix}/unique_params_before": float(params_before),
              f"{prefix}/unique_params_after": float(params_after),
              f"{prefix}/loss_before": loss_before, f"{prefix}/loss_after": loss_after}
    if history is not None:
        history.append({**record, **op.details()})
    for logger in trainer.loggers:
        logger.log_metrics(record, step=step)
    what, change = op.summary()
    rank_zero_info(f"{op.owner}: {what} at step {step}: {change}; parameters {params_before:,} → "
                   f"{params_after:,}, loss {loss_before:.6f} → {loss_after:.6f} (optimizer state: "
                   f"{optimizer_state})")
    return param_map


# ---------------------------------------------------------------------------------------------- optimizer
def transplant_state(old_states: list[dict[str, Any]], link: Any, policy: StatePolicy) -> dict[str, Any]:
    """State for one new parameter from its sources' states.

    Tensors shaped like the source parameter go through the link's `state_transform` (or, when it has none, its
    `transform`: clone, slice, average …);
    `rescale` then divides first moments by n and second moments by n² (n = the link's fan_out: a shared block's
    gradient was the sum of n copies' gradients). Scalars such as Adam's `step` are cloned (keeping dtype/device).
    """
    if policy == "reset" or not old_states or any(not s for s in old_states):
        return {}
    n = float(link.fan_out)
    shape = tuple(link.sources[0].shape)
    move = link.state_transform or link.transform
    new: dict[str, Any] = {}
    for key, value in old_states[0].items():
        if isinstance(value, Tensor) and tuple(value.shape) == shape and value.dim() > 0:
            moved = move([s[key] for s in old_states])
            if policy == "rescale" and n != 1.0:
                moved = moved / (n * n if key in SECOND_MOMENT_KEYS else n)
            new[key] = moved
        elif isinstance(value, Tensor):
            new[key] = value.clone()
        else:
            new[key] = value
    return new


def rewrite_optimizer(optimizer: torch.optim.Optimizer, new_groups: list[dict[str, Any]], param_map: ParamMap,
                      policy: StatePolicy) -> None:
    """Replace the parameters of `optimizer`'s groups with `new_groups`' (same count, same order) and move state
    through `param_map` per `policy`. Old parameters' state is dropped; unchanged parameters keep theirs."""
    if policy not in STATE_POLICIES:
        raise ValueError(f"optimizer_state={policy!r}: must be one of {STATE_POLICIES}")
    if len(new_groups) != len(optimizer.param_groups):
        raise RuntimeError(f"structure change produced {len(new_groups)} parameter groups; the optimizer has "
                           f"{len(optimizer.param_groups)} — param-group building must be canonical")
    for link in param_map:
        states = [optimizer.state.get(src, {}) for src in link.sources]
        state = transplant_state(states, link, policy)
        if state:
            optimizer.state[link.new] = state
    for old in param_map.old_params():
        optimizer.state.pop(old, None)
    for group, fresh in zip(optimizer.param_groups, new_groups):
        group["params"] = list(fresh["params"])
        if "param_names" in fresh:
            group["param_names"] = list(fresh["param_names"])
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    stale = [p for p in param_map.old_params() if id(p) in held]
    if stale:
        raise RuntimeError(f"{len(stale)} replaced parameters are still in the optimizer after the rewrite")


# ---------------------------------------------------------------------------------------------- strategy
def prepare_strategy(trainer: Trainer, model: nn.Module, op: StructureOp) -> None:
    """Before the pure op: a strategy that shards the parameters `op` replaces turns them into plain full tensors
    (with the optimizer pointing at them and holding their full state) through its `before_parameters_change`;
    others need nothing."""
    hook = getattr(trainer.strategy, "before_parameters_change", None)
    if callable(hook):
        hook(model, op)


def notify_strategy(trainer: Trainer, param_map: ParamMap) -> None:
    """Let the strategy rebuild whatever caches parameter identity.

    A strategy with `on_parameters_changed` does it itself; Lightning's plain DDP is re-wrapped (its buckets hold
    the old parameters); a plain single-device strategy needs nothing. Any other strategy (FSDP, DeepSpeed, model
    parallel, a subclass without the hook) would keep training the replaced parameters, so the change stops here
    with an error naming the strategy and the change.
    """
    strategy = trainer.strategy
    hook = getattr(strategy, "on_parameters_changed", None)
    if callable(hook):
        hook(param_map)
    elif type(strategy) is DDPStrategy:
        strategy.model = strategy.lightning_module
        strategy.configure_ddp()
    elif type(strategy) is not SingleDeviceStrategy:
        raise RuntimeError(
            f"{type(strategy).__name__} cannot apply a structural change ({describe_change(param_map)}) at global "
            f"step {trainer.global_step}: it has no on_parameters_changed(param_map) hook, so it would keep training "
            f"the replaced parameters. Use a strategy that supports it (single device, ddp, m6_offload) for the "
            f"change, or remove the change from the run.")


def describe_change(param_map: ParamMap) -> str:
    """'delink of 12 parameters (blocks.0.attn.qkv.weight, ...)' — what a ParamMap changes, for messages."""
    kinds = sorted({link.kind for link in param_map})
    names = [link.new_name for link in param_map][:3]
    more = ", ..." if len(param_map) > 3 else ""
    return f"{'/'.join(kinds) or 'change'} of {len(param_map)} parameters ({', '.join(names)}{more})"


__all__ = ["Delink", "ExpertChange", "Measurement", "STATE_POLICIES", "StatePolicy", "StructureOp",
           "apply_structure_change", "describe_change", "measure", "notify_strategy", "prepare_strategy",
           "rewrite_optimizer", "transplant_state"]
