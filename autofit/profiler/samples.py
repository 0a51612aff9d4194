"""Memory samples of a prepared model at the profile's shapes, and the BlockActivations fitted to them: what
the plain and the adapted twins are measured with alike."""

from __future__ import annotations

from collections.abc import Collection

from torch import nn

from autofit.limits import max_sequence_length
from autofit.profiler.fit import fit_shape
from autofit.profiler.measure_blocks import Subject, measure_memory, measure_saved
from autofit.profiler.schema import MEASURED_QUANTITIES, BlockActivations, FitCheck

FIT_BATCHES, FIT_SEQS = (2, 8), (64, 256, 512)
"""The memory fits are made from these (batch, seq) shapes: fake tensors cost no compute, so they can be as
large as real training. Batch 1 is left out: models special-case it (masks), which would bend the fit."""
HELD_OUT_SHAPES = ((3, 96), (4, 384))
"""Shapes measured but not fitted: the Profile reports the fits' error there."""


def memory_samples(subject: Subject, device: str, precisions: tuple[str, ...] = ("fp32", "bf16"),
                   padding_matters: Collection[str] | None = None) -> tuple[dict, dict, dict]:
    """ShapeSamples at the fit and held-out shapes, per precision, of padded batches; and of batches
    without padding where the model treats those differently (skips its attention mask), else none.
    fp16 and bf16 autocast cast the same ops to a 2-byte type, so fp16 reuses bf16's bytes.
    `padding_matters`: the precisions at which padding may change anything, known from a twin of the same
    model (adapters change no mask code); None: probed at every precision."""
    limit = max_seq(subject.model)
    held_out_shapes = [(b, s) for b, s in HELD_OUT_SHAPES if s <= limit]
    seqs = [s for s in FIT_SEQS if s <= limit]
    if len(seqs) < 3:  # a model for short sequences: fit at a quarter, half and all of them
        seqs = [max(1, limit // 4), max(1, limit // 2), limit]
    shapes = [(b, s) for b in (1, *FIT_BATCHES) for s in seqs]
    samples, held_out, unpadded = {}, {}, {}
    for precision in precisions:
        samples[precision] = [measure_memory(subject, precision, shape, device, count_flops=precision == "fp32")
                              for shape in shapes]
        held_out[precision] = [(shape, measure_saved(subject, precision, shape, device)) for shape in held_out_shapes]
        if padding_matters is not None and precision not in padding_matters:
            continue
        # One probe at the largest shape decides whether padding changes anything for this model.
        probe = measure_memory(subject, precision, shapes[-1], device, padded=False)
        if probe.model_dump(exclude={"flops"}) != samples[precision][-1].model_dump(exclude={"flops"}):
            unpadded[precision] = [measure_memory(subject, precision, shape, device, padded=False)
                                   for shape in shapes[:-1]] + [probe]
    for found in (samples, held_out, unpadded):
        if "bf16" in found:
            found["fp16"] = found["bf16"]
    return samples, held_out, unpadded


def max_seq(model: nn.Module) -> int:
    return max_sequence_length(model.config) or 4096


def fit_precisions(samples: dict, unpadded: dict, kind: str) -> dict[str, BlockActivations]:
    """One block kind's fits per precision, with their unpadded fits where padding made a difference."""
    activations = {p: fit_activations(ss, kind) for p, ss in samples.items()}
    for p, ss in unpadded.items():
        activations[p] = activations[p].model_copy(update={"unpadded": fit_activations(ss, kind)})
    return activations


def fit_checks(kind: str, activations: dict[str, BlockActivations], held_out: dict,
                label: str = "{precision}") -> list[FitCheck]:
    """The `saved` fits against the held-out shapes (fp16 shares bf16's measurements: not checked twice)."""
    return [FitCheck(batch=b, seq=s, precision=label.format(precision=p), quantity=f"{kind}.saved",
                     predicted_bytes=activations[p].at(b).saved(b, s), measured_bytes=saved[kind])
            for p in held_out if p != "fp16" for (b, s), saved in held_out[p]]


def fit_activations(samples: list, kind: str) -> BlockActivations:
    """The fits at micro-batches > 1, with the batch-1 fits as `single`."""
    return _fit_one(kind, [x for x in samples if x.batch > 1]).model_copy(
        update={"single": _fit_one(kind, [x for x in samples if x.batch == 1])})


def _fit_one(kind: str, samples: list) -> BlockActivations:
    shapes = [(x.batch, x.seq) for x in samples]
    return BlockActivations(**{q: fit_shape(shapes, [getattr(x, q)[kind] for x in samples],
                                            envelope=q.endswith("transient")) for q in MEASURED_QUANTITIES})
