"""run_plan: train a model with a Plan — apply the techniques once, run the windows, measure, checkpoint.

accelerate picks the device and supplies the GradScaler where it makes one (CUDA fp16). The model is
*not* passed through `accelerator.prepare`: under mixed precision that wraps forward in autocast plus
`convert_outputs_to_fp32`, an fp32 copy of the logits the memory model does not expect, and
`unwrap_model(keep_fp32_wrapper=False)` then unwraps past transformers' own forward decorators. We
autocast `loss = model(**batch).loss` ourselves instead, as the profiler measured it. accelerate leaves
fp16 on the CPU without autocast or scaler; our autocast and `precision.grad_scaler` cover it. The
windows of each epoch come from the sampler of the plan the run started with, so an out-of-memory
fallback re-splits the same examples into smaller micro-batches: every optimizer step sees the
effective batch it would have seen.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from itertools import accumulate as running_sum
from pathlib import Path

from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import set_seed
from transformers import PreTrainedModel

from autofit.data import TokenizedData
from autofit.executor import checkpoint as ckpt
from autofit.executor.fallback import (FallbackError, TrainingOutOfMemoryError, check_changeable, default_fallback,
                                       describe_change, free_memory, is_out_of_memory)
from autofit.executor.loop import StepContext, accumulate, evaluate, optimizer_step
from autofit.executor.progress import TrainingProgress
from autofit.executor.result import EvalRecord, FallbackRecord, StepRecord, TrainResult
from autofit.executor.validate import ExecutorInputError, check_inputs, run_device
from autofit.measure import PeakMemoryMeter
from autofit.plan import Plan
from autofit.techniques import checkpointing, freeze
from autofit.techniques import optimizer as optim
from autofit.techniques import precision as amp
from autofit.techniques.bucketing import BucketBatchSampler, BucketingError, padded_length, micro_batch_size_for
from autofit.techniques.bucketing import sorted_eval_batches
from autofit.techniques.accumulation import windows as window_sizes
from autofit.techniques.padding import PaddingCollator


def run_plan(model: PreTrainedModel, plan: Plan, train: TokenizedData, *, eval: TokenizedData | None = None,
             epochs: int = 1, max_steps: int | None = None, lr: float = 2e-5, weight_decay: float = 0.01,
             max_grad_norm: float | None = 1.0, seed: int = 0, output_dir: str | None = None,
             checkpoint_every: int | None = None, resume: bool = False, measure_memory: bool = True,
             quiet: bool = False, fallback: Callable[[Plan], Plan | None] | None = None,
             pad_token_id: int | None = None) -> TrainResult:
    """Train `model` on `train` with `plan`'s knobs for `epochs` (or `max_steps` optimizer steps).

    Bad input raises ExecutorInputError before anything changes. Out of memory in forward/backward
    moves to `fallback(plan)` (default: halve the micro-batch, then checkpoint all layers) and re-runs
    the window. With `output_dir`, checkpoints every `checkpoint_every` steps and at the end; `resume`
    continues from the newest one. The model comes back trained, with its requires_grad flags and
    forward restored."""
    check_inputs(model, plan, train, eval, epochs=epochs, max_steps=max_steps, output_dir=output_dir,
                 checkpoint_every=checkpoint_every, resume=resume)
    saved = _resume_point(plan, output_dir) if resume else None
    run = _Run(model, plan, train, eval, saved=saved, epochs=epochs, max_steps=max_steps, seed=seed,
               output_dir=output_dir, checkpoint_every=checkpoint_every,
               fallback=fallback or default_fallback)
    try:
        run.setup(lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm, pad_token_id=pad_token_id)
        meter = PeakMemoryMeter(run.ctx.device, track=[model, run.ctx.optimizer]) if measure_memory else None
        total = epochs * len(run.epoch_windows(0))
        total = total if max_steps is None else min(total, max_steps)
        with meter or nullcontext(), TrainingProgress(total, quiet=quiet, completed=run.state.step) as bar:
            run.train(meter, bar)
    finally:
        run.restore_model()
    return run.result(meter)


def _resume_point(plan: Plan, output_dir: str) -> tuple[Path, Plan, ckpt.TrainerState]:
    path = ckpt.latest_checkpoint(output_dir)
    if path is None:
        raise ExecutorInputError(f"resume asked for, but {output_dir} holds no complete checkpoint")
    saved_plan, state = ckpt.load_plan_and_state(path)
    identity = ("model_type", "num_layers", "num_params", "task")
    if any(getattr(saved_plan, name) != getattr(plan, name) for name in identity):
        raise ExecutorInputError(f"the checkpoint in {path} is for {saved_plan.model_id} "
                                 f"({saved_plan.task}), not for this plan's {plan.model_id} ({plan.task})")
    return path, saved_plan, state


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


def split_window(window: list[list[int]], lengths: list[int], knobs) -> list[list[int]]:
    """Cut each batch of a window into micro-batches the knobs allow (identity for the sampler's own
    knobs; after a fallback, the same examples in smaller pieces)."""
    pieces = []
    for batch in window:
        longest = padded_length(max(lengths[i] for i in batch), knobs.pad_to_multiple_of)
        size = micro_batch_size_for(longest, knobs)
        pieces.extend(batch[start:start + size] for start in range(0, len(batch), size))
    return pieces


class _SteadyPeak:
    """Peak memory of the steady-state training steps: the call's first optimizer step (before it no
    optimizer state exists) and evaluation are left out, as the memory model assumes."""

    def __init__(self, meter: PeakMemoryMeter | None) -> None:
        self.meter, self.steps = meter, 0
        self.first: tuple[int, int] | None = None
        self.steady = (0, 0)

    def _read(self) -> tuple[int, int]:
        return self.meter.peak_bytes, self.meter.peak_reserved_bytes

    def after_step(self) -> None:
        self.steps += 1
        if self.meter is not None and self.steps == 1:
            self.first = self._read()
            self.meter.reset_peak()

    def bank(self) -> None:
        """Keep the peak so far (call before evaluation)."""
        if self.meter is not None and self.steps >= 1:
            self.steady = tuple(map(max, self.steady, self._read()))

    def restart(self) -> None:
        """Forget what happened since `bank` (call after evaluation)."""
        if self.meter is not None:
            self.meter.reset_peak()

    def result(self) -> tuple[int | None, int | None]:
        if self.meter is None or self.steps == 0:
            return None, None
        if self.steps == 1:
            return self.first
        self.bank()
        return self.steady


class _Run:
    """The state of one run_plan call: techniques applied once in `setup`, then windows until done."""

    def __init__(self, model: PreTrainedModel, plan: Plan, train: TokenizedData, eval: TokenizedData | None, *,
                 saved, epochs: int, max_steps: int | None, seed: int, output_dir: str | None,
                 checkpoint_every: int | None, fallback: Callable[[Plan], Plan | None]) -> None:
        self.model, self.input_plan, self.train_data, self.eval_data = model, plan, train, eval
        self.resume_path, self.plan, self.state = saved or (None, plan, ckpt.TrainerState(batch_knobs=plan.knobs))
        self.epochs, self.max_steps, self.seed = epochs, max_steps, seed
        self.output_dir, self.checkpoint_every, self.fallback = output_dir, checkpoint_every, fallback
        self.lengths = train.lengths
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.was_training = model.training
        self.started = time.perf_counter()
        self.last_checkpoint: Path | None = None

    def setup(self, *, lr: float, weight_decay: float, max_grad_norm: float | None,
              pad_token_id: int | None) -> None:
        knobs, device_type = self.plan.knobs, run_device(self.plan).type
        precision = amp.resolve(knobs.precision, device_type)  # bf16 on an old card runs as fp16
        accelerator = make_accelerator(amp.accelerate_mixed_precision(precision), cpu=device_type == "cpu")
        if accelerator.num_processes > 1:
            raise ExecutorInputError("multi-process training is not supported yet: launch a single process")
        freeze.apply(self.model, knobs)
        checkpointing.apply(self.model, knobs.checkpoint_layers)
        self.model.to(accelerator.device).train()
        try:
            optimizer = optim.build_optimizer(self.model, knobs, lr=lr, weight_decay=weight_decay)
        except (optim.OptimizerUnavailableError, optim.NoTrainableParametersError) as error:
            raise ExecutorInputError(str(error)) from None
        scaler = accelerator.scaler or amp.grad_scaler(precision, device_type)
        self.ctx = StepContext(self.model, optimizer, scaler, precision, accelerator.device, self.plan.task,
                               max_grad_norm)
        if pad_token_id is None:
            pad_token_id = getattr(self.model.config, "pad_token_id", None) or 0
        self.collator = PaddingCollator(pad_token_id, knobs.pad_to_multiple_of, task=self.plan.task)
        self.sampler = BucketBatchSampler(self.lengths, self.state.batch_knobs, seed=self.seed)
        try:
            self.sampler.load_state_dict(self.state.sampler or self.sampler.state_dict())
        except BucketingError as error:
            raise ExecutorInputError(f"the checkpoint does not fit this data or seed: {error}") from None
        self.state.sampler = self.sampler.state_dict()
        set_seed(self.seed)
        if self.resume_path is not None:
            ckpt.load_tensors(self.resume_path, model=self.model, optimizer=optimizer, scaler=scaler)

    # ---- the loop ----------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self.state.sampler["epoch"]

    @property
    def finished(self) -> bool:
        return self.max_steps is not None and self.state.step >= self.max_steps

    def epoch_windows(self, epoch: int) -> list[list[list[int]]]:
        """The epoch's batches (by the knobs the run started with) grouped into accumulation windows."""
        batches = self.sampler.epoch_batches(epoch)
        windows, start = [], 0
        for size in window_sizes(len(batches), self.state.batch_knobs.accumulation_steps):
            windows.append(batches[start:start + size])
            start += size
        return windows

    def train(self, meter: PeakMemoryMeter | None, bar: TrainingProgress) -> None:
        self.meter, self.peak, self.bar = meter, _SteadyPeak(meter), bar
        while self.epoch < self.epochs and not self.finished:
            windows = self.epoch_windows(self.epoch)
            for window, end in zip(windows, running_sum(map(len, windows))):
                if end <= self.state.sampler["position"]:
                    continue  # trained before the run was resumed
                if self.finished:
                    break
                self.train_window(window)
                self.state.sampler = self.sampler.state_dict(consumed=end)
                self.after_step()
            if self.state.sampler["position"] < len(self.sampler):
                break  # stopped by max_steps inside the epoch
            self.end_epoch()
        if self.output_dir is not None:
            self.save()

    def train_window(self, window: list[list[int]]) -> None:
        """One optimizer step over `window`; out of memory falls back and re-runs the same examples."""
        start = time.perf_counter()
        while True:
            pieces = split_window(window, self.lengths, self.plan.knobs)
            batches = [self.collator([self.train_data.example(i) for i in piece]) for piece in pieces]
            try:
                loss = accumulate(self.ctx, batches)
                break
            except Exception as error:  # only out-of-memory is handled; the traceback dies with the block
                if not is_out_of_memory(error):
                    raise
                message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
            del batches
            self.fall_back(message)
        applied = optimizer_step(self.ctx)
        loss_value, seconds = float(loss), time.perf_counter() - start  # float() waits for the device
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        samples = sum(len(b["input_ids"]) for b in batches)
        s = self.state
        s.step += 1
        s.real_tokens += real
        s.computed_tokens += sum(b["input_ids"].numel() for b in batches)
        s.samples += samples
        s.train_seconds += seconds
        s.history.append(StepRecord(step=s.step, epoch=self.epoch, loss=loss_value,
                                    lr=self.ctx.optimizer.param_groups[0]["lr"],
                                    tokens_per_second=real / max(seconds, 1e-9), samples=samples,
                                    seconds=seconds, skipped=not applied))

    def after_step(self) -> None:
        self.peak.after_step()
        record = self.state.history[-1]
        self.bar.update(record.step, loss=record.loss, tokens_per_second=record.tokens_per_second,
                        peak_bytes=self.meter.peak_bytes if self.meter else None)
        if self.checkpoint_every and self.state.step % self.checkpoint_every == 0:
            self.save()

    def end_epoch(self) -> None:
        if self.eval_data is not None and all(r.epoch != self.epoch for r in self.state.eval):
            self.peak.bank()
            loss, accuracy, samples = evaluate(self.ctx, self.eval_batches())
            self.peak.restart()
            self.state.eval.append(EvalRecord(epoch=self.epoch, step=self.state.step, loss=loss,
                                              accuracy=accuracy, samples=samples))
        self.sampler.set_epoch(self.epoch + 1)
        self.state.sampler = self.sampler.state_dict()

    def eval_batches(self):
        data = self.eval_data
        for indices in sorted_eval_batches(data.lengths, self.plan.knobs.micro_batch_size):
            yield self.collator([data.example(i) for i in indices])

    def fall_back(self, message: str) -> None:
        """Drop the partial window (weights change only at steps) and move to the fallback's knobs."""
        self.ctx.optimizer.zero_grad(set_to_none=True)
        free_memory(self.ctx.device)
        old = self.plan.knobs
        new = self.fallback(self.plan)
        if new is None or new.knobs == old:
            raise TrainingOutOfMemoryError(
                f"out of memory after {self.state.step} steps with micro-batch {old.micro_batch_size} and "
                f"{len(old.checkpoint_layers)} checkpointed layers, and no smaller plan is left: freeze more "
                f"layers, use 8-bit optimizer states, shorten max_length or raise the budget ({message})")
        check_changeable(old, new.knobs)
        checkpointing.apply(self.model, new.knobs.checkpoint_layers)
        self.collator.pad_to_multiple_of = new.knobs.pad_to_multiple_of
        summary = describe_change(old, new.knobs)
        self.state.fallbacks.append(FallbackRecord(step=self.state.step, error=message, knobs=new.knobs,
                                                   summary=summary))
        self.bar.note(f"out of memory at step {self.state.step + 1}: {summary}")
        self.plan = new

    # ---- ends ----------------------------------------------------------------------------------------
    def save(self) -> None:
        self.last_checkpoint = ckpt.save_checkpoint(self.output_dir, model=self.model, optimizer=self.ctx.optimizer,
                                                    scaler=self.ctx.scaler, plan=self.plan, state=self.state)

    def restore_model(self) -> None:
        """Give the caller its model back: own forward on every layer, its requires_grad flags, its mode."""
        checkpointing.remove(self.model)
        for param, flag in self.flags:
            param.requires_grad_(flag)
        self.model.train(self.was_training)

    def result(self, meter: PeakMemoryMeter | None) -> TrainResult:
        s = self.state
        measured, reserved = self.peak.result()
        return TrainResult(
            plan=self.plan, measured_peak_bytes=measured,
            measured_reserved_bytes=reserved if meter is not None and meter.is_cuda else None,
            predicted_peak_bytes=self.input_plan.predicted.peak_bytes,
            predicted_allocated_bytes=self.input_plan.predicted.allocated_bytes,
            history=s.history, eval=s.eval,
            tokens_per_second=s.real_tokens / max(s.train_seconds, 1e-9),
            samples_per_second=s.samples / max(s.train_seconds, 1e-9),
            padding_efficiency=s.real_tokens / max(s.computed_tokens, 1),
            fallbacks=s.fallbacks, optimizer_steps=s.step, epochs_completed=min(self.epoch, self.epochs),
            seconds=time.perf_counter() - self.started,
            output_dir=str(self.last_checkpoint) if self.last_checkpoint else None)
