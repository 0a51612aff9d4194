"""The Plan: chosen knobs, what they are predicted to cost, and where the plan came from. JSON in, JSON out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from autofit.devices import DeviceSpec
from autofit.knobs import Knobs, Precision
from autofit.workload import Workload

Phase = Literal["forward", "backward", "optimizer"]


class MemoryBreakdown(BaseModel):
    """Predicted bytes live at the peak moment of a training step, by what holds them."""

    weights: int
    gradients: int
    optimizer_state: int
    activations: int
    """Saved-for-backward tensors (and checkpointed layers' inputs) live at the peak."""
    temporaries: int
    """Transient buffers at the peak: a block's forward/backward workspace, logits/loss, optimizer temps."""
    overhead: int
    """Device overhead: CUDA context and caching-allocator reserve (0 on CPU)."""
    peak_phase: Phase
    """Which moment of the step is the peak."""
    peak_shape: tuple[int, int] = (0, 0)
    """(micro-batch, padded length) of the micro-batch that produces the peak."""

    @property
    def peak_bytes(self) -> int:
        return (self.weights + self.gradients + self.optimizer_state + self.activations
                + self.temporaries + self.overhead)

    @property
    def allocated_bytes(self) -> int:
        """Peak without the device overhead: what torch's allocator statistics report."""
        return self.peak_bytes - self.overhead


class TimePrediction(BaseModel):
    """Predicted time of one optimizer step and one epoch on the target device."""

    step_seconds: float
    epoch_seconds: float
    samples_per_second: float
    padding_efficiency: float = Field(1.0, description="real tokens / computed tokens")
    measured: bool = False
    """True when per-block times were measured on the target device kind; False when estimated from FLOPs."""


class Alternative(BaseModel):
    """A runner-up plan, summarised so a person can weigh it against the chosen one."""

    knobs: Knobs
    peak_bytes: int
    epoch_seconds: float
    note: str
    """One line, e.g. "without 8-bit states: 1.2x slower, 14.1 GB"."""


class SearchInfo(BaseModel):
    trials: int
    seconds: float
    space_size: int | None = None
    """Number of distinct knob combinations the policy allows (None when too large to count)."""
    storage: str | None = None


class Plan(BaseModel):
    """A complete, reproducible answer to "how do I train this model in this budget"."""

    model_id: str
    model_type: str
    num_layers: int
    num_params: int
    task: str
    budget_bytes: int
    device: DeviceSpec
    policy: str
    headroom_bytes: int
    """Bytes the policy keeps free below the budget."""
    knobs: Knobs
    predicted: MemoryBreakdown
    time: TimePrediction
    workload: Workload
    alternatives: list[Alternative] = []
    search: SearchInfo | None = None
    profile_device: str = "cpu"
    versions: dict[str, str] = {}
    created: str = ""

    # --- persistence -------------------------------------------------------------------------------------
    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return cls.model_validate(json.loads(Path(path).read_text()))

    # --- views -------------------------------------------------------------------------------------------
    @property
    def headroom_left_bytes(self) -> int:
        return self.budget_bytes - self.predicted.peak_bytes

    def to_training_arguments(self, output_dir: str = "out", **overrides: Any):
        """transformers.TrainingArguments with the settings HF Trainer can express.

        It cannot express selective checkpointing (HF checkpoints all layers or none: any checkpointed
        layer turns it on for all), freezing (set requires_grad yourself, e.g. with
        autofit.techniques.freeze.apply), token-budget micro-batches, or our bucket boundaries
        (group_by_length is HF's megabatch approximation of bucketing)."""
        from transformers import TrainingArguments

        k = self.knobs
        args: dict[str, Any] = dict(
            output_dir=output_dir,
            per_device_train_batch_size=k.micro_batch_size,
            gradient_accumulation_steps=k.accumulation_steps,
            gradient_checkpointing=bool(k.checkpoint_layers),
            gradient_checkpointing_kwargs={"use_reentrant": False} if k.checkpoint_layers else None,
            fp16=k.precision == Precision.fp16,
            bf16=k.precision == Precision.bf16,
            optim="adamw_bnb_8bit" if k.optimizer_bits == 8 else "adamw_torch",
            report_to=[],
        )
        if self.device.kind == "cpu":  # a plan for the CPU trains there (bf16 there needs it said)
            args["use_cpu"] = True
        if "train_sampling_strategy" in TrainingArguments.__dataclass_fields__:  # transformers >= 5
            args["train_sampling_strategy"] = "group_by_length" if k.bucket_boundaries else "random"
        else:  # transformers 4.x
            args["group_by_length"] = bool(k.bucket_boundaries)
        args.update(overrides)
        return TrainingArguments(**args)
