"""run_plan: train a model with a Plan — apply the techniques once, run the steps, measure, checkpoint.

A step is `plan.batch_size` random examples (StepSampler), sorted and cut into micro-batches under the plan's
caps (techniques/accumulation.cut_step); the loss is normalised over the whole step, so every optimizer step
trains exactly the effective batch the plan promises. An out-of-memory fallback cuts the same step's
examples into smaller micro-batches: the step stays the same.

accelerate picks the device and supplies the GradScaler where it makes one (CUDA fp16). The model is *not*
passed through `accelerator.prepare`: under mixed precision that wraps forward in autocast plus
`convert_outputs_to_fp32`, an fp32 copy of the logits the memory model does not expect. We autocast
`loss = model(**batch).loss` ourselves instead, as the profiler measured it. accelerate leaves fp16 on the
CPU without autocast or scaler; our autocast and `precision.grad_scaler` cover it.

A LoRA plan (`knobs.adapter == "lora"`) stores the base and puts adapters on it in place (techniques/adapter.py)
before anything else; the peft wrapper is what trains, checkpoints (trainable tensors only) and, at the end of
a run with an output_dir, saves its adapters to `<output_dir>/adapter` (`TrainResult.adapter_dir`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import set_seed
from transformers import PreTrainedModel

from autofit.data import TokenizedData
from autofit.executor import checkpoint as ckpt
from autofit.executor.fallback import (TrainingOutOfMemoryError, check_changeable, default_fallback,
                                       describe_change, free_memory, is_out_of_memory)
from autofit.executor.interrupt import GracefulInterrupt, TrainingDivergedError, TrainingInterruptedError
from autofit.executor.loop import NonFiniteGradientError, StepContext, accumulate, evaluate, optimizer_step
from autofit.executor.progress import TrainingProgress
from autofit.executor.resume import data_fingerprint, resume_point, run_fingerprint
from autofit.executor.result import EvalRecord, FallbackRecord, StepRecord, TrainResult, memory_warning
from autofit.executor.validate import ExecutorInputError, check_inputs, run_device
from autofit.knobs import Precision
from autofit.measure import PeakMemoryMeter, SteadyStatePeak
from autofit.plan import MemoryBreakdown, Plan
from autofit.techniques import adapter, checkpointing, freeze, lora
from autofit.techniques import optimizer as optim
from autofit.techniques import precision as amp
from autofit.techniques.accumulation import StepSampler, bucket_uppers, cut_step, eval_micro_batches
from autofit.techniques.padding import PaddingCollator

log = logging.getLogger("autofit")


def run_plan(model: PreTrainedModel, plan: Plan, train: TokenizedData, *, eval: TokenizedData | None = None,
             epochs: int = 1, max_steps: int | None = None, lr: float = 2e-5, weight_decay: float = 0.01,
             max_grad_norm: float | None = 1.0, seed: int = 0, output_dir: str | None = None,
             checkpoint_every: int | None = None, resume: bool = False, measure_memory: bool = True,
             quiet: bool = False, fallback: Callable[[Plan], Plan | None] | None = None,
             pad_token_id: int | None = None, drop_last: bool = False,
             eval_prediction: MemoryBreakdown | None = None) -> TrainResult:
    """Train `model` on `train` with `plan` for `epochs` (or `max_steps` optimizer steps).

    Bad input raises ExecutorInputError before anything changes. Out of memory moves to `fallback(plan)`
    (default: halve the micro-batch, then checkpoint all layers) and re-runs the step. With `output_dir`,
    checkpoints every `checkpoint_every` steps and at the end; `resume` continues from the newest one when
    there is one (a checkpoint of other data, plan or settings is refused). A loss or gradient that turns
    inf/NaN outside fp16 stops the run (TrainingDivergedError); Ctrl-C finishes the step, saves and raises
    TrainingInterruptedError. `eval_prediction` is the predicted peak of evaluation, compared with what
    evaluation measures. The model comes back trained, its requires_grad flags and forward restored; under
    LoRA it comes back with its base stored as planned and the trained adapters in it (`TrainResult.model`
    is peft's wrapper, to save or merge with techniques/lora.py)."""
    check_inputs(model, plan, train, eval, epochs=epochs, max_steps=max_steps, output_dir=output_dir,
                 checkpoint_every=checkpoint_every, resume=resume)
    notes = ckpt.prepare_output_dir(output_dir) if output_dir is not None else []
    data_print = data_fingerprint(train)
    run_print = run_fingerprint(plan, seed=seed, lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                                drop_last=drop_last)
    saved = resume_point(output_dir, data_print, run_print) if resume else None
    if resume and saved is None:
        notes.append(f"no checkpoint in {output_dir} yet: starting from the first step")
    state = saved[2] if saved else ckpt.TrainerState(data_fingerprint=data_print, run_fingerprint=run_print)
    run = _Run(model, saved[1] if saved else plan, train, eval, state=state, epochs=epochs, max_steps=max_steps,
               seed=seed, drop_last=drop_last, output_dir=output_dir, checkpoint_every=checkpoint_every,
               fallback=fallback or default_fallback)
    try:
        run.build(lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm, pad_token_id=pad_token_id,
                  resume_from=saved[0] if saved else None)
        meter = PeakMemoryMeter(run.ctx.device, track=[model, run.ctx.optimizer]) if measure_memory else None
        total = epochs * len(run.sampler) if max_steps is None else min(epochs * len(run.sampler), max_steps)
        with meter or nullcontext(), TrainingProgress(total, quiet=quiet, completed=state.step) as bar, \
                GracefulInterrupt() as interrupt:
            for line in notes:
                log.warning(line)
            run.train(meter, bar, interrupt)
    finally:
        run.restore_model()
    return run.result(meter, input_plan=plan, eval_prediction=eval_prediction)


def make_accelerator(mixed_precision: str, *, cpu: bool) -> Accelerator:
    """An Accelerator for this run. accelerate's state is a process-wide singleton fixed by the first
    Accelerator; a later run in the same process (a notebook) with another precision resets it."""
    try:
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    except ValueError:
        if PartialState._shared_state and PartialState().num_processes > 1:
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


class _Run:
    """One run_plan call: the techniques applied once in `build`, then steps until done. Everything a
    resume needs lives in `state` (checkpointed); the rest is rebuilt from the plan."""

    def __init__(self, model: PreTrainedModel, plan: Plan, train: TokenizedData, eval: TokenizedData | None, *,
                 state: ckpt.TrainerState, epochs: int, max_steps: int | None, seed: int, drop_last: bool,
                 output_dir: str | None, checkpoint_every: int | None,
                 fallback: Callable[[Plan], Plan | None]) -> None:
        self.model, self.plan, self.train_data, self.eval_data, self.state = model, plan, train, eval, state
        self.epochs, self.max_steps, self.seed = epochs, max_steps, seed
        self.output_dir, self.checkpoint_every, self.fallback = output_dir, checkpoint_every, fallback
        self.lengths = train.lengths
        self.sampler = StepSampler(len(train), plan.batch_size, seed=seed, drop_last=drop_last)
        self.uppers, self.exact_buckets = bucket_uppers(self.lengths, plan.knobs)
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.was_training = model.training
        self.started = time.perf_counter()
        self.last_checkpoint: Path | None = None
        self.ctx: StepContext | None = None
        self.lora = plan.knobs.adapter == "lora"
        self.trained: torch.nn.Module = model
        """What trains: `model`, or under LoRA peft's wrapper around it."""
        self.adapter_dir: Path | None = None
        self.collator: PaddingCollator | None = None
        self.meter: PeakMemoryMeter | None = None
        self.bar: TrainingProgress | None = None
        self.peak = SteadyStatePeak(None)

    def build(self, *, lr: float, weight_decay: float, max_grad_norm: float | None, pad_token_id: int | None,
              resume_from: Path | None) -> None:
        """Apply freezing and checkpointing, build the optimizer, scaler and collator, restore a checkpoint."""
        knobs, device_type = self.plan.knobs, run_device(self.plan).type
        precision = amp.resolve(knobs.precision, device_type)  # bf16 on an old card runs as fp16
        accelerator = make_accelerator(amp.accelerate_mixed_precision(precision), cpu=device_type == "cpu")
        if accelerator.num_processes > 1:
            raise ExecutorInputError("multi-process training is not supported yet: launch a single process")
        if self.lora:
            set_seed(self.seed)  # the adapters' initial weights follow the seed
            self.trained = adapter.prepare(self.model, knobs, self.plan.task,
                                           precision_dtype=amp.autocast_dtype(precision))
        else:
            freeze.apply(self.model, knobs)
        checkpointing.apply(self.model, knobs.checkpoint_layers)
        self.trained.to(accelerator.device).train()
        try:
            optimizer = optim.build_optimizer(self.trained, knobs, lr=lr, weight_decay=weight_decay)
        except (optim.OptimizerUnavailableError, optim.NoTrainableParametersError) as error:
            raise ExecutorInputError(str(error)) from None
        scaler = accelerator.scaler or amp.grad_scaler(precision, device_type)
        self.ctx = StepContext(self.trained, optimizer, scaler, precision, accelerator.device, self.plan.task,
                               max_grad_norm)
        if pad_token_id is None:
            pad_token_id = getattr(self.model.config, "pad_token_id", None) or 0
        self.collator = PaddingCollator(pad_token_id, knobs.pad_to_multiple_of, task=self.plan.task)
        set_seed(self.seed)
        if resume_from is not None:
            ckpt.load_tensors(resume_from, model=self.trained, optimizer=optimizer, scaler=scaler,
                              trainable_only=self.lora)

    # ---- the loop ----------------------------------------------------------------------------------------
    def train(self, meter: PeakMemoryMeter | None, bar: TrainingProgress, interrupt: GracefulInterrupt) -> None:
        """Every step of every epoch, top to bottom; evaluation at each epoch's end."""
        self.meter, self.bar, self.peak = meter, bar, SteadyStatePeak(meter)
        s = self.state
        while s.epoch < self.epochs and not self.finished:
            steps = self.sampler.epoch_steps(s.epoch)
            while s.position < len(steps) and not self.finished:
                self.train_step(steps[s.position])
                s.position += 1
                self.after_step(interrupt)
            if s.position < len(steps):
                break  # max_steps reached inside the epoch
            self.end_epoch()
        if self.output_dir is not None:
            self.save()
            if self.lora:
                self.adapter_dir = lora.save_adapter(self.trained, Path(self.output_dir) / "adapter")

    @property
    def finished(self) -> bool:
        return self.max_steps is not None and self.state.step >= self.max_steps

    def train_step(self, step: list[int]) -> None:
        """One optimizer step over the examples `step`."""
        started = time.perf_counter()
        batches, loss = self.forward_backward(step)
        loss_value = float(loss)  # float() waits for the device
        if not math.isfinite(loss_value) and self.ctx.precision is not Precision.fp16:
            self.ctx.optimizer.zero_grad(set_to_none=True)
            raise self.diverged(f"the loss is {loss_value}")
        try:
            applied = optimizer_step(self.ctx)
        except NonFiniteGradientError as error:
            raise self.diverged(str(error)) from None
        if not weights_finite(self.ctx.trainable):
            raise self.diverged("the update made the weights inf or NaN", updated=True)
        self.record_step(step, batches, loss_value, time.perf_counter() - started, skipped=not applied)

    def record_step(self, step: list[int], batches: list, loss: float, seconds: float, skipped: bool) -> None:
        """Count a finished step in the run state (checkpointed with it) and its history."""
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        s = self.state
        s.step += 1
        s.real_tokens += real
        s.computed_tokens += sum(b["input_ids"].numel() for b in batches)
        s.samples += len(step)
        s.train_seconds += seconds
        s.history.append(StepRecord(step=s.step, epoch=s.epoch, loss=loss,
                                    lr=self.ctx.optimizer.param_groups[0]["lr"],
                                    tokens_per_second=real / max(seconds, 1e-9), samples=len(step),
                                    micro_batches=len(batches), seconds=seconds, skipped=skipped))

    def forward_backward(self, step: list[int]):
        """(the step's micro-batches, its loss); out of memory falls back and cuts the same examples again."""
        while True:
            pieces = cut_step(step, self.lengths, self.plan.knobs, self.uppers, self.exact_buckets)
            batches = [self.collator([self.train_data.example(i) for i in piece]) for piece in pieces]
            try:
                return batches, accumulate(self.ctx, batches)
            except Exception as error:  # only out-of-memory is handled; the traceback dies with the block
                if not is_out_of_memory(error):
                    raise
                message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
            del batches
            self.fall_back(message)

    def after_step(self, interrupt: GracefulInterrupt) -> None:
        self.peak.after_step()
        record = self.state.history[-1]
        self.bar.update(record.step, loss=record.loss, tokens_per_second=record.tokens_per_second,
                        peak_bytes=self.meter.peak_bytes if self.meter else None)
        if interrupt.requested:
            where = f"; the checkpoint is {self.save()}, run again with resume to continue" \
                if self.output_dir is not None else " (no output_dir: nothing was saved)"
            raise TrainingInterruptedError(f"interrupted after step {self.state.step}{where}")
        if self.checkpoint_every and self.state.step % self.checkpoint_every == 0:
            self.save()

    def end_epoch(self) -> None:
        s = self.state
        if self.eval_data is not None and all(r.epoch != s.epoch for r in s.eval):
            loss, accuracy, samples = evaluate(self.ctx, self.eval_batches())
            s.eval.append(EvalRecord(epoch=s.epoch, step=s.step, loss=loss, accuracy=accuracy, samples=samples))
        s.epoch, s.position = s.epoch + 1, 0

    def eval_batches(self):
        """Evaluation micro-batches under the plan's caps, none larger than a training micro-batch."""
        largest = max(b.micro_batch_size * b.upper_length for b in self.plan.step.buckets)
        data = self.eval_data
        for indices in eval_micro_batches(data.lengths, self.plan.knobs, largest):
            yield self.collator([data.example(i) for i in indices])

    def fall_back(self, message: str) -> None:
        """Drop the partial step (weights change only at steps) and move to the fallback's knobs."""
        self.ctx.optimizer.zero_grad(set_to_none=True)
        free_memory(self.ctx.device)
        old = self.plan.knobs
        new = self.fallback(self.plan)
        if new is None or new.knobs == old:
            advice = "lower the LoRA rank, store the base in nf4" if self.lora else "freeze more layers"
            raise TrainingOutOfMemoryError(
                f"out of memory after {self.state.step} steps with micro-batches of up to {old.micro_batch_size} "
                f"and {len(old.checkpoint_layers)} checkpointed layers, and no smaller plan is left: {advice}, "
                f"use 8-bit optimizer states, shorten max_length or raise the budget ({message})")
        check_changeable(old, new.knobs)
        checkpointing.apply(self.model, new.knobs.checkpoint_layers)
        summary = describe_change(old, new.knobs)
        self.state.fallbacks.append(FallbackRecord(step=self.state.step, error=message, knobs=new.knobs,
                                                   summary=summary))
        log.warning(f"out of memory at step {self.state.step + 1}: {summary}")
        self.plan = new

    def diverged(self, what: str, updated: bool = False) -> TrainingDivergedError:
        """The error that stops a run whose loss, gradients or weights turned inf/NaN; nothing is saved after."""
        kept = f"; the last checkpoint is {self.last_checkpoint}" if self.last_checkpoint else ""
        stop = "stopped" if updated else "stopped before updating the weights"
        return TrainingDivergedError(f"training diverged at step {self.state.step + 1}: {what} (is the learning "
                                     f"rate too high?); {stop}{kept}")

    # ---- ends ----------------------------------------------------------------------------------------
    def save(self) -> Path:
        self.last_checkpoint = ckpt.save_checkpoint(self.output_dir, model=self.trained, optimizer=self.ctx.optimizer,
                                                    scaler=self.ctx.scaler, plan=self.plan, state=self.state,
                                                    trainable_only=self.lora)
        return self.last_checkpoint

    def restore_model(self) -> None:
        """Give the caller its model back: own forward on every layer, its requires_grad flags (not under
        LoRA: the adapters it now holds train, its base stays frozen, as peft left them), its mode."""
        checkpointing.remove(self.model)
        for param, flag in [] if self.lora else self.flags:
            param.requires_grad_(flag)
        self.model.train(self.was_training)

    def result(self, meter: PeakMemoryMeter | None, *, input_plan: Plan,
               eval_prediction: MemoryBreakdown | None) -> TrainResult:
        s = self.state
        measured, reserved = self.peak.result()
        predictions = [input_plan.predicted] + ([eval_prediction] if eval_prediction and s.eval else [])
        predicted = max(predictions, key=lambda m: m.peak_bytes)
        result = TrainResult(
            plan=self.plan, measured_peak_bytes=measured,
            measured_reserved_bytes=reserved if meter is not None and meter.is_cuda else None,
            predicted_peak_bytes=predicted.peak_bytes, predicted_allocated_bytes=predicted.allocated_bytes,
            budget_bytes=input_plan.budget_bytes,
            memory_warning=memory_warning(measured, reserved if meter is not None and meter.is_cuda else None,
                                          predicted, input_plan),
            history=s.history, eval=s.eval,
            tokens_per_second=s.real_tokens / max(s.train_seconds, 1e-9),
            samples_per_second=s.samples / max(s.train_seconds, 1e-9),
            padding_efficiency=s.real_tokens / max(s.computed_tokens, 1),
            fallbacks=s.fallbacks, optimizer_steps=s.step, epochs_completed=min(s.epoch, self.epochs),
            seconds=time.perf_counter() - self.started,
            output_dir=str(self.last_checkpoint) if self.last_checkpoint else None,
            adapter_dir=str(self.adapter_dir) if self.adapter_dir else None)
        result._model = self.trained
        return result


def weights_finite(params: list) -> bool:
    """Whether every trainable weight is finite: one fused norm per tensor and a single device sync."""
    if not params:
        return True
    return bool(torch.stack(torch._foreach_norm([p.detach() for p in params])).isfinite().all())
