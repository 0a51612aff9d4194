"""Memory budgets: "16GB", "15.5GiB", "16000MB", "17179869184", "auto" -> bytes.

GB and GiB both mean 2**30 bytes (and MB = MiB = 2**20): GPU memory is sold in binary units — a "16 GB"
card holds 16 GiB — and nvidia-smi reports MiB. A person who reads "16GB" off the box or off nvidia-smi
gets the budget they meant.
"""

from __future__ import annotations

import math
import numbers
import re

MIN_BUDGET_BYTES = 2**20
"""Smallest budget accepted (1 MB): below it no model trains, and a typo such as `--vram 16` is likelier."""
MAX_BUDGET_BYTES = 2**50
"""Largest memory size accepted (1 PB): far above any device, and well inside exact float and int64 range."""

_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(?:([KMGTP])(I?B|I)?|(B)?)\s*$",
                      re.IGNORECASE)  # 16GB, 16GiB, 16G, 16Gi (as Kubernetes writes it), 16B, 16


class BudgetError(ValueError):
    """A budget string that cannot be read, or a budget outside the physical range."""


def parse_budget(text: str | int | float) -> int:
    """Bytes for a budget like "16GB", from MIN_BUDGET_BYTES to MAX_BUDGET_BYTES; "auto" reads the free
    memory of the current CUDA device."""
    if isinstance(text, str) and text.strip().lower() == "auto":
        return detect_device_memory()
    return parse_size(text, what="memory budget", minimum=MIN_BUDGET_BYTES)


def parse_size(text: str | int | float, *, what: str = "memory size", minimum: int = 1) -> int:
    """Bytes for a size like "512MB" or 4096, from `minimum` to MAX_BUDGET_BYTES. `what` names the value
    in error messages."""
    value = _size_value(text, what)
    if isinstance(value, float) and not math.isfinite(value):  # inf compares as a number; int() of it overflows
        raise BudgetError(f"{what} must be a finite number of bytes, got {_shown(text)}")
    if value <= 0:
        raise BudgetError(f"{what} must be positive, got {_shown(text)}")
    least = format_bytes(minimum).replace(".0 ", " ")  # "1 MB", not "1.0 MB"
    allowed = f"{least} to 1 PB, i.e. {minimum} to {MAX_BUDGET_BYTES} bytes"
    if value > MAX_BUDGET_BYTES:
        raise BudgetError(f"{what} {_shown(text)} is larger than 1 PB (allowed: {allowed})")
    if value < minimum:
        hint = "; did you forget the unit, as in 16GB?" if _is_plain_number(text) else ""
        raise BudgetError(f"{what} {_shown(text)} is {int(value)} bytes, below the {least} minimum "
                          f"(allowed: {allowed}){hint}")
    return int(value)


def _is_plain_number(text: object) -> bool:
    return not isinstance(text, str) or text.strip().replace(".", "", 1).isdigit()


def _size_value(text: object, what: str) -> int | float:
    """The number of bytes `text` spells, unchecked (may be inf, nan, zero or negative)."""
    if isinstance(text, bool) or not isinstance(text, (str, numbers.Real)):
        raise BudgetError(f"invalid {what} {_shown(text)}: use e.g. 16GB, 15.5GiB, 16000MB or a byte count")
    if isinstance(text, numbers.Integral):
        return int(text)  # ints stay exact: float() of a 400-digit int would overflow (numpy ints too)
    if isinstance(text, numbers.Real):
        return float(text)
    if text.strip().lower().lstrip("+-") in ("inf", "infinity", "nan"):
        return math.nan  # float() would read these; they are no size
    match = _PATTERN.match(text)
    if not match:
        raise BudgetError(f"invalid {what} {_shown(text)}: use e.g. 16GB, 15.5GiB, 16000MB or a byte count")
    return float(match.group(1)) * _UNITS[(match.group(2) or "").upper()]  # 1e400 reads as inf: rejected as not finite


def _shown(text: object) -> str:
    """`text` as error messages quote it, cut short: a 400-digit byte count should not fill the screen."""
    shown = repr(text)
    return shown if len(shown) <= 40 else f"{shown[:20]}...{shown[-8:]} ({len(shown)} characters)"


def detect_device_memory() -> int:
    """Bytes a process may use on the current CUDA device: what the driver reports free (other processes'
    memory already taken off) plus what this process holds itself (its context and allocator pool, which
    its own training reuses and a later `autofit train` process gets back)."""
    import torch

    if not torch.cuda.is_available():
        raise BudgetError("--vram auto needs a CUDA device, and none is visible; pass a size such as 16GB")
    free, _total = torch.cuda.mem_get_info()
    own = process_used_bytes()
    return int(free + (own if own is not None else torch.cuda.memory_reserved()))


def process_used_bytes() -> int | None:
    """This process's memory on the current CUDA device as the driver counts it (NVML: context + allocator
    pool), None where NVML cannot say (no pynvml, no entry for this process)."""
    import os

    import torch

    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        handle = next(h for h in handles if uuid.removeprefix("GPU-") in str(pynvml.nvmlDeviceGetUUID(h)))
        return next((p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                     if p.pid == os.getpid() and p.usedGpuMemory), None)
    except Exception:  # noqa: BLE001 - NVML's errors vary by driver and container; the caller falls back
        return None


def format_bytes(n: float) -> str:
    """Human-readable binary size: 15.2 GB (GB = 2**30, as everywhere in autofit)."""
    for unit, size in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
