"""A GPU's calibration: the memory terms no profile of a model can give, measured once per card and software
stack, cached on disk, and put into the DeviceSpec the planner uses. Pure except for the cache's files:
what measures them on the card is autofit/profiler/device.py.

  context      bytes the process holds outside the caching allocator (CUDA context, kernels' modules);
  workspace    bytes cuBLAS/cuBLASLt take through the allocator on their first matmul and keep;
  reserve      the allocator's reserved bytes above allocated at a training step's peak, as
               reserved <= allocated x (1 + fraction) + fixed: fitted over steps of several sizes as an upper
               envelope, so a plan's predicted reserved peak is never below one of the samples;
  saved        per architecture and attention implementation, bytes the card's kernels save for backward
               beyond what the CPU-kernel twin saved (flash / memory-efficient attention keep a logsumexp).

An OOM happens at reserved + context; the budget is checked against that.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from autofit.devices import DeviceSpec
from autofit.profiler.schema import BlockActivations, Profile, ShapeFit


class AllocatorSample(BaseModel):
    """One training run's peaks as the caching allocator reported them."""

    model_config = ConfigDict(extra="forbid")

    label: str = ""
    """What ran: "bert h256 x4, batch 8 x 128, fp32"."""
    allocated: int = Field(ge=0)
    """`torch.cuda.max_memory_allocated` over the run's steady-state steps."""
    reserved: int = Field(ge=0)
    """`torch.cuda.max_memory_reserved` over the same steps."""


class SavedCorrection(BaseModel):
    """Bytes one layer's real kernels save for backward beyond the fake twin's (signed), as
    const + per_token x B*S + per_token_seq x B*S*S."""

    model_config = ConfigDict(extra="forbid")

    const: float = 0.0
    per_token: float = 0.0
    per_token_seq: float = 0.0
    measured: list[tuple[int, int, float, float]] = []
    """(batch, seq, real bytes, twin bytes) of the layer's saved tensors where it was measured."""

    def __call__(self, batch: int, seq: int) -> float:
        tokens = batch * seq
        return self.const + self.per_token * tokens + self.per_token_seq * tokens * seq

    @property
    def is_zero(self) -> bool:
        return all(real == twin for _, _, real, twin in self.measured)


class Calibration(BaseModel):
    """What one card measured, with the software it was measured under (a different one measures again)."""

    model_config = ConfigDict(extra="forbid")

    hardware: str
    """`torch.cuda.get_device_name()`, or "cpu" for a dry run."""
    torch_version: str
    cuda_version: str | None = None
    allocator_config: str = ""
    """PYTORCH_CUDA_ALLOC_CONF when measured: expandable segments change the reserve entirely."""
    total_bytes: int = Field(0, ge=0)
    """The card's memory as the driver reports it."""
    context_bytes: int = Field(ge=0)
    context_source: str = ""
    """How the context was read: "process" (the driver's count for this process), "device" (everything used
    on the card, other processes included: an overestimate) or "none" (dry run)."""
    workspace_bytes: int = Field(ge=0)
    reserve_fraction: float = Field(ge=0, lt=1)
    reserve_bytes: int = Field(ge=0)
    samples: list[AllocatorSample] = []
    saved: dict[str, dict[str, SavedCorrection]] = {}
    """Keyed by `saved_key(model_type, attention)`, then precision."""
    created: str = ""

    def apply(self, spec: DeviceSpec) -> DeviceSpec:
        """`spec` with the measured overhead terms in place of its defaults."""
        stamp = f"{self.hardware}, torch {self.torch_version}" + (f", CUDA {self.cuda_version}" if self.cuda_version
                                                                  else "") + f", {self.created[:10]}"
        return spec.model_copy(update={
            "context_bytes": self.context_bytes, "workspace_bytes": self.workspace_bytes,
            "allocator_reserve_fraction": self.reserve_fraction, "allocator_reserve_bytes": self.reserve_bytes,
            "calibration": stamp})


def saved_key(model_type: str, attention: str) -> str:
    return f"{model_type}/{attention}"


def fit_reserve(samples: list[AllocatorSample]) -> tuple[float, int]:
    """(fraction, fixed bytes) of the smallest line reserved = allocated x (1 + fraction) + fixed that no
    sample lies above: the least-squares slope of the slack over allocated (clipped to [0, 0.5]), then the
    intercept raised until every sample is on or under the line."""
    if not samples:
        raise ValueError("no allocator samples to fit")
    xs = [float(s.allocated) for s in samples]
    slack = [float(max(0, s.reserved - s.allocated)) for s in samples]
    mean_x, mean_y = sum(xs) / len(xs), sum(slack) / len(slack)
    spread = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, slack)) / spread if spread else 0.0
    slope = min(max(slope, 0.0), 0.5)
    fixed = max(y - slope * x for x, y in zip(xs, slack))
    return slope, int(max(0.0, fixed) + 0.5)


def fit_correction(points: list[tuple[int, int, float, float]]) -> SavedCorrection:
    """const + per_token x B*S + per_token_seq x B*S*S through (batch, seq, real, twin) points, least squares
    (signed: a real kernel may save less than the twin's)."""
    import numpy as np

    rows = np.array([[1.0, b * s, b * s * s] for b, s, _, _ in points])
    diffs = np.array([real - twin for _, _, real, twin in points])
    if not diffs.any():
        return SavedCorrection(measured=points)
    const, per_token, per_token_seq = np.linalg.lstsq(rows, diffs, rcond=None)[0]
    return SavedCorrection(const=float(const), per_token=float(per_token), per_token_seq=float(per_token_seq),
                           measured=points)


def stamp_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def calibration_dir() -> Path | None:
    """Where calibrations live: `calibration/` in the cache's root (profiler.cache.cache_root); None when
    AUTOFIT_CACHE switches caching off."""
    from autofit.profiler.cache import cache_root  # the profiler's, at first use: it imports the model stack

    root = cache_root()
    return None if root is None else root / "calibration"


def calibration_file(hardware: str, torch_version: str, cuda_version: str | None, allocator_config: str) -> str:
    """One file per card and software stack: "NVIDIA H200" under torch 2.13.0 + CUDA 12.8, default allocator."""
    name = f"{hardware}-torch{torch_version}-cuda{cuda_version or 'none'}-{allocator_config or 'default'}"
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in name) + ".json"


def load_calibration(hardware: str, torch_version: str, cuda_version: str | None,
                     allocator_config: str) -> Calibration | None:
    """The cached calibration of this card and stack, None when there is none (or it no longer parses)."""
    folder = calibration_dir()
    path = folder / calibration_file(hardware, torch_version, cuda_version, allocator_config) if folder else None
    if path is None or not path.is_file():
        return None
    try:
        return Calibration.model_validate_json(path.read_text())
    except (ValidationError, ValueError):
        return None


def calibration_path(calibration: Calibration) -> Path | None:
    """Where `calibration` is cached (None when caching is off)."""
    folder = calibration_dir()
    return None if folder is None else folder / calibration_file(
        calibration.hardware, calibration.torch_version, calibration.cuda_version, calibration.allocator_config)


def save_calibration(calibration: Calibration) -> Path | None:
    """Write `calibration` to the cache (atomically); None when caching is off."""
    path = calibration_path(calibration)
    if path is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(calibration.model_dump_json(indent=1))
    tmp.replace(path)
    return path


def corrected(profile: Profile, corrections: dict[str, SavedCorrection], hardware: str) -> Profile:
    """`profile` with every layer's `saved` fits (and `saved_first_trainable`, per batch-1 and unpadded
    variant) moved by the card's correction at their precision. Adapter fits are left as measured."""
    if all(c.is_zero for c in corrections.values()):
        return profile.model_copy(update={"kernel_correction": hardware})
    blocks = []
    for block in profile.blocks:
        if block.kind == "layer":
            acts = {p: _shift_saved(a, corrections[p]) if p in corrections else a
                    for p, a in block.activations.items()}
            block = block.model_copy(update={"activations": acts})
        blocks.append(block)
    return profile.model_copy(update={"blocks": blocks, "kernel_correction": hardware})


def _shift_saved(acts: BlockActivations, correction: SavedCorrection) -> BlockActivations:
    update = {name: _shift(getattr(acts, name), correction) for name in ("saved", "saved_first_trainable")}
    for variant in ("single", "unpadded"):
        if getattr(acts, variant) is not None:
            update[variant] = _shift_saved(getattr(acts, variant), correction)
    return acts.model_copy(update=update)


def _shift(fit: ShapeFit, correction: SavedCorrection) -> ShapeFit:
    # a new ShapeFit, not a model_copy: the copy would carry the cached grid of the old measurements
    return ShapeFit(
        const=fit.const + correction.const, per_batch=fit.per_batch, per_token=fit.per_token + correction.per_token,
        per_token_seq=fit.per_token_seq + correction.per_token_seq, per_seq=fit.per_seq, per_seq_sq=fit.per_seq_sq,
        small=None if fit.small is None else _shift(fit.small, correction), small_tokens=fit.small_tokens,
        measured=tuple((b, s, v + correction(b, s)) for b, s, v in fit.measured))
