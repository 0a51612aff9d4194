"""What a training run reports: per-step history, per-epoch evaluation, fallbacks, measured peak memory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, PrivateAttr
from torch import nn

from autofit.budget import format_bytes
from autofit.knobs import Knobs
from autofit.plan import MemoryBreakdown, Plan


class StepRecord(BaseModel):
    """One optimizer step."""

    step: int
    """1-based count of optimizer steps taken so far in the run."""
    epoch: int
    loss: float
    """Mean loss over the step's units (samples, or label tokens for token-level tasks)."""
    lr: float
    tokens_per_second: float
    """Real (non-pad) tokens of the step per second of its wall time."""
    samples: int
    """Examples the step trained: the plan's effective batch, except maybe an epoch's last step."""
    micro_batches: int = 1
    """Forward/backward passes the step's examples were cut into (with several processes: each process's,
    the zero-weight passes that keep their counts equal included)."""
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
    """Optimizer steps completed when the error struck (the step after them was re-run)."""
    error: str
    knobs: Knobs
    summary: str
    """One line, e.g. "micro_batch_size 16 -> 8, tokens_per_micro_batch 512 -> 256"."""


class TrainResult(BaseModel):
    """The outcome of `run_plan`: the plan that finally ran and what it measured."""

    plan: Plan
    """The plan in force at the end (differs from the input plan after an out-of-memory fallback)."""
    measured_peak_bytes: int | None
    """Peak allocated bytes of the steady-state run (after the first optimizer step, evaluation included):
    CUDA allocator statistics, or the CPU live-tensor tracker. None when not measured. With several
    processes: the highest of theirs (`rank_peak_bytes`), what the plan's per-process prediction is for."""
    measured_reserved_bytes: int | None = None
    """CUDA only: the caching allocator's reserved peak (with several processes, the highest)."""
    rank_peak_bytes: list[int] = []
    """Each process's measured peak, in rank order (one entry for a one-process run; empty when not measured)."""
    processes: int = 1
    """Processes that trained together (`plan.cluster.processes`)."""
    rank: int = 0
    """Which of them returned this result (every process gets one; process 0's is the one to report)."""
    predicted_peak_bytes: int
    """The predicted peak including device overhead (the larger of training's and evaluation's); compare
    `predicted_allocated_bytes` with the measured peak."""
    predicted_allocated_bytes: int
    """The plan's predicted allocation: a bound over every step this data can form (the worst micro-batch a
    random step could cut), so a measured peak comes in at or under it."""
    run_predicted_allocated_bytes: int | None = None
    """The memory model's prediction for the micro-batches this run's steps were cut into (the steps follow
    the seed, so they are known before training): what the measured peak should match. None with several
    processes or without a measurement."""
    predicted_reserved_bytes: int | None = None
    """What `measured_reserved_bytes` should be: the prediction without the CUDA context (with it, the peak)."""
    budget_bytes: int
    """The plan's memory budget."""
    memory_warning: str | None = None
    """Set when the measured peak went over the budget, or over the prediction by more than the plan's
    headroom: a plan that does not hold is a bug in the memory model, and the run says so."""
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
    notes: list[str] = []
    """What autofit.train inferred or changed about its input, in order (the task, examples truncated or
    left out, a head's classes renamed) and the warnings it logged: the lines it showed unless quiet."""
    adapter_dir: str | None = None
    """A LoRA run with an output_dir: the adapters saved at its end (peft's `save_pretrained` folder; reload
    with `PeftModel.from_pretrained(base, adapter_dir)`)."""
    _model: nn.Module | None = PrivateAttr(None)

    @property
    def model(self) -> nn.Module | None:
        """The model that trained (not serialised): the caller's model, or under LoRA peft's wrapper around it
        (to pass to lora.save_adapter or lora.export_merged)."""
        return self._model

    @property
    def final_loss(self) -> float | None:
        return self.history[-1].loss if self.history else None

    def plot(self, path: str | os.PathLike) -> Path:
        """Draw the loss per step (and eval loss) beside the measured and predicted peaks to `path` (a .png);
        needs matplotlib (`pip install 'autofit[plot]'`)."""
        from autofit.plots import save_training

        return save_training(self, path)


def summarize(state: Any, *, plan: Plan, input_plan: Plan, eval_prediction: MemoryBreakdown | None,
              run_prediction: MemoryBreakdown | None,
              peaks: list[tuple[int | None, int | None]], cuda: bool, epochs: int, seconds: float,
              output_dir: Path | None, adapter_dir: Path | None, rank: int = 0) -> TrainResult:
    """The TrainResult of a run whose counters are `state` (a checkpoint.TrainerState), with every process's
    (measured peak, reserved peak): the worst process is the one the plan's per-process prediction must hold."""
    measured_all = [m for m, _ in peaks if m is not None]
    measured = max(measured_all) if measured_all else None
    reserved = max((r for _, r in peaks if r is not None), default=None) if cuda else None
    evaluated = [eval_prediction] if eval_prediction and state.eval else []
    predicted = max([input_plan.predicted, *evaluated], key=lambda m: m.peak_bytes)
    for_run = max([run_prediction, *evaluated], key=lambda m: m.peak_bytes) if run_prediction else None
    seconds_trained = max(state.train_seconds, 1e-9)
    return TrainResult(
        plan=plan, measured_peak_bytes=measured, measured_reserved_bytes=reserved, rank_peak_bytes=measured_all,
        processes=len(peaks), rank=rank, predicted_peak_bytes=predicted.peak_bytes,
        predicted_allocated_bytes=predicted.allocated_bytes, predicted_reserved_bytes=predicted.reserved_bytes,
        run_predicted_allocated_bytes=for_run.allocated_bytes if for_run and measured is not None else None,
        budget_bytes=input_plan.budget_bytes,
        memory_warning=memory_warning(measured, reserved, predicted, input_plan),
        history=state.history, eval=state.eval, tokens_per_second=state.real_tokens / seconds_trained,
        samples_per_second=state.samples / seconds_trained,
        padding_efficiency=state.real_tokens / max(state.computed_tokens, 1), fallbacks=state.fallbacks,
        optimizer_steps=state.step, epochs_completed=min(state.epoch, epochs), seconds=seconds,
        output_dir=str(output_dir) if output_dir else None, adapter_dir=str(adapter_dir) if adapter_dir else None)


def memory_warning(measured: int | None, reserved: int | None, predicted: MemoryBreakdown, plan: Plan) -> str | None:
    """One line when a measured peak broke the plan's promise: over the budget (on CUDA the reserved peak
    plus the context counts), or above the predicted allocation by more than the headroom; else None."""
    if measured is None:
        return None
    used = (reserved or measured) + plan.device.context_bytes if plan.device.kind == "cuda" else measured
    if used > plan.budget_bytes:
        return (f"the run used {format_bytes(used)}, over its {format_bytes(plan.budget_bytes)} budget "
                f"(predicted {format_bytes(predicted.peak_bytes)}): the plan did not hold; please report it")
    if measured > predicted.allocated_bytes + plan.headroom_bytes:
        return (f"the measured peak {format_bytes(measured)} is above the predicted "
                f"{format_bytes(predicted.allocated_bytes)} by more than the plan's "
                f"{format_bytes(plan.headroom_bytes)} headroom: the memory model missed something")
    return None
