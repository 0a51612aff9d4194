"""Integer arithmetic the planner repeats: ceiling division and rounding up to a multiple; and the check that
an argument is a whole number."""

from __future__ import annotations

import numbers


def ceil_div(n: int, d: int) -> int:
    """ceil(n / d) for integers, exact at any size (no float division)."""
    return -(-n // d)


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n."""
    return ceil_div(n, multiple) * multiple


def check_whole(name: str, value: object, least: int | None = 1) -> int:
    """`value` when it is a whole number >= `least` (a numpy integer too; None: any); else a one-line
    ValueError. A bool, a float or a string would fail deep inside (or True pass as 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a whole number, not {value!r}")
    if least is not None and value < least:
        raise ValueError(f"{name} must be at least {least}, not {value}")
    return int(value)
