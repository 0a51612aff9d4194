"""The Plan: chosen knobs, what they are predicted to cost, and where the plan came from. JSON in, JSON out.

A plan file is input like any other: every field carries its bounds, and what can be derived (the peak, the
step layout) is derived from the rest rather than believed."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, computed_field, model_validator

from autofit.budget import MAX_BUDGET_BYTES, MIN_BUDGET_BYTES
from autofit.cluster import SINGLE, Cluster
from autofit.devices import DeviceSpec
from autofit.intmath import ceil_div
from autofit.knobs import Knobs, Precision
from autofit.techniques.accumulation import StepLayout, micro_batch_size_for, process_batch_size, step_layout
from autofit.techniques.bucketing import padded_length
from autofit.workload import Task, Workload

Phase = Literal["forward", "backward", "optimizer"]


class PlanFileError(ValueError):
    """A plan file that cannot be read or does not validate; the message names the field."""


class _Checked(BaseModel):
    """What a plan file holds: unknown fields, NaN and infinity are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class MemoryBreakdown(_Checked):
    """Predicted bytes live at the peak moment of a training step, by what holds them: on one process (with
    several, on the one whose peak is highest)."""

    weights: int = Field(ge=0)
    gradients: int = Field(ge=0)
    optimizer_state: int = Field(ge=0)
    activations: int = Field(ge=0)
    """Saved-for-backward tensors (and checkpointed layers' inputs) live at the peak."""
    temporaries: int = Field(ge=0)
    """Transient buffers at the peak: a block's forward/backward workspace, logits/loss, optimizer temps."""
    overhead: int = Field(ge=0)
    """Device overhead that no allocation holds: the CUDA context and the caching allocator's reserve above
    what is allocated (0 on CPU)."""
    context: int = Field(0, ge=0)
    """The part of `overhead` that is the CUDA context (outside the allocator); the rest is its reserve."""
    workspace: int = Field(0, ge=0)
    """Library workspaces (cuBLAS) the caching allocator holds for the whole run (0 on CPU, and where the
    device is uncalibrated: its default context covers them)."""
    gathered: int = Field(0, ge=0)
    """FSDP: units' full weights gathered from their shards at the peak, and the gradients of a unit before
    they are reduce-scattered (0 with one process or DDP). `weights`, `gradients` and `optimizer_state`
    are then one process's shards."""
    peak_phase: Phase
    """Which moment of the step is the peak."""
    peak_shape: tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]] = (0, 0)
    """(micro-batch, padded length) of the micro-batch that produces the peak."""

    @model_validator(mode="before")
    @classmethod
    def _totals_match_parts(cls, data: Any) -> Any:
        """The JSON carries the totals for its readers; on the way in they must equal the sum of the parts."""
        if isinstance(data, dict) and ("peak_bytes" in data or "allocated_bytes" in data):
            data = dict(data)
            parts = ("weights", "gradients", "optimizer_state", "activations", "temporaries", "overhead", "gathered",
                     "workspace")
            values = [data.get(name, 0 if name in ("gathered", "workspace") else None) for name in parts]
            totals = {name: data.pop(name) for name in ("peak_bytes", "allocated_bytes", "reserved_bytes")
                      if name in data}
            if all(isinstance(v, int) and v >= 0 for v in values):  # else the fields' own checks speak
                expected = {"peak_bytes": sum(values), "allocated_bytes": sum(values) - data["overhead"],
                            "reserved_bytes": sum(values) - data.get("context", 0)}
                for name, value in totals.items():
                    if value != expected[name]:
                        raise ValueError(f"{name} is not the sum of the breakdown ({expected[name]}): "
                                         "was the file edited?")
        return data

    @computed_field
    @property
    def peak_bytes(self) -> int:
        """The predicted peak: every part together."""
        return (self.weights + self.gradients + self.optimizer_state + self.activations
                + self.temporaries + self.overhead + self.gathered + self.workspace)

    @computed_field
    @property
    def allocated_bytes(self) -> int:
        """Peak without the device overhead: what `torch.cuda.max_memory_allocated` reports."""
        return self.peak_bytes - self.overhead

    @computed_field
    @property
    def reserved_bytes(self) -> int:
        """Peak without the CUDA context: what `torch.cuda.max_memory_reserved` reports, the figure an
        out-of-memory error is raised at (with the context, it must stay within the card)."""
        return self.peak_bytes - self.context

    @model_validator(mode="after")
    def _context_within_overhead(self) -> MemoryBreakdown:
        if self.context > self.overhead:
            raise ValueError(f"context {self.context} is part of overhead {self.overhead}, yet larger")
        return self


class TimePrediction(_Checked):
    """Predicted time of one optimizer step and one epoch on the target device."""

    step_seconds: float = Field(ge=0)
    epoch_seconds: float = Field(ge=0)
    samples_per_second: float = Field(ge=0)
    padding_efficiency: float = Field(1.0, gt=0, le=1, description="real tokens / computed tokens")
    measured: bool = False
    """True when per-block times were measured on the target device kind; False when estimated from FLOPs."""


Technique = Literal["adapter", "freezing", "checkpointing", "precision", "optimizer", "micro-batch", "padding",
                    "sharding"]
"""The knobs grouped by the technique that owns them, as a plan reports them."""


class Alternative(_Checked):
    """A runner-up plan: its knobs and predictions, and which techniques it sets differently from the chosen
    plan (report.py words it: "with 8-bit AdamW: 1.2x slower, 14.1 GB")."""

    knobs: Knobs
    peak_bytes: int = Field(ge=0)
    epoch_seconds: float = Field(ge=0)
    changed: list[Technique] = Field(min_length=1)
    risk: float | None = Field(None, ge=0)
    """Its quality risk as the policy prices it (the chosen plan's is `SearchInfo.risk`): what a faster
    runner-up lost by. None in plans from before it was recorded."""


class AdapterWeights(_Checked):
    """An adapter plan's weights by what holds them, for people (report.py): the frozen base's linear layers
    at their storage dtype, the rest of the frozen base, and what trains. Sized from the profile
    (techniques/lora.py: weights_summary); the memory model's `weights` is the total that counts."""

    trainable_params: int = Field(ge=0)
    """The adapters' A and B, and the task head's trainable copy."""
    base_linear_params: int = Field(ge=0)
    """Weights of the blocks' linear layers: what NF4 stores in 4 bits."""
    base_linear_bytes: int = Field(ge=0)
    """Their storage, quantization constants included."""
    quantization_constant_bytes: int = Field(ge=0)
    """Of which NF4's scales and code books (0 for a plain base)."""
    other_frozen_bytes: int = Field(ge=0)
    """The rest of the frozen base: embeddings, norms, biases, the original head."""
    trainable_bytes: int = Field(ge=0)
    """The trainable tensors' own storage (fp32)."""


class SearchInfo(_Checked):
    trials: int = Field(ge=0)
    seconds: float = Field(ge=0)
    space_size: int | None = Field(None, ge=0)
    """Number of distinct knob combinations the policy allows (None when too large to count)."""
    storage: str | None = None
    risk: float | None = Field(None, ge=0)
    """The chosen plan's quality risk as the policy prices it (None in plans from before it was recorded)."""


class Plan(_Checked):
    """A complete, reproducible answer to "how do I train this model in this budget"."""

    model_id: str
    model_type: str
    num_layers: int = Field(ge=1)
    num_params: int = Field(ge=1)
    task: Task
    budget_bytes: int = Field(ge=MIN_BUDGET_BYTES, le=MAX_BUDGET_BYTES)
    device: DeviceSpec
    cluster: Cluster = SINGLE
    """How many processes (GPUs) on how many machines; `device`, the budget and the predicted peak are one
    process's."""
    offloaded_bytes: int = Field(0, ge=0)
    """CPU offload: the CPU RAM one machine needs for its processes' shards (0 without offload)."""
    policy: str
    headroom_bytes: int = Field(ge=0)
    """Bytes the policy keeps free below the budget."""
    knobs: Knobs
    predicted: MemoryBreakdown
    time: TimePrediction
    workload: Workload
    alternatives: list[Alternative] = []
    search: SearchInfo | None = None
    adapter: AdapterWeights | None = None
    """An adapter plan's weights in detail (None for full fine-tuning, and in plans from before adapters)."""
    profile_device: str = "cpu"
    """Where the profile's block times were measured: "cpu", "cuda" or "meta" (nothing ran)."""
    profile_device_name: str = ""
    """The card they were measured on, when "cuda"."""
    versions: dict[str, str] = {}
    created: str = ""

    @model_validator(mode="before")
    @classmethod
    def _drop_derived(cls, data: Any) -> Any:
        """`step` is written for readers and derived again from the knobs and workload on the way in."""
        if isinstance(data, dict) and "step" in data:
            data = {k: v for k, v in data.items() if k != "step"}
        if isinstance(data, dict) and isinstance(data.get("alternatives"), list):
            # plan files written before alternatives named what they change (a sentence, "note"): a runner-up
            # is advice, not part of the plan, so an old file still loads, without them
            old = [a for a in data["alternatives"] if isinstance(a, dict) and "note" in a and "changed" not in a]
            if old:
                data = {**data, "alternatives": [a for a in data["alternatives"] if not any(a is o for o in old)]}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Plan:
        if self.headroom_bytes >= self.budget_bytes:
            raise ValueError(f"headroom_bytes {self.headroom_bytes} leaves nothing of budget_bytes {self.budget_bytes}")
        if self.workload.task != self.task:
            raise ValueError(f"workload.task {self.workload.task!r} differs from task {self.task!r}")
        if self.workload.batch_size < self.cluster.processes:
            raise ValueError(f"a step of {self.workload.batch_size} examples cannot give each of "
                             f"{self.cluster.processes} processes one")
        self.knobs.validate_for(self.num_layers)
        return self

    @property
    def timed_on(self) -> str:
        """What the predicted times were measured on, in words: "NVIDIA H200", "the CPU"."""
        return self.profile_device_name or ("the CPU" if self.profile_device == "cpu" else self.profile_device)

    @computed_field
    @property
    def step(self) -> StepLayout:
        """The optimizer step as it runs: `workload.batch_size` examples, each bucket's micro-batches."""
        return step_layout(self.knobs, self.workload.lengths, self.workload.batch_size, self.cluster.processes)

    # --- persistence -------------------------------------------------------------------------------------
    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read a plan file; PlanFileError names the file and the first bad field."""
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"Plan.load takes a plan file's path, not {type(path).__name__}")
        path = Path(path)
        try:
            return cls.model_validate(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as error:
            raise PlanFileError(f"cannot read plan file {path}: {error}") from None
        except RecursionError:
            raise PlanFileError(f"{path} is not a plan: it is nested too deeply") from None
        except json.JSONDecodeError as error:
            raise PlanFileError(f"{path} is not JSON ({error.msg} at line {error.lineno})") from None
        except ValidationError as error:
            raise PlanFileError(f"{path} is not a valid plan: {describe_validation_error(error)}") from None

    # --- views -------------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        """Examples per optimizer step (the effective batch)."""
        return self.workload.batch_size

    @property
    def headroom_left_bytes(self) -> int:
        return self.budget_bytes - self.predicted.peak_bytes

    def to_accelerate_config(self, path: str | Path) -> Path:
        """Write accelerate's config for this plan (distributed type, FSDP2 settings, precision, processes and
        machines) to `path`; train with `accelerate launch --config_file path -m autofit train --plan ...`."""
        from autofit.launch import write_accelerate_config

        return write_accelerate_config(path, self.knobs, processes=self.cluster.processes,
                                       machines=self.cluster.machines, device_kind=self.device.kind)

    def to_training_arguments(self, output_dir: str = "out", **overrides: Any):
        """transformers.TrainingArguments with the settings HF Trainer can express.

        HF's step is per_device_train_batch_size x gradient_accumulation_steps sequences, every micro-batch of
        the same size: the largest size that divides each process's share of the effective batch, at most
        the plan's cap at the data's longest padded length (with a token budget, long examples go a few at a
        time, and HF may put the longest example in any micro-batch). HF's step is then exactly the plan's
        batch (a share that is a prime number above the cap runs one sequence at a time).
        So a token-budgeted plan's short examples run in smaller micro-batches than autofit runs them: slower,
        never over the plan's peak. The optimizer settings and seed are autofit's defaults (lr 2e-5, 2e-4 for
        LoRA; weight decay 0.01, a constant rate, gradients clipped at 1.0, seed 0); `overrides` replace any.

        It cannot express selective checkpointing (HF checkpoints all layers or none: any checkpointed
        layer turns it on for all), freezing (set requires_grad yourself, e.g. with
        autofit.techniques.freeze.apply), LoRA (wrap the model with peft's LoraConfig at the plan's
        lora_rank and targets yourself), or our bucket boundaries (group_by_length is HF's megabatch
        approximation of bucketing)."""
        import torch
        from transformers import TrainingArguments

        from autofit.techniques.optimizer import default_learning_rate

        if self.device.kind == "cuda" and not torch.cuda.is_available() and not overrides.get("use_cpu"):
            raise ValueError(f"this plan is for a CUDA device ({self.device.name}) and none is visible here: "
                             "plan again with device='cpu', or build the arguments where the GPU is")
        k = self.knobs
        if k.strategy == "fsdp" and self.cluster.processes > 1:
            raise ValueError("an FSDP plan's sharding is not expressible as TrainingArguments here: train it "
                             "with autofit under accelerate launch (plan.to_accelerate_config)")
        # HF's step is that of every process: each trains its share of the effective batch
        share = process_batch_size(self.batch_size, self.cluster.processes)
        longest = padded_length(self.workload.lengths.max_length, k.pad_to_multiple_of)
        cap = min(micro_batch_size_for(longest, k), share)
        micro = max(size for size in range(1, cap + 1) if share % size == 0)  # HF's step is then exactly ours
        args: dict[str, Any] = dict(
            output_dir=output_dir,
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=ceil_div(share, micro),
            fp16=k.precision == Precision.fp16,
            bf16=k.precision == Precision.bf16,
            optim="adamw_bnb_8bit" if k.optimizer_bits == 8 else "adamw_torch",
            learning_rate=default_learning_rate(k), weight_decay=0.01, lr_scheduler_type="constant",
            max_grad_norm=1.0, seed=0, report_to=[],
        )
        # transformers 5 renamed gradient_checkpointing (the old name warns)
        named = "activation" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient"
        args[f"{named}_checkpointing"] = bool(k.checkpoint_layers)
        args[f"{named}_checkpointing_kwargs"] = {"use_reentrant": False} if k.checkpoint_layers else None
        if self.device.kind == "cpu":  # a plan for the CPU trains there (bf16 there needs it said)
            args["use_cpu"] = True
        if "train_sampling_strategy" in TrainingArguments.__dataclass_fields__:  # transformers >= 5
            args["train_sampling_strategy"] = "group_by_length" if k.bucket_boundaries else "random"
        else:  # transformers 4.x
            args["group_by_length"] = bool(k.bucket_boundaries)
        args.update(overrides)
        return TrainingArguments(**args)


def describe_validation_error(error: ValidationError) -> str:
    """The first error of a pydantic validation, as "field.path: message" (what a person can fix)."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "plan"
    return f"{where}: {first['msg']}" + (f" (+{error.error_count() - 1} more)" if error.error_count() > 1 else "")
