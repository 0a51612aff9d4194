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


def is_whole(value: object) -> bool:
    """An integer (a numpy one too), not a bool: a float, a string or True would fail deep inside, or pass
    as 1."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_whole(name: str, value: object, least: int | None = 1) -> int:
    """`value` when it `is_whole` and >= `least` (None: any); else a one-line ValueError."""
    if not is_whole(value):
        raise ValueError(f"{name} must be a whole number, not {value!r}")
    if least is not None and value < least:
        raise ValueError(f"{name} must be at least {least}, not {value}")
    return int(value)
