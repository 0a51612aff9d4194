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

A plan for several processes (`plan.cluster.processes`) runs under a launcher, one process per device: each
trains its share of every step (executor/distributed.py) through DDP or FSDP2 (techniques/sharding.py, applied
after freezing, adapters and checkpointing), measures its own peak, and checkpoints with the others
(dist_checkpoint.py); process 0 alone writes files and shows progress. At the end every process holds the
trained model, gathered whole. An out-of-memory error then stops the run: the processes cannot fall back apart.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate.utils import set_seed
from transformers import PreTrainedModel

from autofit.data import TokenizedData
from autofit.executor import checkpoint as ckpt
from autofit.executor import dist_checkpoint
from autofit.executor.distributed import World, check_plan, check_same_run, share_step, start
from autofit.executor.setup import set_up
from autofit.executor.fallback import (TrainingOutOfMemoryError, default_fallback, smaller_plan,
                                       describe_change, free_memory, is_out_of_memory)
from autofit.executor.output_dir import OutputDirClaim, claim_output_dir
from autofit.executor.interrupt import GracefulInterrupt, TrainingDivergedError, TrainingInterruptedError
from autofit.executor.loop import (CollatedPieces, NonFiniteGradientError, StepContext, accumulate, evaluate,
                                   optimizer_step, unit_weights, weights_finite)
from autofit.executor.progress import TrainingProgress
from autofit.executor.resume import data_fingerprint, resume_noting, run_fingerprint
from autofit.executor.result import EvalRecord, FallbackRecord, StepRecord, TrainResult, summarize
from autofit.executor.validate import check_inputs, run_device, short_data_notes
from autofit.intmath import ceil_div
from autofit.knobs import Knobs, Precision
from autofit.measure import PeakMemoryMeter, SteadyStatePeak
from autofit.plan import MemoryBreakdown, Plan
from autofit.techniques import checkpointing, lora, sharding
from autofit.techniques.accumulation import (MicroBatchShape, StepSampler, bucket_uppers, eval_micro_batches,
                                             run_shapes, steps_per_epoch)
from autofit.techniques.loss_weighting import count_units
from autofit.techniques.optimizer import default_learning_rate
from autofit.techniques.padding import PaddingCollator
from autofit.workload import TOKEN_LEVEL_TASKS

log = logging.getLogger("autofit")


def run_plan(model: PreTrainedModel, plan: Plan, train: TokenizedData, *, eval: TokenizedData | None = None,
             epochs: int = 1, max_steps: int | None = None, lr: float | None = None, weight_decay: float = 0.01,
             max_grad_norm: float | None = 1.0, seed: int = 0, output_dir: str | None = None,
             checkpoint_every: int | None = None, resume: bool = False, measure_memory: bool = True,
             quiet: bool = False, fallback: Callable[[Plan], Plan | None] | None = None,
             pad_token_id: int | None = None, drop_last: bool = False,
             eval_prediction: MemoryBreakdown | None = None,
             price_shapes: Callable[[Knobs, list[MicroBatchShape]], MemoryBreakdown] | None = None) -> TrainResult:
    """Train `model` on `train` with `plan` for `epochs`, or for `max_steps` optimizer steps (instead of
    epochs: as many as they take; evaluation at each epoch's end and at the run's).

    Bad input raises ExecutorInputError before anything changes. Out of memory moves to `fallback(plan)`
    (default: halve the micro-batch, then checkpoint all layers) and re-runs the step. With `output_dir`,
    checkpoints every `checkpoint_every` steps and at the end; `resume` continues from the newest one when
    there is one (a checkpoint of other data, plan or settings is refused). A loss or gradient that turns
    inf/NaN outside fp16 stops the run (TrainingDivergedError); Ctrl-C finishes the step, saves and raises
    TrainingInterruptedError. `eval_prediction` is the predicted peak of evaluation, compared with what
    evaluation measures; `price_shapes(knobs, shapes)` predicts the peak of the micro-batch shapes the run's
    steps will cut (the memory model's, asked before training): the prediction for this run beside the plan's
    bound. The model comes back trained, its requires_grad flags and forward restored; under
    LoRA it comes back with its base stored as planned and the trained adapters in it (`TrainResult.model`
    is peft's wrapper, to save or merge with techniques/lora.py). A plan for several processes runs under
    torchrun or accelerate launch (each process calls run_plan with the same model, data and settings); every
    process gets the trained model back, on the CPU under FSDP, and a TrainResult with each one's peak."""
    check_inputs(model, plan, train, eval, epochs=epochs, max_steps=max_steps, output_dir=output_dir,
                 checkpoint_every=checkpoint_every, resume=resume)
    check_plan(plan)
    if max_steps is not None:  # it bounds the run instead of epochs, as the HF Trainer's max_steps does
        epochs = ceil_div(max_steps, max(1, steps_per_epoch(len(train), plan.batch_size, drop_last)))
    world = start(plan, run_device(plan).type)  # every process checks that it is one of the plan's
    claim = OutputDirClaim(None)  # process 0 holds the directory; the others write nothing but shards
    if output_dir is not None:
        claim = world.first(lambda: claim_output_dir(output_dir, resume=resume), claim)
    with claim:
        notes = claim.notes
        data_print = data_fingerprint(train)
        lr = default_learning_rate(plan.knobs) if lr is None else lr
        run_print = run_fingerprint(plan, model, seed=seed, lr=lr, weight_decay=weight_decay,
                                    max_grad_norm=max_grad_norm, drop_last=drop_last)
        check_same_run(world, data_print, run_print, epochs, max_steps)
        saved = resume_noting(output_dir, data_print, run_print, epochs, max_steps, notes,
                              steps_per_epoch(len(train), plan.batch_size, drop_last)) if resume else None
        state = saved[2] if saved else ckpt.TrainerState(data_fingerprint=data_print, run_fingerprint=run_print)
        run = _Run(model, saved[1] if saved else plan, train, eval, state=state, epochs=epochs, max_steps=max_steps,
                   seed=seed, drop_last=drop_last, output_dir=output_dir, checkpoint_every=checkpoint_every,
                   fallback=fallback or default_fallback, world=world)
        warned = short_data_notes(len(train), run.plan.batch_size, drop_last)  # the batch promise not kept
        # the caller's parameters, weakly: set-up may replace some (4-bit layers, shards); any still alive when
        # the meter starts is held by something and counts, though the model no longer has it
        originals = [weakref.ref(p) for p in model.parameters()]
        try:
            run.build(lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm, pad_token_id=pad_token_id,
                      resume_from=saved[0] if saved else None)
            run_prediction = run.predicted(price_shapes) if measure_memory else None
            meter = PeakMemoryMeter(run.ctx.device, track=[run.wrapped, run.ctx.optimizer, *_alive(originals)]) \
                if measure_memory else None
            total = epochs * len(run.sampler) if max_steps is None else min(epochs * len(run.sampler), max_steps)
            with meter or nullcontext(), TrainingProgress(total, quiet=quiet or not world.main, completed=state.step) \
                    as bar, GracefulInterrupt() as interrupt:
                for line in notes if world.main else ():
                    log.info(line)
                for line in warned if world.main else ():
                    log.warning(line)
                run.train(meter, bar, interrupt)
        finally:
            run.restore_model()  # the meter is closed: gathering FSDP's weights is no part of the training's peak
        run.save_adapter()
        return run.result(meter, input_plan=plan, eval_prediction=eval_prediction, run_prediction=run_prediction)


class _Run:
    """One run_plan call: the techniques applied once in `build`, then steps until done. Everything a
    resume needs lives in `state` (checkpointed); the rest is rebuilt from the plan."""

    def __init__(self, model: PreTrainedModel, plan: Plan, train: TokenizedData, eval: TokenizedData | None, *,
                 state: ckpt.TrainerState, epochs: int, max_steps: int | None, seed: int, drop_last: bool,
                 output_dir: str | None, checkpoint_every: int | None,
                 fallback: Callable[[Plan], Plan | None], world: World) -> None:
        self.model, self.plan, self.train_data, self.eval_data, self.state = model, plan, train, eval, state
        self.world = world
        self.epochs, self.max_steps, self.seed = epochs, max_steps, seed
        self.output_dir, self.checkpoint_every, self.fallback = output_dir, checkpoint_every, fallback
        self.lengths = train.lengths
        self.sampler = StepSampler(len(train), plan.batch_size, seed=seed, drop_last=drop_last)
        self.uppers, self.exact_buckets = bucket_uppers(self.lengths, plan.knobs)
        self.lora = plan.knobs.adapter == "lora"
        # the caller's requires_grad flags, to give back; not under LoRA (peft's frozen base stays frozen), where
        # holding the parameters would keep a 4-bit base's fp32 originals alive through the whole run
        self.flags = [] if self.lora else [(p, p.requires_grad) for p in model.parameters()]
        self.was_training = model.training
        self.started = time.perf_counter()
        self.last_checkpoint: Path | None = None
        self.ctx: StepContext | None = None
        self.trained: torch.nn.Module = model  # what trains, and what runs forward (setup.Setup)
        self.wrapped: torch.nn.Module = model
        self.unit_counts: dict[int, int] = {}
        self.stopped_together = False
        """All processes finished the same step and stopped (the end, or Ctrl-C): FSDP's weights can be gathered."""
        self.adapter_dir: Path | None = None
        self.collator: PaddingCollator | None = None
        self.meter: PeakMemoryMeter | None = None
        self.bar: TrainingProgress | None = None
        self.peak = SteadyStatePeak(None)

    def build(self, *, resume_from: Path | None, **settings) -> None:
        """Apply the techniques and build the optimizer, scaler and collator (setup.py); restore a checkpoint."""
        made = set_up(self.model, self.plan, self.world, seed=self.seed, **settings)
        self.trained, self.wrapped, self.ctx, self.collator = made.trained, made.wrapped, made.ctx, made.collator
        set_seed(self.seed + self.world.rank)  # each process draws its own dropout masks
        tensors = dict(model=self.trained, optimizer=self.ctx.optimizer, scaler=self.ctx.scaler)
        if resume_from is not None and self.world.distributed:
            dist_checkpoint.load(self.world, resume_from, wrapped=self.wrapped, lora=self.lora, **tensors)
        elif resume_from is not None:
            ckpt.load_tensors(resume_from, trainable_only=self.lora, **tensors)

    def predicted(self, price_shapes: Callable[[Knobs, list[MicroBatchShape]], MemoryBreakdown] | None
                  ) -> MemoryBreakdown | None:
        """`price_shapes` of the micro-batches the steps this call will train are cut into, but its first
        (the measured peak starts after it: no optimizer state before), known before training as the steps
        follow the seed. One process only: several deal their steps out."""
        if price_shapes is None or self.world.distributed:
            return None
        s, steps = self.state, []
        for epoch in range(s.epoch, self.epochs):
            steps += self.sampler.epoch_steps(epoch)[s.position if epoch == s.epoch else 0:]
        if self.max_steps is not None:
            steps = steps[:max(self.max_steps - s.step, 0)]
        knobs = self.plan.knobs  # a resumed run's plan in force
        return price_shapes(knobs, run_shapes(steps[1:] or steps, self.lengths, knobs)) if steps else None

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
                self.evaluate()  # max_steps reached inside the epoch: the run's end is evaluated too
                break
            self.end_epoch()
        if self.output_dir is not None:
            self.save()
        self.stopped_together = True

    @property
    def finished(self) -> bool:
        return self.max_steps is not None and self.state.step >= self.max_steps

    def train_step(self, step: list[int]) -> None:
        """One optimizer step over the examples `step`."""
        started = time.perf_counter()
        batches, padding, loss = self.forward_backward(step)
        real = sum(tokens for tokens, _ in batches.tokens[:len(batches) - padding])
        computed = sum(tokens for _, tokens in batches.tokens)
        loss_value, real, computed = self.world.sum(float(loss), real, computed)  # float() waits for the device
        if not math.isfinite(loss_value) and self.ctx.precision is not Precision.fp16:
            self.ctx.optimizer.zero_grad(set_to_none=True)
            raise self.diverged(f"the loss is {loss_value}")
        try:
            applied = optimizer_step(self.ctx)
        except NonFiniteGradientError as error:
            raise self.diverged(str(error)) from None
        if self.world.any(not weights_finite(self.ctx.trainable)):
            raise self.diverged("the update made the weights inf or NaN", updated=True)
        self.record_step(step, len(batches), int(real), int(computed), loss_value, time.perf_counter() - started,
                         skipped=not applied)

    def record_step(self, step: list[int], micro_batches: int, real: int, computed: int, loss: float, seconds: float,
                    skipped: bool) -> None:
        """Count a finished step (real and computed tokens of all processes) in the run state and history."""
        s = self.state
        s.step += 1
        s.real_tokens += real
        s.computed_tokens += computed
        s.samples += len(step)
        s.train_seconds += seconds
        s.history.append(StepRecord(step=s.step, epoch=s.epoch, loss=loss,
                                    lr=self.ctx.optimizer.param_groups[0]["lr"],
                                    tokens_per_second=real / max(seconds, 1e-9), samples=len(step),
                                    micro_batches=micro_batches, seconds=seconds, skipped=skipped))

    def forward_backward(self, step: list[int]):
        """(this process's micro-batches of the step, how many of them at the end are zero-weight passes, the
        step's loss); out of memory falls back and cuts the same examples again."""
        while True:
            share = share_step(step, self.lengths, self.units, self.plan.knobs, self.uppers, self.exact_buckets,
                               self.world)
            batches = CollatedPieces(share.pieces, self.collate)
            weights = share.weights if share.weights is not None else unit_weights(share.pieces, self.units)
            try:
                return batches, share.padding, accumulate(self.ctx, batches, weights)
            except Exception as error:  # only out-of-memory is handled; the traceback dies with the block
                if not is_out_of_memory(error):
                    raise
                message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
            del batches
            self.fall_back(message)

    def collate(self, indices: Sequence[int]) -> dict:
        """One micro-batch of training examples, padded."""
        return self.collator([self.train_data.example(i) for i in indices])

    def units(self, index: int) -> int:
        """Units (samples, or label tokens) of one training example: what its loss averages over."""
        if self.plan.task not in TOKEN_LEVEL_TASKS:
            return 1  # one sample: no need to collate it to count
        if index not in self.unit_counts:
            self.unit_counts[index] = count_units(self.collate([index]), self.plan.task)
        return self.unit_counts[index]

    def after_step(self, interrupt: GracefulInterrupt) -> None:
        self.peak.after_step()
        record = self.state.history[-1]
        # the run's rate so far, as the summary gives it at the end (one short step would swing the last step's)
        self.bar.update(record.step, loss=record.loss,
                        tokens_per_second=self.state.real_tokens / max(self.state.train_seconds, 1e-9),
                        peak_bytes=self.meter.peak_bytes if self.meter else None)
        if self.world.any(interrupt.requested):  # every process stops after the same step
            self.stopped_together = True
            where = f"; the checkpoint is {self.save()}, run again with resume (--resume) to continue" \
                if self.output_dir is not None else " (no output_dir: nothing was saved)"
            raise TrainingInterruptedError(f"interrupted after step {self.state.step}{where}")
        if self.checkpoint_every and self.state.step % self.checkpoint_every == 0:
            self.save()

    def end_epoch(self) -> None:
        self.evaluate()
        self.state.epoch, self.state.position = self.state.epoch + 1, 0

    def evaluate(self) -> None:
        """Evaluate after the current step, once: a resumed run that had evaluated there does not again."""
        s = self.state
        if self.eval_data is not None and all(r.step != s.step for r in s.eval):
            loss, accuracy, samples = evaluate(self.ctx, self.eval_batches())
            s.eval.append(EvalRecord(epoch=s.epoch, step=s.step, loss=loss, accuracy=accuracy, samples=samples))

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
        if self.world.distributed:
            raise TrainingOutOfMemoryError(f"out of memory at step {self.state.step + 1} on process {self.world.rank}"
                                           f" of {self.world.size}: plan again with a lower budget ({message})")
        new = smaller_plan(self.plan, self.fallback, step=self.state.step, message=message)
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
        tensors = dict(model=self.trained, optimizer=self.ctx.optimizer, scaler=self.ctx.scaler, plan=self.plan,
                       state=self.state)
        if self.world.distributed:
            self.last_checkpoint = dist_checkpoint.save(self.world, self.output_dir, wrapped=self.wrapped,
                                                        lora=self.lora, **tensors)
        else:
            self.last_checkpoint = ckpt.save_checkpoint(self.output_dir, trainable_only=self.lora, **tensors)
        return self.last_checkpoint

    def restore_model(self) -> None:
        """Give the caller its model back: own forward on every layer, its requires_grad flags (not under
        LoRA: the adapters it now holds train, its base stays frozen, as peft left them), its mode. Under
        FSDP its weights are the trained ones gathered whole when the processes stopped together (after an
        error they are those it came with: the trained shards are in the last checkpoint)."""
        checkpointing.remove(self.model)
        for param, flag in self.flags:
            param.requires_grad_(flag)
        self.model.train(self.was_training)
        if self.world.distributed:  # DDP's gradients are views of its buckets
            for param in self.trained.parameters():
                param.grad = None
        if self.stopped_together:
            sharding.gather_into(self.wrapped, self.trained)

    def save_adapter(self) -> None:
        """A LoRA run with an output_dir: process 0 saves the trained adapters beside the checkpoints."""
        if self.lora and self.output_dir is not None:
            self.adapter_dir = Path(self.output_dir) / "adapter"
            self.world.first(lambda: lora.save_adapter(self.trained, self.adapter_dir), None)

    def result(self, meter: PeakMemoryMeter | None, *, input_plan: Plan, eval_prediction: MemoryBreakdown | None,
               run_prediction: MemoryBreakdown | None) -> TrainResult:
        measured, reserved = self.peak.result()
        result = summarize(self.state, plan=self.plan, input_plan=input_plan, eval_prediction=eval_prediction,
                           run_prediction=run_prediction,
                           peaks=self.world.gather((measured, reserved)), cuda=meter is not None and meter.is_cuda,
                           epochs=self.epochs, seconds=time.perf_counter() - self.started,
                           output_dir=self.last_checkpoint, adapter_dir=self.adapter_dir, rank=self.world.rank)
        result._model = self.trained
        return result


def _alive(refs: list[weakref.ref]) -> list[torch.Tensor]:
    return [tensor for tensor in (ref() for ref in refs) if tensor is not None]
