"""Measure the target GPU itself: the calibration's terms (autofit/calibration.py) and, per architecture, the
bytes its kernels save beyond the fake twin's. The profiler's only code that needs the real card.

Every function takes the device type; on "cpu" (a dry run) the same code runs with the CUDA calls skipped:
peaks come from the live-tensor tracker (reserved = allocated), context and workspace are 0, and the saved
correction compares the CPU's real kernels with their own fake twin (so it must come out 0).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import BertConfig, PretrainedConfig

from autofit.budget import process_used_bytes
from autofit.calibration import AllocatorSample, Calibration, SavedCorrection, fit_correction, fit_reserve, stamp_now
from autofit.knobs import Knobs, Precision
from autofit.layers import find_layout
from autofit.measure import PeakMemoryMeter
from autofit.models import build_model
from autofit.profiler.measure_blocks import make_batch, measure_saved, prepared
from autofit.techniques.optimizer import build_optimizer
from autofit.techniques.precision import autocast_dtype


@dataclass(frozen=True)
class CalibrationRun:
    """A few AdamW steps of a small BERT: one allocator sample."""

    hidden: int
    layers: int
    batch: int
    seq: int
    precision: str = "fp32"

    @property
    def label(self) -> str:
        return f"bert h{self.hidden} x{self.layers}, batch {self.batch} x {self.seq}, {self.precision}"


CUDA_RUNS = tuple(CalibrationRun(h, layers, b, s, p) for h, layers in ((256, 4), (768, 6))
                  for b, s in ((4, 128), (16, 256), (32, 512)) for p in ("fp32", "bf16"))
"""From ~10 MB to a few GB allocated: the reserve's fixed part shows at the small end, its fraction at the
large one; both precisions, as autocast's casts allocate differently sized blocks."""
DRY_RUNS = (CalibrationRun(32, 2, 2, 32), CalibrationRun(32, 2, 4, 64), CalibrationRun(64, 2, 4, 64, "bf16"))
"""The dry run's: the same code on tiny shapes, seconds on a CPU."""
STEPS = 3
"""Optimizer steps per run; the first (which creates the optimizer state) is not measured."""
CORRECTION_SHAPES = ((2, 128), (2, 256), (4, 256), (4, 128))
"""Where one layer's real saved bytes are compared with the twin's: small, and enough for const + per token +
per token x seq (attention that keeps its probabilities against one that keeps a logsumexp), with one to
spare. Equal-length batches: a real model reads its all-ones mask and skips it, so the twin is let read it."""


def software_stack(device_type: str) -> dict[str, str | None]:
    """The card and the software a calibration holds for: another of either measures again."""
    cuda = device_type == "cuda"
    return {"hardware": torch.cuda.get_device_name() if cuda else "cpu",
            "torch_version": torch.__version__.split("+")[0],
            "cuda_version": torch.version.cuda if cuda else None,
            "allocator_config": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}


def measure_calibration(device_type: str = "cuda", *, runs: tuple[CalibrationRun, ...] | None = None,
                        log: Callable[[str], None] = lambda line: None) -> Calibration:
    """Measure context, workspace and reserve on the visible card (`device_type` "cpu": the dry run)."""
    cuda = device_type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("calibration needs a CUDA device, and none is visible")
    runs = runs if runs is not None else (CUDA_RUNS if cuda else DRY_RUNS)
    workspace = workspace_bytes(device_type)
    samples = []
    for run in runs:
        if run.precision == "bf16" and cuda and not torch.cuda.is_bf16_supported(including_emulation=False):
            continue
        samples.append(allocator_sample(run, device_type))
        log(f"{run.label}: allocated {samples[-1].allocated / 2**20:.1f} MiB, "
            f"reserved {samples[-1].reserved / 2**20:.1f} MiB")
    fraction, fixed = fit_reserve(samples)
    context, source = context_bytes(device_type)
    total = torch.cuda.mem_get_info()[1] if cuda else 0
    return Calibration(**software_stack(device_type), total_bytes=total, context_bytes=context,
                       context_source=source, workspace_bytes=workspace, reserve_fraction=fraction,
                       reserve_bytes=fixed, samples=samples, created=stamp_now())


def workspace_bytes(device_type: str) -> int:
    """Bytes the first fp32 and half matmuls, forward and backward, leave allocated once their tensors are
    gone: cuBLAS's and cuBLASLt's workspaces, one per handle (autograd's backward thread has its own)."""
    if device_type != "cuda":
        return 0
    _release()
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()  # a process that already multiplied holds them: start from none
    before = torch.cuda.memory_allocated()
    a = torch.randn(256, 256, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16):
        half = a @ a
    loss = (a @ a).sum() + half.float().sum()
    loss.backward()
    del a, half, loss
    torch.cuda.synchronize()
    return max(0, torch.cuda.memory_allocated() - before)


def context_bytes(device_type: str) -> tuple[int, str]:
    """(bytes this process holds on the card outside the allocator, how they were read)."""
    if device_type != "cuda":
        return 0, "none"
    torch.cuda.synchronize()
    reserved = torch.cuda.memory_reserved()
    own = process_used_bytes()
    if own is not None:
        return max(0, own - reserved), "process"
    free, total = torch.cuda.mem_get_info()
    return max(0, total - free - reserved), "device"


def allocator_sample(run: CalibrationRun, device_type: str) -> AllocatorSample:
    """Peaks of STEPS - 1 steady-state AdamW steps of `run`'s model, from a clean allocator."""
    _release()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=8192, hidden_size=run.hidden, num_hidden_layers=run.layers,
                        num_attention_heads=max(1, run.hidden // 64), intermediate_size=4 * run.hidden,
                        max_position_embeddings=max(512, run.seq))
    model = build_model(config, "classification", device=device_type)
    optimizer = build_optimizer(model, Knobs(), lr=1e-5)
    dtype = autocast_dtype(Precision(run.precision))
    with PeakMemoryMeter(device_type, track=[model, optimizer]) as meter:
        for step in range(STEPS):
            batch = make_batch(model.config, "classification", run.batch, run.seq, device_type)
            with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del batch, loss
            if step == 0:
                meter.reset_peak()
        sample = AllocatorSample(label=run.label, allocated=meter.peak_bytes, reserved=meter.peak_reserved_bytes)
    del model, optimizer
    _release()
    return sample


def saved_corrections(config: PretrainedConfig, task: str, attn: str | None, device_type: str,
                      precisions: tuple[str, ...]) -> dict[str, SavedCorrection]:
    """Per precision: the bytes one layer's real kernels on `device_type` save for backward beyond what the
    fake twin (CPU kernels) saved, at CORRECTION_SHAPES."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from autofit.profiler.profile import _fake_twin, _timed_model

    real = _layer_saved(_timed_model(None, config, task, attn, device_type), task, precisions, device_type)
    _release()
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    twin = _fake_twin(None, config, task, attn, fake)
    with fake:
        twins = _layer_saved(twin, task, precisions, "cpu")
    return {p: fit_correction([(b, s, r, t) for (b, s), r, t in zip(CORRECTION_SHAPES, real[p], twins[p])])
            for p in precisions}


def _layer_saved(model: nn.Module, task: str, precisions: tuple[str, ...], device_type: str) -> dict[str, list[float]]:
    """Bytes the measured layer of `model` saves for backward at each of CORRECTION_SHAPES, per precision."""
    with prepared(model, find_layout(model), task) as subject:
        return {p: [measure_saved(subject, p, shape, device_type, padded=False)["layer"]
                    for shape in CORRECTION_SHAPES] for p in precisions}


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
