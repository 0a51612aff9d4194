"""Automatic mixed precision: forward/backward matmuls in fp16 or bf16, master weights kept in fp32.

Trade-off: saves activation memory (half-width saved tensors) and, on GPU, runs matmuls on tensor cores;
costs fp16 overflow risk (a GradScaler skips overflowing steps) and a half-width copy of each weight.
"""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager, nullcontext

import torch

from autofit.knobs import Precision

AUTOCAST_DTYPES = {Precision.fp16: torch.float16, Precision.bf16: torch.bfloat16}


class PrecisionError(ValueError):
    """A precision that cannot run on the requested device."""


# ---- pure side -------------------------------------------------------------------------------------------


def autocast_dtype(precision: Precision) -> torch.dtype | None:
    """The dtype autocast computes in, or None for full fp32."""
    return AUTOCAST_DTYPES.get(Precision(precision))


def needs_grad_scaler(precision: Precision) -> bool:
    """fp16's narrow exponent underflows small gradients: scale the loss. bf16 has fp32's range."""
    return Precision(precision) is Precision.fp16


def accelerate_mixed_precision(precision: Precision) -> str:
    """The `mixed_precision` argument of accelerate's Accelerator."""
    return {Precision.fp32: "no", Precision.fp16: "fp16", Precision.bf16: "bf16"}[Precision(precision)]


# ---- apply side ------------------------------------------------------------------------------------------


def resolve(precision: Precision, device_type: str) -> Precision:
    """The precision that will really run on `device_type`: bf16 on a CUDA card without bf16 support
    falls back to fp16 (with a warning). fp16 and bf16 autocast both run on the CPU in torch >= 2.4."""
    precision = Precision(precision)
    if device_type == "cuda" and precision is Precision.bf16:
        if not torch.cuda.is_available():
            raise PrecisionError("bf16 on cuda asked for, but no CUDA device is available")
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            warnings.warn("this CUDA device has no native bf16; using fp16 autocast with a GradScaler instead",
                          stacklevel=2)
            return Precision.fp16
    if precision is not Precision.fp32 and not torch.amp.is_autocast_available(device_type):
        raise PrecisionError(f"autocast is not available on {device_type!r}; use fp32")
    return precision


def autocast(precision: Precision, device_type: str) -> AbstractContextManager:
    """Context for forward (and loss) under `precision`: torch.autocast, or nothing for fp32."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def grad_scaler(precision: Precision, device_type: str) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for fp16 (a disabled one passes scale/step/update straight through)."""
    return torch.amp.GradScaler(device_type, enabled=needs_grad_scaler(precision))
