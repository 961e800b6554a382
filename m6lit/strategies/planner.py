"""OffloadPlan: which modules live in host memory, and what the GPU and the host need for it.

Two ways to choose: `offload` patterns over module names (globs plus integer ranges: `model.blocks.[4-11]`,
`*.experts`), or a `gpu_memory_budget` for which `plan_offload` keeps embeddings, head, norms and the first and last
layers' blocks resident and streams the other blocks, dense before MoE and every other layer first (so a prefetch
can run ahead across the resident block in between), until the estimate fits.

The estimate counts bytes from parameter shapes only, so it works on the meta device for models far larger than any
machine (`m6lit plan --config configs/m6-10t.yaml --gpu_memory_budget 80GB --num_gpus 512`). Per parameter, a
resident one costs fp32 weight + fp32 gradient + optimizer state (+ its bf16 autocast copy under bf16-mixed) on the
GPU; an offloaded one costs, with the host engine's lean layout (`host_layout="engine"`), fp32 master + optimizer
state + its stream-dtype gradient landing buffer on the host (the bf16 stream copy doubles as the landing buffer of
bf16-streamed parameters; an fp32 accumulator only with gradient accumulation; only what crosses PCIe is pinned), and
only a few blocks' stream copies on the GPU. Host bytes count the streamer's 64-element alignment, so the estimate
equals what it allocates. Activations use a per-token count of the tensors one block saves for
backward (documented in `activation_bytes_per_token`); treat them as an estimate.
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from m6lit.model.moe import GroupedExperts
from m6lit.strategies.streaming import ALIGN, autocast_consumed

PRECISIONS = ("32-true", "bf16-mixed")
HOST_LAYOUTS = ("engine", "engine-backward", "engine-delayed", "legacy")
PCIE_BYTES_PER_S = 55e9
CPU_ADAM_PARAMS_PER_S = 4.26e9
ASSUMED_FLOPS = 400e12
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


# ---------------------------------------------------------------------------------------------- sizes
def parse_bytes(value: float | str) -> int:
    """`80GB` (10^9), `80GiB` (2^30), `1.5e11` or an int → bytes."""
    if isinstance(value, bool):
        raise TypeError(f"not a memory size: {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"memory size must be positive, got {value!r}")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMGT]i?B|B)?\s*", str(value),
                         flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"not a memory size: {value!r} (examples: 80GB, 96GiB, 1.5e11)")
    number, unit = float(match.group(1)), (match.group(2) or "").upper()
    if number <= 0:
        raise ValueError(f"memory size must be positive, got {value!r}")
    return int(number * _UNITS[unit])


def format_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


# ---------------------------------------------------------------------------------------------- patterns
def _pattern_regex(pattern: str, widen: bool = False) -> re.Pattern[str]:
    """Glob (`*` any run of characters, `?` one) with integer ranges `[a-b]` or lists `[1,3,5]`; `widen` turns
    every range into "any integer" (to tell a typo from blocks that do not exist yet)."""
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "[":
            end = pattern.find("]", i)
            if end < 0:
                raise ValueError(f"offload pattern {pattern!r}: unclosed '['")
            body = pattern[i + 1:end].replace(" ", "")
            numbers: list[int] = []
            for part in body.split(","):
                bounds = re.fullmatch(r"(\d+)-(\d+)|(\d+)", part)
                if not bounds:
                    raise ValueError(f"offload pattern {pattern!r}: '[{body}]' must be an integer range like [4-11] "
                                     f"or a list like [1,3,5]")
                if bounds.group(3) is not None:
                    numbers.append(int(bounds.group(3)))
                else:
                    lo, hi = int(bounds.group(1)), int(bounds.group(2))
                    if lo > hi:
                        raise ValueError(f"offload pattern {pattern!r}: empty range [{lo}-{hi}]")
                    numbers.extend(range(lo, hi + 1))
            out.append(r"\d+" if widen else "(?:" + "|".join(str(n) for n in sorted(set(numbers))) + ")")
            i = end + 1
        elif ch == "*":
            out.append(".*")
            i += 1
        elif ch == "?":
            out.append(".")
            i += 1
        else:
            out.append(re.escape(ch))
            i += 1
    return re.compile("".join(out))


def _has_forward(module: nn.Module) -> bool:
    return type(module).forward is not nn.Module.forward


def _expand(name: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
    """A module that is only a container (no forward of its own, e.g. ModuleList) stands for its children."""
    if _has_forward(module):
        return [(name, module)]
    out = []
    for child_name, child in module.named_children():
        out.extend(_expand(f"{name}.{child_name}", child))
    return out


def resolve_offload(root: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Module names (outermost matches with parameters, in module order) selected by `patterns`.

    A pattern that matches nothing fails with the closest module names — unless it only names indices that do
    not exist yet (e.g. `model.blocks.[4-11]` before a delink makes those blocks), which is allowed.
    """
    if isinstance(patterns, str):
        raise TypeError(f"offload must be a list of patterns, got the string {patterns!r}")
    modules = dict(root.named_modules())
    names = [n for n in modules if n]
    chosen: list[str] = []
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern.strip():
            raise ValueError(f"offload pattern {pattern!r}: must be a non-empty string")
        regex = _pattern_regex(pattern)
        hits = [n for n in names if regex.fullmatch(n)]
        if not hits and not any(_pattern_regex(pattern, widen=True).fullmatch(n) for n in names):
            plain = re.sub(r"\[[^\]]*\]", "0", pattern).replace("*", "").replace("?", "")
            close = difflib.get_close_matches(plain, names, n=6, cutoff=0.3)
            blocks = sorted({re.sub(r"\.\d+(\.|$)", r".N\1", n) for n in names if re.search(r"\.\d+$", n)})[:4]
            raise ValueError(f"offload pattern {pattern!r} matches no module. Closest names: {close or names[:6]}; "
                             f"numbered modules look like {blocks} (use ranges such as model.blocks.[4-11])")
        chosen.extend(hits)
    expanded: list[str] = []
    for name in dict.fromkeys(chosen):
        for sub_name, sub in _expand(name, modules[name]):
            if any(True for _ in sub.parameters()):
                expanded.append(sub_name)
    outer = [n for n in expanded if not any(n.startswith(o + ".") for o in expanded if o != n)]
    order = {n: i for i, n in enumerate(modules)}
    return sorted(dict.fromkeys(outer), key=order.__getitem__)


def resident_params(root: nn.Module, units: Sequence[str]) -> set[int]:
    """Ids of parameters inside `units` that a module outside the unit also holds (tied weights): they stay on the
    GPU, since streaming them would change what the outside module sees."""
    owners: dict[int, set[str]] = {}
    for mod_name, mod in root.named_modules(remove_duplicate=False):
        for _, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), set()).add(mod_name)
    keep = set()
    for unit in units:
        prefix = unit + "."
        for p in root.get_submodule(unit).parameters():
            if any(not (o == unit or o.startswith(prefix)) for o in owners[id(p)]):
                keep.add(id(p))
    return keep


# ---------------------------------------------------------------------------------------------- model shape
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


def _rows(root: nn.Module, precision: str, num_gpus: int) -> list[Row]:
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


def _apply_units(root: nn.Module, rows: list[Row], names: Sequence[str], precision: str, num_gpus: int) -> list[Row]:
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


# ---------------------------------------------------------------------------------------------- estimate
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


# ---------------------------------------------------------------------------------------------- the plan
@dataclass
class OffloadPlan:
    """A placement (`offload`: the module names that live in host memory) with its rows and memory estimate."""

    offload: list[str]
    rows: list[Row]
    estimate: MemoryEstimate
    gpu_memory_budget: int | None = None
    host_memory_budget: int | None = None
    config: Any = None
    num_gpus: int = 1

    def table(self) -> str:
        """The placement and the memory estimate as text (consecutive blocks of one placement share a line)."""
        header = (f"{'module':<34} {'placement':<9} {'params':>9} {'GPU bytes':>11} {'host bytes':>11} "
                  f"{'PCIe/step':>11}")
        lines = [header]
        est = self.estimate
        for group in _group_rows(self.rows):
            first = group[0]
            name = first.name if len(group) == 1 else _range_name(group)
            numel = sum(r.numel for r in group)
            where = "host" if first.offloaded else "GPU"
            size = sum(est.row_bytes(r) for r in group)
            gpu_b, host_b = (0, size) if first.offloaded else (size, 0)
            pcie = sum(r.stream_bytes * (2 * r.runs + 1) for r in group) * est.micro_batches if first.offloaded else 0
            lines.append(f"{name:<34} {where:<9} {format_count(numel):>9} {_fb(gpu_b):>11} {_fb(host_b):>11} "
                         f"{_fb(pcie):>11}")
        total = est.resident_params + est.offloaded_params
        lines.append(f"parameters: {format_count(total)} ({format_count(est.resident_params)} on the GPU, "
                     f"{format_count(est.offloaded_params)} in host memory)"
                     + (f"; per GPU with experts split over {self.num_gpus} GPUs" if self.num_gpus > 1 else ""))
        lines.append("GPU memory estimate per GPU: " + ", ".join(f"{k} {format_bytes(v)}" for k, v in est.gpu.items()
                                                                  if v) + f" = {format_bytes(est.gpu_total)}"
                     + (f" (budget {format_bytes(self.gpu_memory_budget)})" if self.gpu_memory_budget else ""))
        if est.offloaded_params:
            lines.append("host memory estimate per GPU: " + ", ".join(f"{k} {format_bytes(v)}" for k, v in
                                                                       est.host.items() if v)
                         + f" = {format_bytes(est.host_total)}, of which pinned {format_bytes(est.pinned)}"
                         + (f" (budget {format_bytes(self.host_memory_budget)})" if self.host_memory_budget else ""))
        else:
            lines.append("host memory estimate per GPU: nothing offloaded")
        if est.offloaded_params:
            lines.append(self._timing())
        return "\n".join(lines)

    def _timing(self) -> str:
        est = self.estimate
        h2d_s = est.h2d_per_step / PCIE_BYTES_PER_S
        d2h_s = est.d2h_per_step / PCIE_BYTES_PER_S
        opt_s = est.offloaded_params / CPU_ADAM_PARAMS_PER_S
        text = (f"PCIe per optimizer step: {format_bytes(est.h2d_per_step)} H2D ({h2d_s:.3f} s at 55 GB/s), "
                f"{format_bytes(est.d2h_per_step)} D2H ({d2h_s:.3f} s); CPU AdamW on "
                f"{format_count(est.offloaded_params)} params ≈ {opt_s:.3f} s at 4.26 G params/s")
        if self.config is not None:
            flops = 6 * active_params(self.config, self.rows) * est.tokens
            compute_s = flops / ASSUMED_FLOPS
            text += (f"; compute ≈ {compute_s:.3f} s at an assumed 400 TFLOP/s ({format_count(est.tokens)} tokens "
                     f"per step): streaming is {'hidden' if h2d_s <= compute_s else 'NOT hidden'} behind compute")
        return text


def _fb(n: float) -> str:
    return format_bytes(n) if n else "-"


def _group_rows(rows: Sequence[Row]) -> list[list[Row]]:
    groups: list[list[Row]] = []
    for row in rows:
        prev = groups[-1][-1] if groups else None
        if (prev is not None and row.is_block and prev.is_block and row.offloaded == prev.offloaded
                and row.numel == prev.numel and row.is_moe == prev.is_moe):
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


def _range_name(group: Sequence[Row]) -> str:
    prefix = group[0].name.rsplit(".", 1)[0]
    idx = [int(r.name.rsplit(".", 1)[1]) for r in group]
    return f"{prefix}.[{idx[0]}-{idx[-1]}]"


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


def _interleave_order(rows: Sequence[Row]) -> list[Row]:
    """Offload order: dense blocks before MoE blocks (MoE experts do k/E of the FLOPs per byte), odd layers before
    even ones (every other block first, so prefetch can run ahead across a resident block)."""
    return sorted(rows, key=lambda r: (r.is_moe, min(r.layers or [0]) % 2 == 0, min(r.layers or [0])))


def plan_offload(root: nn.Module, gpu_memory_budget: int | str | None = None,
                 offload: Sequence[str] | None = None, *, precision: str = "bf16-mixed",
                 micro_batch_tokens: int = 8192, prefetch: int = 1, optimizer_state_bytes: int = 8,
                 accumulate_grad_batches: int = 1, host_memory_budget: int | str | None = None,
                 num_gpus: int = 1, reserve_bytes: int = 2 * 2**30, host_layout: str = "engine") -> OffloadPlan:
    """Placement for `root` (a LightningModule or any module; meta tensors are fine) from `offload` patterns or a
    `gpu_memory_budget`, with its memory estimate. Raises ValueError when the budget cannot hold even the resident
    minimum (everything but the streamable blocks, plus the first and last layers' blocks) or the host budget is
    exceeded."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: offload supports {PRECISIONS}")
    if offload is not None and gpu_memory_budget is not None:
        raise ValueError("give either offload patterns or gpu_memory_budget, not both")
    rows = _rows(root, precision, num_gpus)
    config = find_config(root)
    buffers = sum(b.numel() * b.element_size() for b in root.buffers())
    kwargs: dict[str, Any] = {"precision": precision, "micro_batch_tokens": micro_batch_tokens, "prefetch": prefetch,
                              "optimizer_state_bytes": optimizer_state_bytes,
                              "accumulate_grad_batches": accumulate_grad_batches, "reserve_bytes": reserve_bytes,
                              "buffer_bytes": buffers, "host_layout": host_layout}
    budget = parse_bytes(gpu_memory_budget) if gpu_memory_budget is not None else None
    host_budget = parse_bytes(host_memory_budget) if host_memory_budget is not None else None
    if offload is not None:
        names = resolve_offload(root, list(offload))
        rows = _apply_units(root, rows, names, precision, num_gpus)
    elif budget is not None:
        names = _fit(rows, budget, config, kwargs)
    else:
        names = []
    est = estimate(rows, config, **kwargs)
    if host_budget is not None and est.host_total > host_budget:
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in est.host.items() if v)
        raise ValueError(f"host_memory_budget={format_bytes(host_budget)} is exceeded by "
                         f"{format_bytes(est.host_total - host_budget)}: the offloaded "
                         f"{format_count(est.offloaded_params)} parameters need {format_bytes(est.host_total)} of host "
                         f"memory ({parts}); offload fewer modules or raise the host budget (nothing was allocated)")
    return OffloadPlan(offload=names, rows=rows, estimate=est, gpu_memory_budget=budget,
                       host_memory_budget=host_budget, config=config, num_gpus=num_gpus)


def _fit(rows: list[Row], budget: int, config: Any, kwargs: dict[str, Any]) -> list[str]:
    blocks = [r for r in rows if r.is_block]
    for row in rows:
        row.offloaded = False
    if estimate(rows, config, **kwargs).gpu_total <= budget:
        return []
    if blocks:
        first = min(blocks, key=lambda r: min(r.layers or [0]))
        last = max(blocks, key=lambda r: max(r.layers or [0]))
        keep = {first.name, last.name}
    else:
        keep = set()
    candidates = _interleave_order([r for r in blocks if r.name not in keep])
    for row in candidates:
        row.offloaded = True
    minimum = estimate(rows, config, **kwargs)
    if minimum.gpu_total > budget:
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in minimum.gpu.items() if v)
        raise ValueError(f"gpu_memory_budget={format_bytes(budget)} is too small even for the resident minimum "
                         f"(embeddings, head, norms and the first and last layers' blocks on the GPU, every other "
                         f"block streamed): {format_bytes(minimum.gpu_total)} needed ({parts}); raise the budget or "
                         f"use smaller micro-batches")
    for row in candidates:
        row.offloaded = False
    for row in candidates:
        row.offloaded = True
        if estimate(rows, config, **kwargs).gpu_total <= budget:
            break
    return [r.name for r in rows if r.offloaded]


# ---------------------------------------------------------------------------------------------- `m6lit plan`
def _meta_root(config_dict: dict[str, Any]) -> nn.Module:
    """A bare module holding `model` = M6Model on the meta device (names match the LightningModule's)."""
    from m6lit.model import M6Config, M6Model

    config = M6Config.from_dict(dict(config_dict)).validate()
    root = nn.Module()
    with torch.device("meta"):
        root.model = M6Model(config)
    return root


def _delink_target(callbacks: Iterable[Any], num_layers: int) -> int | None:
    for cb in callbacks or []:
        if not isinstance(cb, dict) or not str(cb.get("class_path", "")).endswith("PseudoToReal"):
            continue
        args = cb.get("init_args") or {}
        if args.get("schedule"):
            return int(args["schedule"][-1]["num_unique_blocks"])
        return num_layers
    return None


def main(argv: list[str] | None = None) -> None:
    """`m6lit plan --config FILE.yaml --gpu_memory_budget 80GB [--num_gpus N]`: placement and memory estimate for
    the config's model, computed on the meta device (nothing is allocated). With a PseudoToReal callback in the
    config, both stages are planned: the shared (pseudo) model and the delinked (real) one."""
    import yaml

    parser = argparse.ArgumentParser(prog="m6lit plan", description=main.__doc__)
    parser.add_argument("--config", required=True, help="a fit YAML (model.config, data, trainer)")
    parser.add_argument("--gpu_memory_budget", help="e.g. 80GB; default: the config's strategy setting")
    parser.add_argument("--host_memory_budget", help="e.g. 1TB; default: the config's strategy setting")
    parser.add_argument("--offload", nargs="*", help="module patterns instead of a budget")
    parser.add_argument("--num_gpus", type=int, default=1, help="GPUs the experts are split over (estimate)")
    parser.add_argument("--gpus_per_host", type=int, default=8)
    parser.add_argument("--micro_batch_tokens", type=int, help="default: data.batch_size * model.config.max_seq_len")
    parser.add_argument("--prefetch", type=int)
    parser.add_argument("--optimizer_state_bytes", type=int, default=8, help="8 for AdamW fp32 moments")
    args = parser.parse_args(argv)
    path = Path(args.config)
    if not path.is_file():
        parser.error(f"--config {path}: no such file")
    cfg = yaml.safe_load(path.read_text()) or {}
    model_cfg = (cfg.get("model") or {}).get("config") or {}
    trainer = cfg.get("trainer") or {}
    strategy = trainer.get("strategy") if isinstance(trainer.get("strategy"), dict) else {}
    strategy_args = (strategy or {}).get("init_args") or {}
    budget = args.gpu_memory_budget or strategy_args.get("gpu_memory_budget")
    offload = args.offload if args.offload is not None else (strategy_args.get("offload") if budget is None else None)
    if budget is None and offload is None:
        parser.error("give --gpu_memory_budget (or --offload patterns), or set them on the config's strategy")
    host_budget = args.host_memory_budget or strategy_args.get("host_memory_budget")
    precision = str(trainer.get("precision", "bf16-mixed"))
    batch = int((cfg.get("data") or {}).get("batch_size", 8))
    root = _meta_root(model_cfg)
    config = root.model.config
    tokens = args.micro_batch_tokens or batch * config.max_seq_len
    prefetch = args.prefetch if args.prefetch is not None else int(strategy_args.get("prefetch", 1))
    stages = [("as configured", root)]
    p2r = cfg.get("pseudo_to_real") or {}  # the CLI's own key; older configs list the callback in trainer.callbacks
    target = _delink_target([*(trainer.get("callbacks") or []),
                             *([{"class_path": "PseudoToReal", "init_args": p2r}]
                               if p2r.get("delink_step") or p2r.get("schedule") else [])], config.num_layers)
    if target is not None and target != config.num_unique_blocks:
        stages.append((f"after delink to {target} blocks", _meta_root({**model_cfg, "num_unique_blocks": target})))
    for title, stage_root in stages:
        c = stage_root.model.config
        total = sum(p.numel() for p in stage_root.parameters())
        print(f"== {path.name} ({title}): {format_count(total)} parameters, {c.num_layers} layers on "
              f"{c.num_unique_blocks} blocks, d_model {c.d_model}, "
              + (f"{c.num_experts} experts top-{c.top_k} ({c.router})" if c.moe_layers != "none" else "dense")
              + f"; {precision}, {tokens} tokens per micro-batch per GPU, {args.num_gpus} GPU(s)")
        try:
            plan = plan_offload(stage_root, gpu_memory_budget=budget if offload is None else None, offload=offload,
                                precision=precision, micro_batch_tokens=tokens, prefetch=prefetch,
                                optimizer_state_bytes=args.optimizer_state_bytes,
                                accumulate_grad_batches=int(trainer.get("accumulate_grad_batches", 1) or 1),
                                host_memory_budget=None, num_gpus=args.num_gpus)
        except ValueError as err:
            print(f"no plan: {err}")
            continue
        plan.host_memory_budget = parse_bytes(host_budget) if host_budget else None
        print(plan.table())
        if args.num_gpus > 1 and plan.estimate.offloaded_params:
            per_host = min(args.gpus_per_host, args.num_gpus)
            print(f"per host ({per_host} GPUs): {format_bytes(per_host * plan.estimate.host_total)} of host memory, "
                  f"{format_bytes(per_host * plan.estimate.pinned)} pinned")
        if plan.host_memory_budget and plan.estimate.host_total > plan.host_memory_budget:
            print(f"WARNING: host memory per GPU {format_bytes(plan.estimate.host_total)} exceeds host_memory_budget "
                  f"{format_bytes(plan.host_memory_budget)}")
        print()
    sys.stdout.flush()


__all__ = ["MemoryEstimate", "OffloadPlan", "Row", "activation_bytes_per_token", "estimate", "find_blocks",
           "format_bytes", "main", "parse_bytes", "plan_offload", "resident_params", "resolve_offload"]
