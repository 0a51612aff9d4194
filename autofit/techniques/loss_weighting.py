"""Loss weighting: normalise an accumulated step's loss over the whole step, not each micro-batch.

A step is cut into micro-batches of uneven size (`accumulation.cut_step`). Scaling each micro-batch's mean
loss by 1/accumulation_steps, as the HF Trainer long did, over-weights the small ones; weighting each by its
share of the step's units (examples, or label tokens for token-level tasks) makes the summed gradient the
big batch's gradient exactly. Saves nothing and costs nothing: it is what makes accumulation honest.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from autofit.techniques.accumulation import AccumulationError
from autofit.workload import TOKEN_LEVEL_TASKS

IGNORE_INDEX = -100
"""Label value excluded from token-level losses (transformers' and torch's cross-entropy default)."""


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


def loss_scale(micro_count: int, step_count: int) -> float:
    """Weight of a micro-batch's mean loss so the summed gradients equal the gradient of the step's mean.

    sum_i (n_i / N) * mean_i = (1/N) * sum of all per-unit losses: exact for uneven micro-batches, where
    the usual 1/accumulation_steps scaling over-weights small ones. A micro-batch with no units has a NaN
    mean loss: skip its backward rather than scale it by 0."""
    if step_count < 1:
        raise AccumulationError(f"an optimizer step must hold at least one unit, got {step_count}")
    if not 0 <= micro_count <= step_count:
        raise AccumulationError(f"micro-batch count {micro_count} outside 0..{step_count}")
    return micro_count / step_count
