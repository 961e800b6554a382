"""Shared mechanics for callbacks that change the model's structure mid-fit (delink, expert split/merge).

1. `rewrite_optimizer`: put the new parameters into the existing optimizer's groups **in place** (same group order
   and hyperparameters, so LR schedulers keep their references and a resume loads the state without remapping) and
   carry each new parameter's state from its sources through the ParamMap, per policy.
2. `notify_strategy`: tell the strategy its parameters changed — `on_parameters_changed(param_map)` where the
   strategy has it (m6lit's offload and parallel strategies), a DDP re-wrap for Lightning's stock DDP (its buckets
   hold the old parameters), nothing for a plain single-device strategy, and a clear error for any other strategy.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import Tensor

from m6lit.model import ParamMap

StatePolicy = Literal["copy", "rescale", "reset"]
STATE_POLICIES = ("copy", "rescale", "reset")
SECOND_MOMENT_KEYS = ("exp_avg_sq", "max_exp_avg_sq")


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


def unique_parameters(module: LightningModule) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def eval_loss(pl_module: LightningModule, batch: dict[str, Tensor]) -> float:
    """LM + aux loss of `batch` with dropout off (restoring the training flag)."""
    from m6lit.model import lm_loss

    was_training = pl_module.training
    pl_module.eval()
    try:
        out = pl_module.model(batch)
        return float(lm_loss(out.logits, batch["labels"]) + out.aux_loss)
    finally:
        pl_module.train(was_training)
