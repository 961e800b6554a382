"""Memory sizes: decimal and binary units, plain numbers, and clear errors for anything else."""

from __future__ import annotations

import pytest

from m6lit.strategies.sizes import format_bytes, format_count, parse_bytes


@pytest.mark.parametrize("text,expected", [("80GB", 80 * 10**9), ("96GiB", 96 * 2**30), ("1.5e11", 150_000_000_000),
                                           (4096, 4096), ("512 MB", 512 * 10**6)])
def test_parse_bytes(text, expected: int) -> None:
    assert parse_bytes(text) == expected


def test_parse_bytes_rejects_nonsense() -> None:
    for bad in ("eighty", "-5GB", "0", "12 parsecs"):
        with pytest.raises(ValueError, match="memory size"):
            parse_bytes(bad)


def test_format_bytes_and_counts() -> None:
    assert format_bytes(130e9) == "130.00 GB" and format_bytes(901_120) == "901.12 KB" and format_bytes(12) == "12 B"
    assert format_count(12.07e9) == "12.07B" and format_count(2048) == "2.05K" and format_count(7) == "7"
