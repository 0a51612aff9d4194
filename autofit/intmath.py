"""Integer arithmetic the planner repeats: ceiling division and rounding up to a multiple."""

from __future__ import annotations


def ceil_div(n: int, d: int) -> int:
    """ceil(n / d) for integers, exact at any size (no float division)."""
    return -(-n // d)


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n."""
    return ceil_div(n, multiple) * multiple
