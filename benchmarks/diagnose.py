"""What really lives at the measured peak of a training step, next to the memory model's breakdown.

    python -m benchmarks.diagnose deberta-v2 freeze --seq 128 --micro-batch 8
    python -m benchmarks.diagnose --e2e qwen2 0.5        # a cell of benchmarks/accuracy_e2e.py

Runs one cell of benchmarks/accuracy.py (or of benchmarks/accuracy_e2e.py, with --e2e) through
autofit.executor.run_plan with the executor's meter replaced by one that also remembers, for every live storage,
where it was made: the phase (forward / backward / optimizer / eval), the innermost module running (embeddings,
layer i, head), the op, its shape and dtype. At the steady-state peak it prints the micro-batch running (shape,
with or without pad tokens), the live bytes by category — weights, grads, optimizer state, the batch, and
activations by the block that made them — against predict_peak's terms, and the biggest tensors.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
from collections import Counter
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from autofit import measure
from benchmarks import accuracy, accuracy_e2e
from benchmarks._common import quiet_libraries

MiB = 2**20


class _Where:
    """The innermost module currently running and the phase of the step."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.phase = "other"
        self.evaluating = False
        self.batch_shape: tuple | None = None
        """(sequences, padded length, whether it holds pad tokens) of the micro-batch running."""


WHERE = _Where()


class RecordingCounter(measure._LiveStorageCounter):
    """The executor's live-storage counter, which also keeps what made each storage and a snapshot at the peak."""

    def __init__(self, device_type: str) -> None:
        super().__init__(device_type)
        self.meta: dict[int, tuple] = {}
        self.snapshot: dict[int, tuple] = {}
        self.snapshot_phase = ""
        self.snapshot_batch_shape: tuple | None = None
        self.op = "?"
        self.recording = False

    def add(self, tensor: object) -> None:
        before = self.peak
        if isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided:
            try:
                key = tensor.untyped_storage()._cdata
            except (RuntimeError, NotImplementedError):
                key = None
            if key is not None and key not in self._sizes:
                where = WHERE.stack[-1] if WHERE.stack else "-"
                self.meta[key] = (WHERE.phase, where, self.op, tuple(tensor.shape), str(tensor.dtype).replace("torch.", ""))
        super().add(tensor)
        if self.recording and self.peak > before:
            self.snapshot = {k: (self._sizes[k], self.meta.get(k, ("pre", "-", "-", (), "?"))) for k in self._sizes}
            self.snapshot_phase = WHERE.phase
            self.snapshot_batch_shape = WHERE.batch_shape

    def _release(self, key: int) -> None:
        super()._release(key)
        self.meta.pop(key, None)


class RecordingTracker(measure._TensorTracker):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counter.op = str(func.overloadpacket.__name__)
        return super().__torch_dispatch__(func, types, args, kwargs)


class RecordingMeter(measure.PeakMemoryMeter):
    last: RecordingMeter | None = None

    def __init__(self, device, *, track=()) -> None:
        super().__init__(device, track=track)
        self._counter = RecordingCounter(self.device.type)
        RecordingMeter.last = self

    def __enter__(self):
        result = super().__enter__()
        self._mode.__exit__(None, None, None)
        self._mode = RecordingTracker(self._counter)
        self._mode.__enter__()
        return result

    def reset_peak(self) -> None:
        super().reset_peak()
        self._counter.recording = True  # after the first optimizer step: the steady state
        self._counter.snapshot = {}


def _label_modules(model: nn.Module) -> list:
    from autofit.layers import find_layout

    layout = find_layout(model)
    labels: dict[int, str] = {}
    for i, layer in enumerate(layout.layers):
        for m in layer.modules():
            labels[id(m)] = f"layer{i}"
    for emb in layout.embedding_modules:
        for m in emb.modules():
            labels.setdefault(id(m), "embeddings")
    handles = []
    for name, module in model.named_modules():
        label = labels.get(id(module), f"other:{name}" if name else "model")

        def pre(mod, args, label=label):
            WHERE.stack.append(label)

        def post(mod, args, out, label=label):
            if WHERE.stack:
                WHERE.stack.pop()

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    return handles


def record_run(model: nn.Module, plan, data, **run_kwargs) -> tuple[Any, dict[str, Any]]:
    """Train `model` with `plan` on `data` (autofit.executor.run_plan, `run_kwargs` passed on) under the
    recording meter; returns the TrainResult and what was live at the steady-state peak: bytes by category,
    the largest tensors, the phase, and the shape of the micro-batch running then."""
    from autofit.executor import run as executor_run

    handles = _label_modules(model)
    # phase markers: backward starts when the loss's graph runs, the optimizer at its step
    original_backward = torch.Tensor.backward

    def backward(self, *a, **k):
        WHERE.phase = "backward"
        try:
            return original_backward(self, *a, **k)
        finally:
            WHERE.phase = "between"

    original_accumulate = executor_run.accumulate
    original_evaluate = executor_run.evaluate

    def accumulate(ctx, step, *weights):
        ctx.optimizer.register_step_pre_hook(lambda *a: setattr(WHERE, "phase", "optimizer")) \
            if not getattr(ctx.optimizer, "_diag", False) else None
        ctx.optimizer._diag = True
        WHERE.phase = "forward"
        return original_accumulate(ctx, step, *weights)

    def evaluate(ctx, batches):
        WHERE.evaluating = True
        try:
            return original_evaluate(ctx, batches)
        finally:
            WHERE.evaluating = False

    def model_pre(mod, args, kwargs):
        WHERE.phase = "eval" if WHERE.evaluating else "forward"
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        pads = bool((mask.numpy() == 0).any()) if mask is not None else None  # numpy: no op for the tracker
        WHERE.batch_shape = (*ids.shape, "pads" if pads else "no pads") if ids is not None else None

    handles.append(model.register_forward_pre_hook(model_pre, with_kwargs=True))
    torch.Tensor.backward = backward
    executor_run.PeakMemoryMeter = RecordingMeter
    executor_run.accumulate = accumulate
    executor_run.evaluate = evaluate
    try:
        result = executor_run.run_plan(model, plan, data, quiet=True, **run_kwargs)
    finally:
        torch.Tensor.backward = original_backward
        executor_run.PeakMemoryMeter = measure.PeakMemoryMeter
        executor_run.accumulate = original_accumulate
        executor_run.evaluate = original_evaluate
        for h in handles:
            h.remove()
    counter = RecordingMeter.last._counter
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    by_category: Counter = Counter()
    tensors = []
    for key, (size, (phase, where, op, shape, dtype)) in counter.snapshot.items():
        if key in params:
            category = "weights"
        elif phase == "pre":
            category = "grads/optimizer state (alive before the step)"
        else:
            category = f"{phase}:{where}"
        by_category[category] += size
        tensors.append((size, category, op, shape, dtype))
    tensors.sort(reverse=True)
    return result, {"measured": result.measured_peak_bytes, "snapshot_total": sum(by_category.values()),
                    "snapshot_phase": counter.snapshot_phase, "peak_batch_shape": counter.snapshot_batch_shape,
                    "by_category": dict(by_category), "largest": tensors[:25]}


def diagnose(arch: str, knob_set: str, seq: int, micro: int, steps: int = 3) -> dict[str, Any]:
    """One cell of benchmarks/accuracy.py."""
    from autofit.api import make_workload, plan_from_profile
    from autofit.devices import get_device
    from autofit.memory import predict_peak
    from autofit.profiler import profile_model

    _, task, _ = accuracy.ARCHS[arch]
    profile = profile_model(accuracy.build_model(arch), task=task,
                            adapters=accuracy.KNOB_SETS[knob_set].get("adapter") == "lora")
    knobs = accuracy.make_knobs(knob_set, profile.num_layers, micro)
    batch = accuracy.step_batch(knob_set, micro)  # examples per optimizer step
    device = get_device("cpu")
    workload = make_workload(task, seq_len=seq, batch_size=batch, lengths=[seq] * (batch * steps))
    memory = predict_peak(profile, knobs, workload, device)
    plan = plan_from_profile(profile, workload, 1 << 30, device)
    plan = plan.model_copy(update={"knobs": knobs, "predicted": memory, "workload": workload})
    data = accuracy.make_data(task, seq, batch * steps)
    _, live = record_run(accuracy.build_model(arch), plan, data, max_steps=steps)
    return {"title": f"{arch} {knob_set} S={seq} mb={micro} step={batch}", "predicted": memory.model_dump(mode="json"),
            "predicted_allocated": memory.allocated_bytes, **live}


def diagnose_e2e(family: str, point: float) -> dict[str, Any]:
    """One cell of benchmarks/accuracy_e2e.py: the plan the balanced search finds at budget point `point`
    (between the smallest budget that fits, 0, and the naive peak, 1), trained for its full epoch
    with evaluation. Shows the training prediction of each bucket's largest micro-batch too."""
    import autofit
    from autofit.memory import predict_step_peak
    from autofit.profiler.cache import cached_profile
    from autofit.profiler.profile import PRECISIONS

    _, task, _ = accuracy_e2e.FAMILIES[family]
    train, evaluation = accuracy_e2e.datasets(family)
    model = accuracy_e2e.build_model(family)
    batch = accuracy_e2e.BATCH
    lo, hi, _ = accuracy_e2e.budget_range(model, task, train)
    budget = accuracy_e2e.budget_at(point, lo, hi)
    plan = autofit.plan(model, budget, data=train, batch_size=batch, device="cpu", task=task)
    profile = cached_profile(model, task=task, timing=PRECISIONS, adapters=plan.knobs.adapter != "none")
    buckets = [(b.micro_batch_size, b.upper_length, b.padded, b.grads_held,
                predict_step_peak(profile, plan.knobs, b.micro_batch_size, b.upper_length, plan.device, b.padded,
                                  b.grads_held).allocated_bytes) for b in plan.step.buckets]
    _, live = record_run(accuracy_e2e.build_model(family), plan, train, eval=evaluation, epochs=1)
    knobs = accuracy_e2e.knobs_summary(plan.knobs, plan.num_layers)
    return {"title": f"{family} p{point:g} budget {budget / MiB:.2f} MiB: {knobs}",
            "predicted": plan.predicted.model_dump(mode="json"), "predicted_allocated": plan.predicted.allocated_bytes,
            "buckets": buckets, **live}


def show(d: dict[str, Any]) -> None:
    p = d["predicted"]
    print(f"{d['title']}: measured {d['measured'] / MiB:.3f} MiB (snapshot {d['snapshot_total'] / MiB:.3f} at "
          f"{d['snapshot_phase']}, micro-batch {d['peak_batch_shape']}), predicted "
          f"{d['predicted_allocated'] / MiB:.3f} MiB at {p['peak_phase']} of {tuple(p['peak_shape'])}")
    for micro, upper, padded, held, predicted in d.get("buckets", []):
        print(f"    bucket up to {upper:4}: micro-batch {micro:3}, {'padded' if padded else 'no pads'}, "
              f"{'grads held' if held else 'no grads held'}: predicted {predicted / MiB:.3f} MiB")
    print("  predicted: " + ", ".join(f"{k} {p[k] / MiB:.3f}" for k in
                                      ("weights", "gradients", "optimizer_state", "activations", "temporaries")))
    print("  live at the measured peak, by (phase:block that made it):")
    for cat, size in sorted(d["by_category"].items(), key=lambda kv: -kv[1]):
        print(f"    {size / MiB:9.3f} MiB  {cat}")
    print("  largest live tensors:")
    for size, cat, op, shape, dtype in d["largest"]:
        print(f"    {size / MiB:9.3f} MiB  {cat:30} {op:28} {str(shape):22} {dtype}")




# ---- decomposition: fit error vs fake-tensor error vs the memory model's structure ------------------------

def patch_tracker_ignore_params() -> None:
    """What-if for the profiler bug this file found: autofit.profiler.tracker.LiveBytes counts a parameter's
    storage as a new live allocation the first time a view op (aten.t, detach, expand, slice) returns it, so every
    fp32 weight a block transposes is added to the transients. Seed the counter with the parameter and buffer
    storages (known, already paid for) so only storages made during the step count."""
    from autofit.profiler import measure_blocks

    original = measure_blocks.LiveBytes

    class ParamAwareLiveBytes(original):
        def __enter__(self):
            model = ParamAwareLiveBytes.model
            for t in [*model.parameters(), *model.buffers()]:
                s = t.untyped_storage()
                self._counter._sizes[id(s)] = s.nbytes()
                self._keep = getattr(self, "_keep", []) + [s]
            return super().__enter__()

    original_run = measure_blocks._memory_run

    def memory_run(subject, *args, **kwargs):
        ParamAwareLiveBytes.model = subject.model
        return original_run(subject, *args, **kwargs)

    measure_blocks.LiveBytes = ParamAwareLiveBytes
    measure_blocks._memory_run = memory_run


def oracle_profile(profile, model, shape: tuple[int, int], *, real: bool):
    """`profile` with every activation fit replaced by the value measured at exactly `shape` (a constant): on
    the profiler's fake-tensor twin (real=False) or on real tensors of the model itself (real=True)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from autofit.layers import find_layout
    from autofit.profiler.measure_blocks import measure_memory, prepared
    from autofit.profiler.profile import _fake_twin
    from autofit.profiler.schema import MEASURED_QUANTITIES, ShapeFit

    samples = {}
    if real:
        subject_model = copy.deepcopy(model)
        context = contextlib.nullcontext()
    else:
        fake = FakeTensorMode(allow_non_fake_inputs=True)
        subject_model = _fake_twin(model, model.config, profile.task, None, fake)
        context = fake
    with context, prepared(subject_model, find_layout(subject_model), profile.task) as subject:
        for precision in ("fp32", "bf16"):
            samples[precision] = measure_memory(subject, precision, shape, "cpu")
    samples["fp16"] = samples["bf16"]
    blocks = []
    for block in profile.blocks:
        acts = {p: block.activations[p].model_copy(update={
            q: ShapeFit(const=getattr(samples[p], q)[block.kind]) for q in MEASURED_QUANTITIES}) for p in block.activations}
        blocks.append(block.model_copy(update={"activations": acts}))
    return profile.model_copy(update={"blocks": blocks})


def decompose(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For measured cells of benchmarks/accuracy.py: the prediction with the fitted profile (autofit), with
    exact fake-tensor samples at the cell's shape (no fit), and with exact real-tensor samples (no fake).
    fit error = autofit - exact_fake; fake-tensor error = exact_fake - exact_real; model error = exact_real -
    measured."""
    from autofit.api import make_workload
    from autofit.devices import get_device
    from autofit.memory import predict_peak
    from autofit.profiler import profile_model

    device = get_device("cpu")
    out = []
    by_arch: dict[str, Any] = {}
    oracles: dict[tuple, Any] = {}
    for cell in cells:
        arch = cell["arch"]
        if arch not in by_arch:
            model = accuracy.build_model(arch)
            by_arch[arch] = (model, profile_model(model, task=accuracy.ARCHS[arch][1]))
        model, profile = by_arch[arch]
        knobs = accuracy.make_knobs(cell["knobs"], profile.num_layers, cell["micro_batch"])
        shape = (cell["micro_batch"], cell["seq"])
        for real in (False, True):
            if (arch, shape, real) not in oracles:
                oracles[(arch, shape, real)] = oracle_profile(profile, model, shape, real=real)
        batch = accuracy.step_batch(cell["knobs"], cell["micro_batch"])
        workload = make_workload(profile.task, seq_len=cell["seq"], batch_size=batch, lengths=[cell["seq"]] * batch)
        fitted = predict_peak(profile, knobs, workload, device)
        fake = predict_peak(oracles[(arch, shape, False)], knobs, workload, device)
        real = predict_peak(oracles[(arch, shape, True)], knobs, workload, device)
        m = cell["measured_bytes"]
        out.append({"arch": arch, "knobs": cell["knobs"], "seq": cell["seq"], "micro_batch": cell["micro_batch"],
                    "measured": m, "autofit": fitted.allocated_bytes, "exact_fake": fake.allocated_bytes,
                    "exact_real": real.allocated_bytes, "fit_error": (fitted.allocated_bytes - fake.allocated_bytes) / m,
                    "fake_error": (fake.allocated_bytes - real.allocated_bytes) / m,
                    "model_error": (real.allocated_bytes - m) / m, "total_error": (fitted.allocated_bytes - m) / m,
                    "real_breakdown": real.model_dump(mode="json")})
    return out


def show_decomposition(rows: list[dict[str, Any]]) -> str:
    from benchmarks._common import table

    pct = lambda x: f"{100 * x:+.1f}%"  # noqa: E731
    return table(["arch", "knobs", "seq", "mb", "total err", "= fit", "+ fake tensors", "+ memory model"],
                 [[r["arch"], r["knobs"], r["seq"], r["micro_batch"], pct(r["total_error"]), pct(r["fit_error"]),
                   pct(r["fake_error"]), pct(r["model_error"])] for r in rows])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("arch", nargs="?", choices=list(accuracy.ARCHS))
    parser.add_argument("knobs", nargs="?", choices=list(accuracy.KNOB_SETS))
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--patch-tracker", action="store_true",
                        help="profile with the tracker fix (parameters' storages not counted as new allocations)")
    parser.add_argument("--e2e", nargs=2, metavar=("FAMILY", "POINT"),
                        help="a cell of benchmarks/accuracy_e2e.py instead: the family and the budget point "
                             "(0 = the smallest budget that fits, 1 = the naive plan's peak)")
    parser.add_argument("--decompose", metavar="RESULTS_JSON",
                        help="split every cell's error of an accuracy result into fit / fake-tensor / memory-model parts")
    parser.add_argument("--below", type=float, metavar="ERROR",
                        help="with --decompose: only the cells (of `arch`, when given) whose error is below this, "
                             "e.g. -0.015")
    args = parser.parse_args()
    quiet_libraries()
    torch.set_num_threads(1)
    if args.patch_tracker:
        patch_tracker_ignore_params()
    if args.decompose:
        cells = [c for c in json.loads(open(args.decompose).read())["cells"]
                 if (args.arch is None or c["arch"] == args.arch) and (args.below is None or c["error"] < args.below)]
        rows = decompose(cells)
        print(show_decomposition(rows))
        name = "decomposition_" + __import__("pathlib").Path(args.decompose).stem + ("_tracker_fixed" if args.patch_tracker else "")
        name += (f"_{args.arch}" if args.arch else "") + ("_worst" if args.below is not None else "")
        from benchmarks._common import environment, write_result
        print(write_result(name, {"benchmark": "decomposition", **environment(), "source": args.decompose, "cells": rows}))
    elif args.e2e:
        show(diagnose_e2e(args.e2e[0], float(args.e2e[1])))
    else:
        show(diagnose(args.arch, args.knobs, args.seq, args.micro_batch))
