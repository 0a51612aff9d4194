"""The training step — the micro-batches of one step's examples, then one optimizer step — and evaluation.

Everything here was decided up front (techniques applied, batches cut); these functions make no
decisions. The forward is exactly what the profiler measured: `loss = model(**batch).loss` under
autocast, with the ModelOutput dropped at once so the logits are freed before backward.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from autofit.knobs import Precision
from autofit.techniques import precision as amp
from autofit.techniques.accumulation import count_units, loss_scale, step_units

Batch = dict[str, torch.Tensor]


@dataclass
class StepContext:
    """What a training step needs, built once by the executor."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    precision: Precision
    device: torch.device
    task: str
    max_grad_norm: float | None

    @property
    def trainable(self) -> list[nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]


def accumulate(ctx: StepContext, step: list[Batch]) -> torch.Tensor:
    """Forward and backward of each micro-batch of one optimizer step; returns the step's mean loss.

    Each micro-batch's mean loss is weighted by its share of the step's units (samples or label tokens),
    so the summed gradients are those of the whole step's mean, even for uneven micro-batches."""
    total = step_units(step, ctx.task)
    step_loss = torch.zeros((), device=ctx.device)
    for batch in step:
        units = count_units(batch, ctx.task)
        if units == 0:
            continue  # no label token in this micro-batch: its mean loss would be NaN
        batch = {name: tensor.to(ctx.device, non_blocking=True) for name, tensor in batch.items()}
        with amp.autocast(ctx.precision, ctx.device.type):
            loss = ctx.model(**batch).loss
        loss = loss * loss_scale(units, total)
        ctx.scaler.scale(loss).backward()
        step_loss += loss.detach()
    return step_loss


class NonFiniteGradientError(ArithmeticError):
    """Gradients with inf/NaN outside fp16 (where the GradScaler skips such steps): the run diverged."""


def optimizer_step(ctx: StepContext) -> bool:
    """Unscale and clip the gradients, step, clear them. False when fp16 overflow skipped the update.

    Outside fp16, non-finite gradients raise NonFiniteGradientError before the weights change."""
    if ctx.max_grad_norm is not None:
        ctx.scaler.unscale_(ctx.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(ctx.trainable, ctx.max_grad_norm)
        if ctx.precision is not Precision.fp16 and not torch.isfinite(norm):
            ctx.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteGradientError(f"the gradient norm is {float(norm)}")
    scale = ctx.scaler.get_scale()
    ctx.scaler.step(ctx.optimizer)
    ctx.scaler.update()
    ctx.optimizer.zero_grad(set_to_none=True)
    return ctx.scaler.get_scale() >= scale  # the scaler lowers its scale exactly when it skips


@torch.no_grad()
def evaluate(ctx: StepContext, batches: Iterable[Batch]) -> tuple[float, float | None, int]:
    """(mean loss over units, accuracy or None, samples) of the model on `batches`."""
    was_training = ctx.model.training
    ctx.model.eval()
    loss_sum, units_sum, correct, samples = 0.0, 0, 0, 0
    classify = ctx.task == "classification"
    for batch in batches:
        units = count_units(batch, ctx.task)
        batch = {name: tensor.to(ctx.device, non_blocking=True) for name, tensor in batch.items()}
        with amp.autocast(ctx.precision, ctx.device.type):
            output = ctx.model(**batch)
        if units:
            loss_sum += float(output.loss) * units
            units_sum += units
        classify = classify and output.logits.shape[-1] > 1 and not batch["labels"].is_floating_point()
        if classify:
            correct += int((output.logits.argmax(-1) == batch["labels"]).sum())
        samples += len(batch["input_ids"])
    ctx.model.train(was_training)
    return loss_sum / max(units_sum, 1), (correct / samples if classify else None), samples
