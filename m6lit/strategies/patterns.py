"""Offload patterns: which modules a list of names selects — globs (`*` any run of characters, `?` one) plus
integer ranges and lists (`model.blocks.[4-11]`, `model.blocks.[0,5]`), resolved to the outermost modules with
parameters — and which of their parameters must stay resident because a module outside holds them too."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

from torch import nn


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


__all__ = ["resident_params", "resolve_offload"]
