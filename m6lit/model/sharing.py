"""Cross-layer parameter sharing and delinking.

A model has `num_layers` logical layers and K physical blocks; `layer_to_block` maps one to the other:
  cycle: layer i uses block i mod K        (Takase & Kiyono's CYCLE)
  stack: layer i uses block i div (L/K)    (their SEQUENCE)
`delink` turns K blocks into K' (a multiple of K) — each new block built from the config and given copies of its
source block's tensors — so the network computes exactly the same function, and returns a `ParamMap` (old
parameter → the new parameters copied from it) for the optimizer-state transfer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
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


def fresh_block_like(model: nn.Module, block: int) -> nn.Module:
    """A new physical block built from the model's config in the shape of block `block`, holding copies of that
    block's tensors (fresh storage, same dtype, device and requires_grad), in the same train/eval mode, running
    the same expert-parallel group if it has one — and nothing else: no hooks, no compiled call, no grads (the
    strategy and the compiler re-attach theirs to new blocks on purpose).

    The skeleton is built on the meta device, so no random numbers are drawn and nothing is allocated twice. A
    tensor name the config's block does not have (or lacks) is an error naming it.
    """
    source = model.blocks[block]
    with torch.device("meta"):
        fresh = model.build_block(getattr(source, "is_moe", False), block)
    where = f"delink: blocks.{block}"
    ours = {n for n, _ in fresh.named_parameters()} | {n for n, _ in fresh.named_buffers()}
    theirs = {n for n, _ in source.named_parameters()} | {n for n, _ in source.named_buffers()}
    if ours != theirs:
        raise ValueError(f"{where} does not match a block built from the config: tensors only in the model "
                         f"{sorted(theirs - ours)}, only in the config's block {sorted(ours - theirs)}")
    sources = {name: module for name, module in source.named_modules()}
    with torch.no_grad():
        for name, module in fresh.named_modules():
            old = sources[name]
            for pname, p in old._parameters.items():
                if p is not None:
                    module._parameters[pname] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            for bname, b in old._buffers.items():
                if b is not None:
                    module._buffers[bname] = b.detach().clone()
            module.training = old.training
            if hasattr(old, "expert_parallel"):
                module.expert_parallel = old.expert_parallel
    return fresh


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
        block = fresh_block_like(model, old_b)
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


__all__ = ["ParamLink", "ParamMap", "blocks_share_storage", "delink", "fresh_block_like", "layer_to_block"]
