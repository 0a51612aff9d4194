"""Gradient accumulation: several micro-batches' gradients are summed before one optimizer step.

Trade-off: saves activation memory (only one micro-batch is live, the effective batch is unchanged);
costs GPU efficiency, since smaller micro-batches use the device less well and steps run sequentially.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

IGNORE_INDEX = -100
"""Label value excluded from token-level losses (transformers' and torch's cross-entropy default)."""

TOKEN_LEVEL_TASKS = ("token-classification", "causal-lm")
"""Tasks whose loss is a mean over label tokens, not over samples."""


class AccumulationError(ValueError):
    """Bad accumulation input (non-positive sizes, empty windows, unknown task)."""


# ---- pure side -------------------------------------------------------------------------------------------


def accumulation_for(effective_batch: int, micro_batch: int) -> int:
    """Micro-batches per optimizer step so that micro_batch x steps >= effective_batch (ceil)."""
    if effective_batch < 1 or micro_batch < 1:
        raise AccumulationError(f"batch sizes must be >= 1, got {effective_batch} and {micro_batch}")
    return -(-effective_batch // micro_batch)


def windows(num_micro_batches: int, accumulation_steps: int) -> Iterator[int]:
    """Sizes of the accumulation windows of an epoch; the partial last window steps too."""
    if num_micro_batches < 0 or accumulation_steps < 1:
        raise AccumulationError(f"need num_micro_batches >= 0 and accumulation_steps >= 1, "
                                f"got {num_micro_batches} and {accumulation_steps}")
    full, rest = divmod(num_micro_batches, accumulation_steps)
    yield from [accumulation_steps] * full
    if rest:
        yield rest


def optimizer_steps(num_micro_batches: int, accumulation_steps: int) -> int:
    """Optimizer steps per epoch (the partial last window included)."""
    return sum(1 for _ in windows(num_micro_batches, accumulation_steps))


# ---- apply side ------------------------------------------------------------------------------------------


def count_units(batch: Mapping[str, Any], task: str) -> int:
    """What the task's loss averages over: samples, or non-ignored label tokens for token-level tasks.

    Causal-LM losses shift labels by one (token t predicts t+1), so the first label of a row never counts."""
    if task not in TOKEN_LEVEL_TASKS:
        first = batch.get("labels", batch.get("input_ids"))
        if first is None:
            raise AccumulationError("batch has neither labels nor input_ids to count samples from")
        return len(first)
    labels = batch.get("labels")
    if labels is None:
        raise AccumulationError(f"a {task} batch needs token labels to count")
    labels = torch.as_tensor(labels)
    if task == "causal-lm":
        labels = labels[..., 1:]
    return int((labels != IGNORE_INDEX).sum())


def window_units(batches: Iterable[Mapping[str, Any]], task: str) -> int:
    """Units in a whole accumulation window (fetch the window's micro-batches first, then weight each)."""
    return sum(count_units(batch, task) for batch in batches)


def loss_scale(micro_count: int, window_count: int) -> float:
    """Weight of a micro-batch's mean loss so the summed gradients equal the gradient of the window's mean.

    sum_i (n_i / N) * mean_i = (1/N) * sum of all per-unit losses: exact even for uneven micro-batches,
    where the usual 1/accumulation_steps scaling over-weights small micro-batches. A micro-batch with no
    units has a NaN mean loss: skip its backward rather than scale it by 0."""
    if window_count < 1:
        raise AccumulationError(f"an accumulation window must hold at least one unit, got {window_count}")
    if not 0 <= micro_count <= window_count:
        raise AccumulationError(f"micro-batch count {micro_count} outside 0..{window_count}")
    return micro_count / window_count
