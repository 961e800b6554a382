"""The memory model of a placement: bytes per GPU and per host, and PCIe bytes per optimizer step.

The estimate counts bytes from parameter shapes only, so it works on the meta device for models far larger than any
machine. Per parameter, a resident one costs fp32 weight + fp32 gradient + optimizer state (+ its bf16 autocast copy
under bf16-mixed) on the GPU; an offloaded one costs, with the host engine's lean layout (`host_layout="engine"`),
fp32 master + optimizer state + its stream-dtype gradient landing buffer on the host (the bf16 stream copy doubles as
the landing buffer of bf16-streamed parameters; an fp32 accumulator only with gradient accumulation; only what
crosses PCIe is pinned), and only a few blocks' stream copies on the GPU. Host bytes count the streamer's 64-element
alignment, so the estimate equals what it allocates. Activations use a per-token count of the tensors one block
saves for backward (documented in `activation_bytes_per_token`); treat them as an estimate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from m6lit.model.moe import GroupedExperts
from m6lit.strategies.streaming import ALIGN, autocast_consumed

PRECISIONS = ("32-true", "bf16-mixed")
HOST_LAYOUTS = ("engine", "engine-backward", "engine-delayed", "legacy")


def find_blocks(root: nn.Module) -> tuple[str | None, nn.ModuleList | None, list[int] | None]:
    """The ModuleList holding most parameters (the transformer blocks), its name, and the logical→physical layer
    map of its owner (M6Model.layer_to_block) when there is one."""
    best: tuple[int, str | None, nn.ModuleList | None] = (0, None, None)
    for name, mod in root.named_modules():
        if isinstance(mod, nn.ModuleList):
            count = sum(p.numel() for p in mod.parameters())
            if count > best[0]:
                best = (count, name, mod)
    _, name, blocks = best
    if name is None or blocks is None:
        return None, None, None
    owner = root.get_submodule(name.rsplit(".", 1)[0]) if "." in name else root
    mapping = getattr(owner, "layer_to_block", None)
    return name, blocks, list(mapping) if mapping is not None else None


def find_config(root: nn.Module) -> Any:
    """The first `config` in `root` that looks like an M6Config (has d_model and num_layers), else None."""
    for mod in root.modules():
        config = getattr(mod, "config", None)
        if config is not None and hasattr(config, "d_model") and hasattr(config, "num_layers"):
            return config
    return None


def activation_bytes_per_token(config: Any, precision: str) -> tuple[float, float]:
    """(bytes per token for all layers, bytes per text token for the LM head and loss) saved for backward.

    Per layer under bf16-mixed: attention saves the fp32 residual (4d), its bf16 norm output (2d), q/k/v (6d), the
    attention output and its reshaped copy (4d), the FFN norm input and output (6d) = 22d; a dense SwiGLU saves
    gate, silu, up and product (8 d_ff); an MoE layer saves fp32 router logits/probabilities (~12 E) plus, per routed
    slot (k), its dispatched row and output (4d) and its expert activations (8 d_ff_e). fp32 doubles the bf16 terms.
    The head keeps logits in bf16 and fp32, log-probabilities and their gradient (~12 V).
    A checkpointed layer (`config.activation_checkpointing`) keeps only its fp32 block input (4d) and re-creates its
    own activations while its backward runs, when the layers after it have released theirs: the result is the peak,
    the larger of the end of the forward and each checkpointed layer's recompute on top of the layers before it.
    """
    scale = 1.0 if precision == "bf16-mixed" else 2.0
    d, v = config.d_model, config.vocab_size
    checkpointed = getattr(config, "is_checkpointed_layer", lambda layer: False)
    before = peak = 0.0
    for layer in range(config.num_layers):
        per = (22 if scale == 1.0 else 36) * d
        if config.is_moe_layer(layer):
            per += 12 * config.num_experts + scale * config.top_k * (4 * d + 8 * config.expert_hidden) + 4 * d
        else:
            per += scale * 8 * config.d_ff
        if checkpointed(layer):
            peak = max(peak, before + per)
            per = 4 * d
        before += per
    return max(peak, before), (12 if scale == 1.0 else 16) * v


@dataclass
class Row:
    """One line of the placement table: a block, or a module outside the blocks."""

    name: str
    numel: int
    stream_bytes: int
    low_precision_numel: int
    expert_numel: int = 0
    is_block: bool = False
    is_moe: bool = False
    layers: list[int] = field(default_factory=list)
    runs: int = 1
    offloaded: bool = False
    host_lp: int = 0  # aligned elements the streamer lays out in the low-precision stream dtype
    host_fp: int = 0  # aligned elements streamed in fp32


def _measure(module: nn.Module, precision: str, num_gpus: int, seen: set[int],
             shared: bool = False) -> tuple[int, int, int, int]:
    """(numel, stream bytes, low-precision numel, expert numel) of `module`'s parameters not in `seen` (then added);
    expert matrices are divided over `num_gpus` as expert parallelism would. A shared block (`shared`) streams all
    in fp32, as the streamer does. `_measure.layout` keeps the aligned (low-precision, fp32) element counts."""
    numel = stream = low = experts = 0
    aligned_lp = aligned_fp = 0
    for mod in module.modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = p.numel()
            if isinstance(mod, GroupedExperts):
                n = math.ceil(n / num_gpus)
                experts += n
            numel += n
            padded = -(-n // ALIGN) * ALIGN
            if precision == "bf16-mixed" and not shared and autocast_consumed(mod, p_name):
                low += n
                stream += 2 * n
                aligned_lp += padded
            else:
                stream += p.element_size() * n
                aligned_fp += padded
    _measure.layout = (aligned_lp, aligned_fp)  # type: ignore[attr-defined]
    return numel, stream, low, experts


def measure_rows(root: nn.Module, precision: str, num_gpus: int) -> list[Row]:
    """Rows for every parameter of `root` (each counted once): one per physical block, one per other top-level
    module, and "(other)" for the rest."""
    blocks_name, blocks, mapping = find_blocks(root)
    seen: set[int] = set()
    block_rows: list[Row] = []
    if blocks is not None and blocks_name is not None:
        for i, block in enumerate(blocks):
            layers = [layer for layer, b in enumerate(mapping) if b == i] if mapping is not None else [i]
            runs = sum(1 for j, layer in enumerate(layers) if j == 0 or layers[j - 1] != layer - 1)
            numel, stream, low, experts = _measure(block, precision, num_gpus, seen, shared=len(layers) > 1)
            block_rows.append(Row(f"{blocks_name}.{i}", numel, stream, low, experts, is_block=True,
                                  is_moe=any(isinstance(m, GroupedExperts) for m in block.modules()), layers=layers,
                                  runs=max(runs, 1), host_lp=_measure.layout[0], host_fp=_measure.layout[1]))
    others: list[Row] = []
    for name, mod in root.named_modules():
        if not name or (blocks_name and (name == blocks_name or name.startswith(blocks_name + "."))):
            continue
        if any(name.startswith(o.name + ".") for o in others) or (blocks_name and blocks_name.startswith(name + ".")):
            continue
        numel, stream, low, experts = _measure(mod, precision, num_gpus, seen)
        if numel:
            others.append(Row(name, numel, stream, low, experts, host_lp=_measure.layout[0],
                              host_fp=_measure.layout[1]))
    numel, stream, low, experts = _measure(root, precision, num_gpus, seen)
    if numel:
        others.append(Row("(other)", numel, stream, low, experts, host_lp=_measure.layout[0],
                          host_fp=_measure.layout[1]))
    return others[:1] + block_rows + others[1:]


def apply_units(root: nn.Module, rows: list[Row], names: Sequence[str], precision: str, num_gpus: int) -> list[Row]:
    """Mark rows inside an offloaded unit; a row holding units without being one (e.g. `*.experts` inside a block) is
    split into one row per unit plus the resident remainder."""
    out: list[Row] = []
    for row in rows:
        if any(row.name == n or row.name.startswith(n + ".") for n in names):
            row.offloaded = True
            out.append(row)
            continue
        inner = [n for n in names if n.startswith(row.name + ".")]
        if not inner:
            out.append(row)
            continue
        rest = Row(row.name + " (rest)", row.numel, row.stream_bytes, row.low_precision_numel, row.expert_numel,
                   is_moe=row.is_moe, layers=row.layers, runs=row.runs)
        for n in inner:
            numel, stream, low, experts = _measure(root.get_submodule(n), precision, num_gpus, set(),
                                                   shared=len(row.layers) > 1)
            out.append(Row(n, numel, stream, low, experts, is_moe=row.is_moe, layers=row.layers, runs=row.runs,
                           offloaded=True, host_lp=_measure.layout[0], host_fp=_measure.layout[1]))
            rest.numel -= numel
            rest.stream_bytes -= stream
            rest.low_precision_numel -= low
            rest.expert_numel -= experts
        out.append(rest)
    return out


@dataclass
class MemoryEstimate:
    """Bytes per GPU and per host for one placement (see the module docstring for what each term counts)."""

    gpu: dict[str, float]
    host: dict[str, float]
    pinned: float
    h2d_per_step: float
    d2h_per_step: float
    resident_params: int
    offloaded_params: int
    tokens: int
    micro_batches: int = 1
    precision: str = "bf16-mixed"
    optimizer_state_bytes: int = 8

    def row_bytes(self, row: Row) -> int:
        """GPU bytes of a resident row, or host bytes of an offloaded one (weights, gradients, state, copies)."""
        bf16 = 2 * row.low_precision_numel if self.precision == "bf16-mixed" else 0
        return (8 + self.optimizer_state_bytes) * row.numel + bf16

    @property
    def gpu_total(self) -> float:
        return sum(self.gpu.values())

    @property
    def host_total(self) -> float:
        return sum(self.host.values())


def estimate(rows: Sequence[Row], config: Any, *, precision: str = "bf16-mixed", micro_batch_tokens: int = 8192,
             prefetch: int = 1, optimizer_state_bytes: int = 8, accumulate_grad_batches: int = 1,
             reserve_bytes: int = 2 * 2**30, buffer_bytes: int = 0, host_layout: str = "engine") -> MemoryEstimate:
    """Memory per GPU and host, and PCIe bytes per optimizer step, for the placement in `rows`.

    `host_layout`: `engine` (the host engine's lean buffers), `engine-backward` (plus the backup copy of master and
    Adam state that `optimizer_overlap: backward` keeps per unit while it speculates), `engine-delayed` (plus an fp32
    gradient stash and separate fp32 stream copies for fp32-streamed parameters) or `legacy` (host fp32
    gradients exposed as `.grad`: every buffer pinned, an fp32 gradient per parameter)."""
    if host_layout not in HOST_LAYOUTS:
        raise ValueError(f"host_layout={host_layout!r}: choose one of {HOST_LAYOUTS}")
    res = [r for r in rows if not r.offloaded]
    off = [r for r in rows if r.offloaded]
    n_res = sum(r.numel for r in res)
    n_off = sum(r.numel for r in off)
    lp_res = sum(r.low_precision_numel for r in res) if precision == "bf16-mixed" else 0
    act = logits = mask = 0.0
    if config is not None:
        per_token, per_text_token = activation_bytes_per_token(config, precision)
        act = per_token * micro_batch_tokens
        logits = per_text_token * micro_batch_tokens
        mask = micro_batch_tokens * config.max_seq_len
    biggest = max((r.stream_bytes for r in off), default=0)
    # live at once: the unit in use, `prefetch` ahead and one kept across the forward/backward turn, plus the
    # gradient of the unit whose backward just ran (before its copy to the host)
    stream_buffers = (min(len(off), prefetch + 2) + 1) * biggest if off else 0
    gpu = {"parameters (fp32)": 4.0 * n_res, "gradients (fp32)": 4.0 * n_res,
           "optimizer state": float(optimizer_state_bytes * n_res), "autocast copies (bf16)": 2.0 * lp_res,
           "stream buffers": float(stream_buffers), "activations": act + mask, "logits and loss": logits,
           "buffers": float(buffer_bytes), "CUDA context and workspace": float(reserve_bytes)}
    lp_off = sum(r.low_precision_numel for r in off) if precision == "bf16-mixed" else 0
    fp_off = n_off - lp_off
    if host_layout == "legacy":
        stage32 = 4.0 * fp_off if accumulate_grad_batches > 1 else 0.0
        host = {"fp32 masters": 4.0 * n_off, "gradients (fp32)": 4.0 * n_off,
                "optimizer state": float(optimizer_state_bytes * n_off), "bf16 stream copies": 2.0 * lp_off,
                "gradient stage": stage32}
        pinned = 8.0 * n_off + 2.0 * lp_off + stage32
    else:
        a_lp = sum(r.host_lp for r in off)
        a_fp = sum(r.host_fp for r in off)
        accumulate = accumulate_grad_batches > 1
        scratch = 0 if accumulate else 4 * max((r.host_lp for r in off), default=0)
        host = {"fp32 masters": 4.0 * (a_lp + a_fp), "optimizer state": float(optimizer_state_bytes * n_off),
                "bf16 stream copies (and gradient landing)": 2.0 * a_lp, "fp32 gradient landing": 4.0 * a_fp,
                "fp32 accumulators": 4.0 * (a_lp + a_fp) if accumulate else 0.0, "engine scratch": float(scratch),
                "speculation backup": float((4 + optimizer_state_bytes) * n_off)
                if host_layout == "engine-backward" else 0.0}
        pinned = 2.0 * a_lp + 8.0 * a_fp
        if host_layout == "engine-delayed":
            host["fp32 stream copies"] = 4.0 * a_fp
            host["delayed gradient stash"] = 4.0 * (a_lp + a_fp)
            host["fp32 gradient landing"] = 0.0  # fp32 gradients land in the separate stream copy
            host["engine scratch"] = 0.0 if accumulate else 4.0 * max((max(r.host_lp, r.host_fp) for r in off),
                                                                      default=0)
            pinned = 2.0 * a_lp + 4.0 * a_fp
    micro = max(accumulate_grad_batches, 1)
    h2d = sum(r.stream_bytes * 2 * r.runs for r in off) * micro
    d2h = sum(r.stream_bytes for r in off) * micro
    return MemoryEstimate(gpu=gpu, host=host, pinned=pinned, h2d_per_step=h2d, d2h_per_step=d2h,
                          resident_params=n_res, offloaded_params=n_off, tokens=micro_batch_tokens * micro,
                          micro_batches=micro, precision=precision, optimizer_state_bytes=optimizer_state_bytes)


def active_params(config: Any, rows: Sequence[Row]) -> float:
    """Parameters one token multiplies through: everything outside the blocks, and per logical layer its block's
    dense part plus top_k experts (MoE)."""
    expert = 3 * config.d_model * config.expert_hidden
    total = 0.0
    for row in rows:
        if not row.layers:
            total += row.numel
            continue
        own = row.numel - row.expert_numel + (config.top_k * expert if row.expert_numel else 0)
        total += own * len(row.layers)
    return total


__all__ = ["HOST_LAYOUTS", "PRECISIONS", "MemoryEstimate", "Row", "activation_bytes_per_token", "active_params",
           "apply_units", "estimate", "find_blocks", "find_config", "measure_rows"]
