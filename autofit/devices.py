"""Target devices: what the time model needs (throughput, bf16 support) and the memory model's per-device
overhead terms. Values are public spec-sheet figures; the CUDA overhead terms are defaults until
`autofit calibrate` measures them on a card (autofit/calibration.py), which replaces them for that card."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DeviceKind = Literal["cuda", "cpu"]
"""The device kinds autofit plans for and trains on."""


class DeviceSpec(BaseModel):
    """One kind of training device."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str
    kind: DeviceKind
    memory_bytes: int | None = Field(None, ge=0)
    """Memory of the card as sold (nvidia-smi's total); None when unknown (the budget says it)."""
    supports_bf16: bool = True
    tflops_fp32: float = Field(gt=0)
    """Dense fp32 matmul throughput (TF32 tensor cores where PyTorch uses them by default is NOT assumed)."""
    tflops_half: float = Field(gt=0)
    """Dense fp16/bf16 tensor-core throughput."""
    memory_bandwidth_gbs: float = Field(gt=0)
    context_bytes: int = Field(0, ge=0)
    """Memory the runtime takes before any tensor exists (CUDA context, cuBLAS workspace); counted against
    the budget because the budget is the card's total memory."""
    allocator_reserve_fraction: float = Field(0.0, ge=0, lt=1)
    """Caching-allocator slack: reserved bytes above allocated bytes at the peak, as a fraction of it."""
    allocator_reserve_bytes: int = Field(0, ge=0)
    """Caching-allocator slack that does not grow with the peak (a segment rounded up, a small-block pool)."""
    workspace_bytes: int = Field(0, ge=0)
    """Library workspaces allocated through the caching allocator once per process (cuBLAS, cuBLASLt): they
    count in `max_memory_allocated` though no tensor of the model holds them. 0 where uncalibrated: the
    default `context_bytes` then covers them."""
    hardware: str | None = None
    """The card's own name (`torch.cuda.get_device_name()`) when this spec is the visible GPU: measured block
    times and calibrations are only reused on the same hardware."""
    calibration: str | None = None
    """Where the overhead terms come from when measured: "NVIDIA H200, torch 2.13.0, CUDA 12.8, 2026-12-02";
    None for the defaults above."""
    matmul_efficiency: float = Field(0.6, gt=0, le=1)
    """Fraction of peak FLOPs a large transformer matmul reaches; small micro-batches reach less."""


_GIB = 1 << 30

DEVICES: dict[str, DeviceSpec] = {
    spec.name: spec
    for spec in [
        # A generic current CUDA card: Ampere-class throughput, bf16 available.
        DeviceSpec(name="cuda", kind="cuda", tflops_fp32=19.5, tflops_half=78.0, memory_bandwidth_gbs=900,
                   context_bytes=500 * 2**20, allocator_reserve_fraction=0.05),
        DeviceSpec(name="h200", kind="cuda", memory_bytes=143771 * 2**20, tflops_fp32=67.0, tflops_half=495.0,
                   memory_bandwidth_gbs=4800, context_bytes=520 * 2**20, allocator_reserve_fraction=0.05),
        DeviceSpec(name="h100", kind="cuda", memory_bytes=80 * _GIB, tflops_fp32=67.0, tflops_half=495.0,
                   memory_bandwidth_gbs=3350, context_bytes=520 * 2**20, allocator_reserve_fraction=0.05),
        DeviceSpec(name="a100", kind="cuda", memory_bytes=40 * _GIB, tflops_fp32=19.5, tflops_half=156.0,
                   memory_bandwidth_gbs=1555, context_bytes=500 * 2**20, allocator_reserve_fraction=0.05),
        DeviceSpec(name="a10g", kind="cuda", memory_bytes=24 * _GIB, tflops_fp32=31.2, tflops_half=62.5,
                   memory_bandwidth_gbs=600, context_bytes=450 * 2**20, allocator_reserve_fraction=0.05),
        DeviceSpec(name="l4", kind="cuda", memory_bytes=24 * _GIB, tflops_fp32=30.3, tflops_half=60.0,
                   memory_bandwidth_gbs=300, context_bytes=450 * 2**20, allocator_reserve_fraction=0.05),
        DeviceSpec(name="rtx4090", kind="cuda", memory_bytes=24 * _GIB, tflops_fp32=82.6, tflops_half=165.0,
                   memory_bandwidth_gbs=1008, context_bytes=450 * 2**20, allocator_reserve_fraction=0.05),
        DeviceSpec(name="rtx3090", kind="cuda", memory_bytes=24 * _GIB, tflops_fp32=35.6, tflops_half=71.0,
                   memory_bandwidth_gbs=936, context_bytes=450 * 2**20, allocator_reserve_fraction=0.05),
        DeviceSpec(name="t4", kind="cuda", memory_bytes=16 * _GIB, supports_bf16=False, tflops_fp32=8.1,
                   tflops_half=65.0, memory_bandwidth_gbs=320, context_bytes=400 * 2**20,
                   allocator_reserve_fraction=0.05, matmul_efficiency=0.45),
        DeviceSpec(name="v100", kind="cuda", memory_bytes=16 * _GIB, supports_bf16=False, tflops_fp32=15.7,
                   tflops_half=125.0, memory_bandwidth_gbs=900, context_bytes=400 * 2**20,
                   allocator_reserve_fraction=0.05, matmul_efficiency=0.5),
        # The CPU: no context, malloc returns memory to the OS; bf16 autocast works but is not faster.
        DeviceSpec(name="cpu", kind="cpu", tflops_fp32=0.2, tflops_half=0.1, memory_bandwidth_gbs=20,
                   matmul_efficiency=0.5),
    ]
}


def get_device(name: str) -> DeviceSpec:
    try:
        return DEVICES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown device {name!r}; known: {', '.join(sorted(DEVICES))}") from None
