"""Out-of-memory fallback: when a step's micro-batches run out of memory, pick smaller knobs and go on.

The default ladder is pure: halve the micro-batch cap and the token budget (the effective batch stays: the
executor cuts the same step's examples into more, smaller micro-batches), then checkpoint every trainable
layer, then give up. Only knobs that change how a step is cut and recomputed may change mid-run; freezing,
precision and optimizer bits would need a new optimizer, and bucket boundaries and padding decide the shapes
the caps apply to, so a fallback that changes them is refused.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

from autofit.knobs import Knobs
from autofit.intmath import ceil_div
from autofit.plan import Plan
from autofit.techniques import freeze

CHANGEABLE = ("micro_batch_size", "tokens_per_micro_batch", "checkpoint_layers")


class FallbackError(ValueError):
    """A fallback plan changed a knob that cannot change in the middle of a run."""


class TrainingOutOfMemoryError(RuntimeError):
    """Out of memory with no smaller plan left to fall back to."""


def is_out_of_memory(error: BaseException) -> bool:
    """torch's OutOfMemoryError, or a RuntimeError saying so (older torch, some kernels, bitsandbytes)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def free_memory(device: torch.device) -> None:
    """Return what the failed window held: collect cycles, then give cached blocks back to the driver."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def default_fallback(plan: Plan) -> Plan | None:
    """The next smaller plan, or None when nothing is left: halve the micro-batch cap and the token budget
    (ceil); at micro-batch 1, checkpoint every trainable layer. The prediction is not redone."""
    k = plan.knobs
    largest = max(b.micro_batch_size for b in plan.step.buckets)
    if largest > 1:
        tokens = ceil_div(k.tokens_per_micro_batch, 2) if k.tokens_per_micro_batch else None
        knobs = k.model_copy(update=dict(micro_batch_size=ceil_div(largest, 2), tokens_per_micro_batch=tokens))
    else:
        all_trainable = tuple(i for i in range(plan.num_layers) if freeze.trains("layer", i, k))
        if k.checkpoint_layers == all_trainable:
            return None
        knobs = k.model_copy(update=dict(checkpoint_layers=all_trainable))
    return plan.model_copy(update=dict(knobs=Knobs.model_validate(knobs.model_dump())))


def check_changeable(old: Knobs, new: Knobs) -> None:
    """Raise FallbackError when `new` changes a knob that cannot change mid-run."""
    fixed = [name for name in Knobs.model_fields if name not in CHANGEABLE
             and getattr(old, name) != getattr(new, name)]
    if fixed:
        raise FallbackError(f"a fallback plan cannot change {', '.join(fixed)} in the middle of a run")


def describe_change(old: Knobs, new: Knobs) -> str:
    """One line naming what changed, e.g. "micro_batch_size 16 -> 8, tokens_per_micro_batch 512 -> 256"."""
    changes = [f"{name} {getattr(old, name)} -> {getattr(new, name)}" for name in Knobs.model_fields
               if getattr(old, name) != getattr(new, name)]
    return ", ".join(changes) or "no change"


def smaller_plan(plan: Plan, fallback: Callable[[Plan], Plan | None], *, step: int, message: str) -> Plan:
    """`fallback(plan)`, checked: TrainingOutOfMemoryError when it has nothing smaller, FallbackError when it
    changes a knob that cannot change mid-run."""
    old, new = plan.knobs, fallback(plan)
    if new is None or new.knobs == old:
        advice = "lower the LoRA rank, store the base in nf4" if old.adapter == "lora" else "freeze more layers"
        raise TrainingOutOfMemoryError(
            f"out of memory after {step} steps with micro-batches of up to {old.micro_batch_size} "
            f"and {len(old.checkpoint_layers)} checkpointed layers, and no smaller plan is left: {advice}, "
            f"use 8-bit optimizer states, shorten max_length or raise the budget ({message})")
    check_changeable(old, new.knobs)
    return new
