"""What a training run reports: per-step history, per-epoch evaluation, fallbacks, measured peak memory."""

from __future__ import annotations

from pydantic import BaseModel

from autofit.knobs import Knobs
from autofit.plan import Plan


class StepRecord(BaseModel):
    """One optimizer step."""

    step: int
    """1-based count of optimizer steps taken so far in the run."""
    epoch: int
    loss: float
    """Mean loss over the window's units (samples, or label tokens for token-level tasks)."""
    lr: float
    tokens_per_second: float
    """Real (non-pad) tokens of the window per second of its wall time."""
    samples: int
    seconds: float
    skipped: bool = False
    """True when fp16's GradScaler found inf/NaN gradients and skipped the update."""


class EvalRecord(BaseModel):
    """Evaluation at the end of one epoch."""

    epoch: int
    step: int
    loss: float
    accuracy: float | None = None
    """Classification only (more than one label)."""
    samples: int


class FallbackRecord(BaseModel):
    """An out-of-memory error and the knobs the run continued with."""

    step: int
    """Optimizer steps completed when the error struck (the window after them was re-run)."""
    error: str
    knobs: Knobs
    summary: str
    """One line, e.g. "micro-batch 16 -> 8, accumulation 2 -> 4"."""


class TrainResult(BaseModel):
    """The outcome of `run_plan`: the plan that finally ran and what it measured."""

    plan: Plan
    """The plan in force at the end (differs from the input plan after an out-of-memory fallback)."""
    measured_peak_bytes: int | None
    """Peak allocated bytes of the steady-state training steps (after the first optimizer step):
    CUDA allocator statistics, or the CPU live-tensor tracker. None when not measured."""
    measured_reserved_bytes: int | None = None
    """CUDA only: the caching allocator's reserved peak."""
    predicted_peak_bytes: int
    """The plan's predicted peak including device overhead; compare `predicted_allocated_bytes` on CUDA."""
    predicted_allocated_bytes: int
    history: list[StepRecord]
    eval: list[EvalRecord] = []
    tokens_per_second: float
    samples_per_second: float
    padding_efficiency: float
    """Real tokens / computed (padded) tokens over all trained micro-batches."""
    fallbacks: list[FallbackRecord] = []
    optimizer_steps: int
    epochs_completed: int
    seconds: float
    output_dir: str | None = None

    @property
    def final_loss(self) -> float | None:
        return self.history[-1].loss if self.history else None
