"""Cross-layer parameter sharing and delinking.

A model has `num_layers` logical layers and K physical blocks; `layer_to_block` maps one to the other:
  cycle: layer i uses block i mod K        (Takase & Kiyono's CYCLE)
  stack: layer i uses block i div (L/K)    (their SEQUENCE)
`delink` turns K blocks into K' (a multiple of K) by cloning, so the network computes exactly the same function, and
returns a `ParamMap` (old parameter → the new parameters cloned from it) for the optimizer-state transfer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from torch import Tensor, nn


def layer_to_block(num_layers: int, num_unique_blocks: int, layout: str) -> list[int]:
    """Physical block index of each logical layer."""
    if layout == "cycle":
        return [i % num_unique_blocks for i in range(num_layers)]
    if layout == "stack":
        per_block = num_layers // num_unique_blocks
        return [i // per_block for i in range(num_layers)]
    raise ValueError(f"sharing_layout={layout!r}: must be 'cycle' or 'stack'")


def _identity(sources: list[Tensor]) -> Tensor:
    return sources[0].clone()


@dataclass
class ParamLink:
    """One new parameter and how it derives from old ones.

    `transform` maps tensors shaped like the sources (the parameters themselves, or optimizer state such as Adam's
    exp_avg) to a tensor shaped like `new`. `state_transform`, when set, is what optimizer state goes through
    instead — for a derivation that also rescales or perturbs the parameter (a segmented expert's output weight
    is multiplied by the segment factor; split copies get noise), whose moments are moved, not rescaled.
    `fan_out` is n such that the new parameter's gradient is expected at about 1/n of its source's (delink: the
    number of copies, i.e. how many layer groups shared the old block; an expert merge of f experts: 1/f); the
    `rescale` optimizer-state policy divides first moments by n and second moments by n².
    """

    new: nn.Parameter
    new_name: str
    sources: list[nn.Parameter]
    source_names: list[str]
    transform: Callable[[list[Tensor]], Tensor] = _identity
    fan_out: float = 1
    kind: str = "clone"
    state_transform: Optional[Callable[[list[Tensor]], Tensor]] = None


@dataclass
class ParamMap:
    """Old parameter → new parameters, produced by a structural change (delink, expert split/merge)."""

    links: list[ParamLink] = field(default_factory=list)

    def __getitem__(self, old: nn.Parameter) -> list[nn.Parameter]:
        found = [link.new for link in self.links if any(s is old for s in link.sources)]
        if not found:
            raise KeyError("parameter is not a source in this ParamMap")
        return found

    def __len__(self) -> int:
        return len(self.links)

    def __iter__(self) -> Iterator[ParamLink]:
        return iter(self.links)

    def old_params(self) -> list[nn.Parameter]:
        """Every replaced parameter, each once, in first-seen order."""
        seen: dict[int, nn.Parameter] = {}
        for link in self.links:
            for source in link.sources:
                seen.setdefault(id(source), source)
        return list(seen.values())

    def new_params(self) -> list[nn.Parameter]:
        return [link.new for link in self.links]

    def items(self) -> list[tuple[nn.Parameter, list[nn.Parameter]]]:
        return [(old, self[old]) for old in self.old_params()]

    def extend(self, other: "ParamMap") -> "ParamMap":
        self.links.extend(other.links)
        return self


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


def clone_module(module: nn.Module) -> nn.Module:
    """Deep copy with fresh storage for every parameter and buffer (same dtype, device, requires_grad), no grads
    and no hooks (placement hooks belong to whoever installed them and must be re-installed on purpose). Hook
    dicts are swapped for empty ones before copying, so whatever a hook refers to (its owner, a trainer) is never
    deep-copied."""
    memo: dict[int, object] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = b.detach().clone()
    for m in module.modules():
        for name in _HOOK_DICTS:
            hooks = getattr(m, name, None)
            if hooks is not None:
                memo[id(hooks)] = type(hooks)()
    return copy.deepcopy(module, memo)


def delink(model: nn.Module, num_unique_blocks: Optional[int] = None) -> ParamMap:
    """Clone shared blocks so the model has `num_unique_blocks` (default: one per layer) physical blocks.

    The model (an `M6Model`: `config`, `blocks`, `layer_to_block`) computes exactly the same function afterwards.
    The new count must be a multiple of the current one, divide `num_layers`, and refine the layout (each new block
    serves layers that all used one old block); `config.num_unique_blocks` is updated so a model rebuilt from the
    config has the same shape. Returns the ParamMap old → new parameters; the old blocks are dropped.
    """
    config = model.config
    old_k = len(model.blocks)
    num_layers = config.num_layers
    new_k = num_layers if num_unique_blocks is None else num_unique_blocks
    if new_k == old_k:
        raise ValueError(f"delink: the model already has num_unique_blocks={old_k}; nothing to delink")
    if new_k < old_k or new_k % old_k:
        raise ValueError(f"delink: num_unique_blocks={new_k} must be a multiple of the current {old_k}")
    if num_layers % new_k:
        raise ValueError(f"delink: num_unique_blocks={new_k} must divide num_layers={num_layers}")
    old_map = list(model.layer_to_block)
    new_map = layer_to_block(num_layers, new_k, config.sharing_layout)
    source_of: dict[int, int] = {}
    for layer, (old_b, new_b) in enumerate(zip(old_map, new_map)):
        if source_of.setdefault(new_b, old_b) != old_b:
            raise ValueError(f"delink: layout {config.sharing_layout!r} with {new_k} blocks does not refine the "
                             f"current sharing (layer {layer})")
    copies = {b: sum(1 for s in source_of.values() if s == b) for b in range(old_k)}

    param_map = ParamMap()
    new_blocks = []
    for new_b in range(new_k):
        old_b = source_of[new_b]
        old_block = model.blocks[old_b]
        block = clone_module(old_block)
        old_params = dict(old_block.named_parameters())
        for name, p in block.named_parameters():
            param_map.links.append(ParamLink(
                new=p, new_name=f"blocks.{new_b}.{name}", sources=[old_params[name]],
                source_names=[f"blocks.{old_b}.{name}"], fan_out=copies[old_b], kind="delink"))
        new_blocks.append(block)
    model.blocks = nn.ModuleList(new_blocks)
    model.layer_to_block = new_map
    config.num_unique_blocks = new_k
    if config.expert_overrides:  # each clone keeps its source block's expert shape
        by_block = {entry["block"]: entry for entry in config.expert_overrides}
        config.expert_overrides = [dict(by_block[source_of[b]], block=b) for b in range(new_k)
                                   if source_of[b] in by_block] or None
    return param_map


def blocks_share_storage(a: nn.Module, b: nn.Module) -> bool:
    """True if any parameter of `a` shares storage with one of `b` (a test and sanity helper)."""
    ptrs = {p.untyped_storage().data_ptr() for p in a.parameters()}
    return any(p.untyped_storage().data_ptr() in ptrs for p in b.parameters())


__all__ = ["ParamLink", "ParamMap", "blocks_share_storage", "clone_module", "delink", "layer_to_block"]
