"""The training step — the micro-batches of one step's examples, then one optimizer step — and evaluation.

Everything here was decided up front (techniques applied, batches cut); these functions make no
decisions. The forward is exactly what the profiler measured: `loss = model(**batch).loss` under
autocast, with the ModelOutput dropped at once so the logits are freed before backward.

With several processes (`StepContext.processes`), each runs its share of the step with weights from
executor/distributed.py; DDP and FSDP average gradients over the processes, so each loss is scaled by their
number to make the average the whole step's gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from autofit.knobs import Precision
from autofit.techniques import precision as amp
from autofit.techniques.kv_cache import no_kv_cache
from autofit.techniques.loss_weighting import count_units, loss_scale

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
    processes: int = 1
    """Processes whose gradients DDP/FSDP average: each loss is scaled by it."""
    no_sync: Callable[[], AbstractContextManager] | None = None
    """DDP's `no_sync`: gradients of all but a step's last micro-batch accumulate locally."""
    grads_to_none: bool = True
    """Free gradients after each step; False under DDP, whose gradients are views of its resident buckets
    (so the meter keeps seeing them through p.grad)."""

    @property
    def trainable(self) -> list[nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]


class CollatedPieces:
    """A step's micro-batches, each collated only when its turn comes: the memory model counts the running
    micro-batch's inputs, not the whole step's. Counts the real and computed tokens of those it collated."""

    def __init__(self, pieces: Sequence[Sequence[int]], collate: Callable[[Sequence[int]], Batch]):
        self.pieces, self.collate = pieces, collate
        self.tokens: list[tuple[int, int]] = []
        """(real, computed) tokens of each micro-batch collated so far, in order."""

    def __len__(self) -> int:
        return len(self.pieces)

    def __iter__(self):
        self.tokens = []
        for piece in self.pieces:
            batch = self.collate(piece)
            self.tokens.append((int(batch["attention_mask"].sum()), batch["input_ids"].numel()))
            yield batch


def unit_weights(pieces: Sequence[Sequence[int]], units: Callable[[int], int]) -> list[float | None]:
    """Each micro-batch's share of the step's units, from the examples' own unit counts, so that no
    micro-batch is collated before its turn."""
    return _shares([sum(map(units, piece)) for piece in pieces])


def _shares(counts: Sequence[int]) -> list[float | None]:
    """Each micro-batch's share of the step's units (None for one without a unit: it is skipped)."""
    total = sum(counts)
    return [loss_scale(count, total) if count else None for count in counts]


def accumulate(ctx: StepContext, step: Iterable[Batch], weights: Sequence[float | None] | None = None
               ) -> torch.Tensor:
    """Forward and backward of each micro-batch of one optimizer step; returns the step's mean loss (with
    `weights`, this process's part of it). Without `weights`, `step` is a list (its units are counted first).

    Each micro-batch's mean loss is weighted by its share of the step's units (samples or label tokens),
    so the summed gradients are those of the whole step's mean, even for uneven micro-batches. `weights`
    gives those shares instead (several processes: shares of the whole step over all processes; a weight
    0 runs forward and backward only to keep FSDP's collectives in step with the other processes)."""
    if weights is None:
        step = list(step)
        weights = _shares([count_units(batch, ctx.task) for batch in step])
    step_loss = torch.zeros((), device=ctx.device)
    with no_kv_cache(ctx.model):
        for i, (batch, weight) in enumerate(zip(step, weights, strict=True)):
            if weight is None:
                continue  # no label token in this micro-batch: its mean loss would be NaN
            batch = {name: tensor.to(ctx.device, non_blocking=True) for name, tensor in batch.items()}
            last = i == len(weights) - 1
            with ctx.no_sync() if ctx.no_sync is not None and not last else nullcontext():
                with amp.autocast(ctx.precision, ctx.device.type):
                    loss = ctx.model(**batch).loss
                ctx.scaler.scale(loss * (weight * ctx.processes)).backward()
            step_loss += loss.detach() * weight
    return step_loss


class NonFiniteGradientError(ArithmeticError):
    """Gradients with inf/NaN outside fp16 (where the GradScaler skips such steps): the run diverged."""


def optimizer_step(ctx: StepContext) -> bool:
    """Unscale and clip the gradients, step, clear them. False when fp16 overflow skipped the update.

    Outside fp16, non-finite gradients raise NonFiniteGradientError before the weights change."""
    if ctx.max_grad_norm is not None:
        ctx.scaler.unscale_(ctx.optimizer)
        norm = _local(torch.nn.utils.clip_grad_norm_(ctx.trainable, ctx.max_grad_norm))
        if ctx.precision is not Precision.fp16 and not torch.isfinite(norm):
            ctx.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteGradientError(f"the gradient norm is {float(norm)}")
    scale = ctx.scaler.get_scale()
    ctx.scaler.step(ctx.optimizer)
    ctx.scaler.update()
    ctx.optimizer.zero_grad(set_to_none=ctx.grads_to_none)
    return ctx.scaler.get_scale() >= scale  # the scaler lowers its scale exactly when it skips


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local value (FSDP's gradient norm is a replicated DTensor), or the tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def weights_finite(params: list) -> bool:
    """Whether every trainable weight (this process's shard of it) is finite: one fused norm per tensor and a
    single device sync."""
    if not params:
        return True
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    return bool(torch.stack(torch._foreach_norm([p.detach() for p in local])).isfinite().all())


@torch.no_grad()
def evaluate(ctx: StepContext, batches: Iterable[Batch]) -> tuple[float, float | None, int]:
    """(mean loss over units, accuracy or None, samples) of the model on `batches`."""
    was_training = ctx.model.training
    ctx.model.eval()
    loss_sum, units_sum, correct, samples = 0.0, 0, 0, 0
    classify = ctx.task == "classification"
    with no_kv_cache(ctx.model):
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
            del output  # its logits would otherwise live through the next batch's forward
    ctx.model.train(was_training)
    return loss_sum / max(units_sum, 1), (correct / samples if classify else None), samples
