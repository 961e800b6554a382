"""Expert segment, split and merge: pure functions that reshape an MoELayer in place and return the ParamMap (old
parameter → new parameters) the optimizer state transfer needs.

Layouts (E experts, k = top_k, F = expert hidden size, n = factor):
- `topk` router, one pool of E experts: `segment` cuts expert e's F hidden units into n pieces, piece i becoming
  expert e·n + i (pieces innermost, in hidden-unit order); `split` makes copy c of expert e expert c·E + e (copies
  outermost, so earlier segment pieces stay adjacent).
- `prototype` router, k groups of G = E/k experts (group j holds experts j·G … j·G + G − 1): `segment` turns group
  j into n groups j·n + i, each holding piece i of every expert of group j; `split` puts copy c of local expert a at
  local index c·G + a of the same group.
`merge` undoes either: `how="concat"` joins segment pieces back into whole experts, `how="average"` averages the
copies a split made; "auto" concatenates when the layer's `segments` count is divisible by the factor.

What is exact (dropless layers; see the functions): segment keeps the layer's output, balance loss and z-loss
(up to float rounding); merge(concat) after segment restores the parameters (bit for bit for power-of-two factors;
the logit-offset buffer to rounding unless it was zero); split keeps each original expert's softmax mass and
logsumexp, and the output only for a `topk` router with top_k = 1, renormalised gates and zero noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from .config import EXPERT_OPS, MERGE_HOW, ExpertShape
from .moe import MoELayer
from .sharing import ParamLink, ParamMap

OPS = EXPERT_OPS
MERGE_WEIGHTS = ("load", "uniform")


def _shape_after(layer: MoELayer, op: str, factor: int, what: str, how: str = "auto") -> ExpertShape:
    """`ExpertShape.after` for this layer, its error prefixed with `what`."""
    try:
        return layer_shape(layer).after(op, factor, layer.router.kind, how)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None


def _check_moe(layer: object, what: str) -> MoELayer:
    if not isinstance(layer, MoELayer):
        raise TypeError(f"{what}: expected an MoELayer, got {type(layer).__name__} (a dense FFN has no experts)")
    return layer


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _label(name: str) -> str:
    return name or "MoELayer"


def _groups(layer: MoELayer) -> int:
    """Expert groups the router picks from: k for `prototype`, one pool for `topk`."""
    return layer.top_k if layer.router.kind == "prototype" else 1


# ---------------------------------------------------------------------------------------------- index maps
def segment_index(kind: str, num_experts: int, top_k: int, factor: int) -> tuple[Tensor, Tensor]:
    """(source expert, piece) of every expert after a segment by `factor` (see the module docstring)."""
    ids = torch.arange(num_experts * factor)
    if kind == "topk":
        return ids // factor, ids % factor
    group = num_experts // top_k
    new_group = ids // group
    return (new_group // factor) * group + ids % group, new_group % factor


def split_index(kind: str, num_experts: int, top_k: int, factor: int) -> Tensor:
    """Source expert of every expert after a split by `factor` (copies outermost / within their group)."""
    ids = torch.arange(num_experts * factor)
    if kind == "topk":
        return ids % num_experts
    group = num_experts // top_k
    return (ids // (group * factor)) * group + ids % group


def merge_members(kind: str, num_experts: int, top_k: int, factor: int, how: str) -> Tensor:
    """[E / factor, factor] old experts that form each merged expert (the inverse of `split_index` for
    "average", of `segment_index` for "concat")."""
    if how == "average":
        if kind == "topk":
            merged = num_experts // factor
            return torch.arange(factor) * merged + torch.arange(merged).unsqueeze(1)
        group = num_experts // top_k
        kept = group // factor
        ids = torch.arange(num_experts // factor)
        base = (ids // kept) * group + ids % kept
        return base.unsqueeze(1) + torch.arange(factor) * kept
    if kind == "topk":
        return torch.arange(num_experts).view(-1, factor)
    group = num_experts // top_k
    ids = torch.arange(num_experts // factor)
    base = (ids // group) * factor * group + ids % group
    return base.unsqueeze(1) + torch.arange(factor) * group


# ---------------------------------------------------------------------------------------------- the operations
def segment_experts(layer: MoELayer, factor: int, name: str = "") -> ParamMap:
    """Cut every expert's hidden units into `factor` finer experts and multiply top_k by `factor` — exactly
    function-preserving for a dropless layer (output, balance loss and z-loss, up to float rounding).

    Router rows are duplicated with a −log(factor) logit offset, so each piece of expert e gets p_e / factor and
    the logsumexp is unchanged. `topk`: the top-(k·factor) set is exactly the pieces of the original top-k (barring
    ties), each gated g_e / factor for raw or renormalised gates, so the pieces' output weights are multiplied by
    `factor`. `prototype`: group j becomes `factor` groups with the same softmax, so nothing is rescaled.
    With capacity dropping the `topk` result is approximate (the pieces' queue priorities interleave differently);
    the `prototype` result stays exact. `name` prefixes the parameter names in the ParamMap and the errors.
    """
    what = f"segment_experts({_label(name)})"
    layer = _check_moe(layer, what)
    new = _shape_after(layer, "segment", factor, what)
    router, experts = layer.router, layer.experts
    num_experts, top_k = layer.num_experts, layer.top_k
    d_ff = experts.w_gate.shape[1]
    src, piece = segment_index(router.kind, num_experts, top_k, factor)
    src, piece = src.to(router.weight.device), piece.to(router.weight.device)
    scale = float(factor) if router.kind == "topk" else 1.0

    def rows(t: list[Tensor]) -> Tensor:
        return t[0][src]

    def up(t: list[Tensor]) -> Tensor:  # w_gate / w_up [E, F, D] → [E·n, F/n, D]
        w = t[0]
        return w.view(num_experts, factor, d_ff // factor, w.shape[-1])[src, piece]

    def down(t: list[Tensor]) -> Tensor:  # w_down [E, D, F] → [E·n, D, F/n]
        w = t[0]
        return w.view(num_experts, w.shape[1], factor, d_ff // factor)[src, :, piece]

    def down_scaled(t: list[Tensor]) -> Tensor:
        return down(t) * scale

    offset = router.logit_offset[src] - math.log(factor)
    plan = [("router.weight", rows, None, factor), ("experts.w_gate", up, None, 1),
            ("experts.w_up", up, None, 1), ("experts.w_down", down_scaled, down, factor)]
    param_map = _rebuild(layer, plan, name, "segment")
    _set_shape(layer, new, offset)
    return param_map


def split_experts(layer: MoELayer, factor: int, noise: float = 0.0, generator: torch.Generator | None = None,
                  name: str = "") -> ParamMap:
    """Clone every expert into `factor` copies (parameters grow, top_k unchanged); router rows are copied with a
    −log(factor) logit offset, so each original expert's softmax mass and the logsumexp (z-loss) are preserved.

    `noise` adds Gaussian noise of that size relative to the router weight's RMS to the copies' router rows,
    centred over the copies of each expert (their mean stays the original row): identical copies tie exactly, and
    without noise they receive identical tokens and gradients forever. `topk`: pieces of one segmented expert get
    the same noise, so they stay selected together.
    Not function-preserving in general: copies at p_e / factor can take several top-k slots, and raw gates shrink.
    Exact (up to rounding) for a dropless `topk` router with top_k = 1, renormalised gates and zero noise: the
    winner's copies tie above every other expert's, and the chosen copy has gate 1 and the original's weights.
    """
    what = f"split_experts({_label(name)})"
    layer = _check_moe(layer, what)
    new = _shape_after(layer, "split", factor, what)
    if noise < 0:
        raise ValueError(f"{what}: noise={noise} must be >= 0")
    router = layer.router
    num_experts, top_k = layer.num_experts, layer.top_k
    device = router.weight.device
    src = split_index(router.kind, num_experts, top_k, factor).to(device)

    def gather(t: list[Tensor]) -> Tensor:
        return t[0][src]

    router_rows = gather
    if noise > 0:
        weight = router.weight.detach()
        rms = float(weight.float().pow(2).mean().sqrt())
        if router.kind == "topk":
            units = num_experts // layer.segments
            eps = torch.randn(factor, units, weight.shape[1], generator=generator, dtype=torch.float64)
            eps = eps.repeat_interleave(layer.segments, dim=1)
        else:
            eps = torch.randn(factor, num_experts, weight.shape[1], generator=generator, dtype=torch.float64)
            group = num_experts // top_k
            # row order of the split: group j, copy c, local a → [k, c, G] from [c, k·G]
            eps = eps.view(factor, top_k, group, -1).transpose(0, 1)
        eps = eps - eps.mean(dim=1 if router.kind == "prototype" else 0, keepdim=True)
        delta = (eps.reshape(num_experts * factor, -1) * (noise * rms)).to(device=device, dtype=weight.dtype)

        def router_rows(t: list[Tensor]) -> Tensor:
            return t[0][src] + delta

    offset = router.logit_offset[src] - math.log(factor)
    plan = [("router.weight", router_rows, gather, factor), ("experts.w_gate", gather, None, factor),
            ("experts.w_up", gather, None, factor), ("experts.w_down", gather, None, factor)]
    param_map = _rebuild(layer, plan, name, "split")
    _set_shape(layer, new, offset)
    return param_map


def merge_experts(layer: MoELayer, factor: int, weights: Literal["load", "uniform"] = "uniform",
                  load: Tensor | None = None, how: Literal["auto", "concat", "average"] = "auto",
                  name: str = "") -> ParamMap:
    """Merge every `factor` experts into one — the inverse direction of segment and split.

    `how="concat"` (what "auto" picks when the layer's `segments` is divisible by `factor`): concatenate segment
    pieces back into whole experts, divide top_k by `factor` and undo the output-weight scaling — the exact inverse
    of `segment_experts` (parameters restored bit for bit for power-of-two factors, to rounding otherwise).
    `how="average"`: a weighted average of the experts a split made (weights ∝ `load`, the experts' token counts,
    or uniform; uniform where the group saw no tokens); top_k unchanged. Lossy for experts that trained apart
    (their hidden units are not aligned).
    Either way, router rows are averaged with the same weights and the logit offsets merged by logsumexp, so
    identical rows keep exactly their summed softmax mass.
    """
    what = f"merge_experts({_label(name)})"
    layer = _check_moe(layer, what)
    if weights not in MERGE_WEIGHTS:
        raise ValueError(f"{what}: weights={weights!r} must be one of {MERGE_WEIGHTS}")
    new = _shape_after(layer, "merge", factor, what, how)
    how = layer_shape(layer).merge_how(factor, how)
    router, experts = layer.router, layer.experts
    num_experts = layer.num_experts
    kind = router.kind
    device = router.weight.device
    members = merge_members(kind, num_experts, _groups(layer), factor, how).to(device)
    mix = _merge_weights(weights, load, members, num_experts, what)
    scale = float(factor) if kind == "topk" else 1.0
    d_ff = experts.w_gate.shape[1]

    def average(t: list[Tensor]) -> Tensor:
        w = t[0]
        picked = w[members]  # [E', n, ...]
        return (picked * mix.view(*mix.shape, *([1] * (w.dim() - 1))).to(w.dtype)).sum(1)

    def cat_up(t: list[Tensor]) -> Tensor:  # [E, F, D] → [E/n, n·F, D]
        w = t[0]
        return w[members].reshape(members.shape[0], factor * d_ff, w.shape[-1])

    def cat_down(t: list[Tensor]) -> Tensor:  # [E, D, F] → [E/n, D, n·F]
        w = t[0]
        return w[members].permute(0, 2, 1, 3).reshape(members.shape[0], w.shape[1], factor * d_ff)

    def cat_down_scaled(t: list[Tensor]) -> Tensor:
        return cat_down(t) / scale

    offsets = router.logit_offset[members]
    offset = torch.logsumexp(offsets.to(torch.promote_types(offsets.dtype, torch.float32)), dim=1)
    if how == "concat":
        plan = [("router.weight", average, None, 1 / factor), ("experts.w_gate", cat_up, None, 1),
                ("experts.w_up", cat_up, None, 1), ("experts.w_down", cat_down_scaled, cat_down, 1 / factor)]
    else:
        plan = [(pname, average, None, 1 / factor)
                for pname in ("router.weight", "experts.w_gate", "experts.w_up", "experts.w_down")]
    param_map = _rebuild(layer, plan, name, "merge")
    _set_shape(layer, new, offset)
    return param_map


def _merge_weights(weights: str, load: Tensor | None, members: Tensor, num_experts: int, what: str) -> Tensor:
    """[E', n] fp64 mixing weights, rows summing to 1 (cast to each tensor's dtype where they are applied)."""
    uniform = torch.full(members.shape, 1.0 / members.shape[1], device=members.device, dtype=torch.float64)
    if weights == "uniform":
        return uniform
    if load is None:
        raise ValueError(f"{what}: weights='load' needs the experts' token counts (load=[{num_experts}] tensor); "
                         f"pass load= or weights='uniform'")
    if tuple(load.shape) != (num_experts,):
        raise ValueError(f"{what}: load has shape {tuple(load.shape)}; expected ({num_experts},), one count per "
                         f"expert")
    picked = load.to(device=members.device, dtype=torch.float64)[members]
    total = picked.sum(1, keepdim=True)
    return torch.where(total > 0, picked / total.clamp(min=1e-12), uniform)


def _rebuild(layer: MoELayer, plan: list, prefix: str, kind: str) -> ParamMap:
    """Replace the layer's four parameters per `plan` [(name, derive, state_derive | None, fan_out)] → ParamMap."""
    param_map = ParamMap()
    with torch.no_grad():
        for pname, derive, state_derive, fan_out in plan:
            owner = layer.get_submodule(pname.rsplit(".", 1)[0])
            attr = pname.rsplit(".", 1)[1]
            old: nn.Parameter = getattr(owner, attr)
            new = nn.Parameter(derive([old.detach()]).contiguous(), requires_grad=old.requires_grad)
            setattr(owner, attr, new)
            param_map.links.append(ParamLink(new=new, new_name=_join(prefix, pname), sources=[old],
                                              source_names=[_join(prefix, pname)], transform=derive,
                                              state_transform=_contiguous(state_derive or derive), fan_out=fan_out,
                                              kind=kind))
    return param_map


def _contiguous(fn: Callable[[list[Tensor]], Tensor]) -> Callable[[list[Tensor]], Tensor]:
    return lambda tensors: fn(tensors).contiguous()


def _set_shape(layer: MoELayer, shape: ExpertShape, offset: Tensor) -> None:
    layer.num_experts = layer.router.num_experts = layer.experts.num_experts = shape.num_experts
    layer.top_k = layer.router.top_k = shape.top_k
    layer.segments = shape.segments
    layer.router.logit_offset = offset.detach().to(layer.router.logit_offset.dtype).contiguous()


def layer_shape(layer: MoELayer) -> ExpertShape:
    """The expert shape an MoELayer has now (what the config records for its block)."""
    return ExpertShape(layer.num_experts, layer.top_k, layer.experts.w_gate.shape[1], layer.segments)


# ---------------------------------------------------------------------------------------------- on a model
def moe_blocks_of(model: nn.Module, layers: Sequence[int] | str = "all") -> dict[int, list[int]]:
    """Physical MoE blocks that run the given logical layers ("all": every MoE layer) → the layers each one runs.

    Errors name the culprit: a layer index out of range, or a layer whose FFN is dense.
    """
    num_layers = len(model.layer_to_block)
    if layers == "all":
        wanted = [i for i in range(num_layers) if model.blocks[model.layer_to_block[i]].is_moe]
        if not wanted:
            raise ValueError("layers='all': the model has no MoE layer (moe_layers='none')")
    elif isinstance(layers, str):
        raise ValueError(f"layers={layers!r}: must be 'all' or a list of logical layer indices")
    else:
        wanted = list(layers)
        if not wanted:
            raise ValueError("layers=[]: name at least one logical layer, or 'all'")
    for layer in wanted:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise ValueError(f"layer {layer!r} is not a logical layer index in [0, num_layers={num_layers})")
        block = model.layer_to_block[layer]
        if not model.blocks[block].is_moe:
            raise ValueError(f"layer {layer} is not an MoE layer (its block {block} has a dense FFN; "
                             f"moe_layers={model.config.moe_layers!r})")
    out: dict[int, list[int]] = {}
    for block in sorted({model.layer_to_block[i] for i in wanted}):
        out[block] = [i for i, b in enumerate(model.layer_to_block) if b == block]
    return out


def apply_expert_op(model: nn.Module, op: str, factor: int, layers: Sequence[int] | str = "all", *,
                    noise: float = 0.0, generator: torch.Generator | None = None,
                    weights: Literal["load", "uniform"] = "uniform", loads: dict[int, Tensor] | None = None,
                    how: Literal["auto", "concat", "average"] = "auto") -> ParamMap:
    """Apply `op` ("segment" | "split" | "merge") to the MoE blocks of an M6Model that run `layers`, and record
    each block's new shape in `model.config.expert_overrides` (so a model rebuilt from the config matches).

    A shared block changes once, for every layer that runs it. `loads` (merge with weights="load"): logical layer
    → that layer's expert token counts; a shared block merges on the sum over its layers.
    """
    if op not in OPS:
        raise ValueError(f"op={op!r} must be one of {OPS}")
    blocks = moe_blocks_of(model, layers)
    param_map = ParamMap()
    for block, runs in blocks.items():
        moe = model.blocks[block].ffn
        name = f"blocks.{block}.ffn"
        if op == "segment":
            part = segment_experts(moe, factor, name=name)
        elif op == "split":
            part = split_experts(moe, factor, noise=noise, generator=generator, name=name)
        else:
            load = None
            if weights == "load":
                if loads is None or not any(i in loads for i in runs):
                    raise ValueError(f"merge with weights='load': no expert load given for layers {runs} "
                                     f"(block {block}); pass loads= or weights='uniform'")
                load = sum(loads[i].to(moe.router.weight.device) for i in runs if i in loads)
            part = merge_experts(moe, factor, weights=weights, load=load, how=how, name=name)
        param_map.extend(part)
        model.config.set_expert_shape(block, layer_shape(moe))
    model.config.validate()
    return param_map


def match_expert_shapes(model: nn.Module, overrides: list[dict[str, int]] | None) -> list[int]:
    """Give the model's MoE blocks the expert shapes `overrides` describe (a checkpoint's structural state), with
    fresh uninitialised parameters on the old ones' device and dtype — the weights are about to be loaded.
    Returns the rebuilt block indices."""
    config = model.config
    config.expert_overrides = [dict(e) for e in overrides] if overrides else None
    config.validate()
    rebuilt = []
    for block, module in enumerate(model.blocks):
        if not module.is_moe:
            continue
        want = config.expert_shape(block)
        if layer_shape(module.ffn) == want:
            continue
        old = module.ffn
        fresh = MoELayer(config.d_model, want.expert_d_ff, want.num_experts, want.top_k, router=config.router,
                         capacity_factor=config.capacity_factor, norm_topk=config.router_norm_topk,
                         segments=want.segments, init_std=old.router.init_std,
                         out_init_std=old.experts.out_init_std, device="meta")
        _empty_like(fresh, old)
        module.ffn = fresh
        rebuilt.append(block)
    return rebuilt


def _empty_like(fresh: nn.Module, old: nn.Module) -> None:
    """Give `fresh`'s (meta) tensors uninitialised storage on the device and dtype of `old`'s tensor of the same
    name (shapes stay `fresh`'s); requires_grad follows `old`. No random numbers are drawn."""
    like = dict(old.named_parameters())
    like.update(old.named_buffers())
    for prefix, module in fresh.named_modules():
        for table in (module._parameters, module._buffers):
            for tname, tensor in table.items():
                if tensor is None:
                    continue
                ref = like[f"{prefix}.{tname}" if prefix else tname]
                empty = torch.empty_like(tensor, device=ref.device, dtype=ref.dtype)
                table[tname] = nn.Parameter(empty, requires_grad=ref.requires_grad) if table is module._parameters \
                    else empty


__all__ = ["MERGE_HOW", "MERGE_WEIGHTS", "OPS", "apply_expert_op", "layer_shape", "match_expert_shapes",
           "merge_experts", "merge_members", "moe_blocks_of", "segment_experts", "segment_index", "split_experts",
           "split_index"]
