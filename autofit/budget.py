"""Memory budgets: "16GB", "15.5GiB", "16000MB", "17179869184", "auto" -> bytes.

GB and GiB both mean 2**30 bytes (and MB = MiB = 2**20): GPU memory is sold in binary units — a "16 GB"
card holds 16 GiB — and nvidia-smi reports MiB. A person who reads "16GB" off the box or off nvidia-smi
gets the budget they meant.
"""

from __future__ import annotations

import re

_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE)


class BudgetError(ValueError):
    """A budget string that cannot be read, or a budget that is not positive."""


def parse_budget(text: str | int | float) -> int:
    """Bytes for a budget like "16GB"; "auto" reads the free memory of the current CUDA device."""
    if isinstance(text, bool):
        raise BudgetError(f"invalid memory budget {text!r}")
    if isinstance(text, (int, float)):
        value = float(text)
    elif text.strip().lower() == "auto":
        return detect_device_memory()
    else:
        match = _PATTERN.match(text)
        if not match:
            raise BudgetError(f"invalid memory budget {text!r}: use e.g. 16GB, 15.5GiB, 16000MB or a byte count")
        value = float(match.group(1)) * _UNITS[match.group(2).upper()]
    if value <= 0 or value != value:
        raise BudgetError(f"memory budget must be positive, got {text!r}")
    return int(value)


def detect_device_memory() -> int:
    """Free plus already-used-by-us memory of the current CUDA device, in bytes."""
    import torch

    if not torch.cuda.is_available():
        raise BudgetError("--vram auto needs a CUDA device, and none is visible; pass a size such as 16GB")
    free, _total = torch.cuda.mem_get_info()
    return int(free + torch.cuda.memory_reserved())


def format_bytes(n: float) -> str:
    """Human-readable binary size: 15.2 GB (GB = 2**30, as everywhere in autofit)."""
    for unit, size in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
