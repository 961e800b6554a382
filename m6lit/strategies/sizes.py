"""Memory sizes as people write them (`80GB`, `96GiB`, `1.5e11`) and as the plan prints them."""

from __future__ import annotations

import re

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


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
    """Bytes in decimal units with two decimals (`80.00 GB`)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_count(n: float) -> str:
    """A count with a decimal suffix (`12.07B`)."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


__all__ = ["format_bytes", "format_count", "parse_bytes"]
