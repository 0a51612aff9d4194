"""The profiler's shortcuts measure what the long way measures: a backward stopped once the windows read
have closed, held-out runs without a backward, the plain twin's padding verdict reused for adapted twins,
memoized fits."""

from dataclasses import replace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from autofit.layers import find_layout
from autofit.profiler.adapted import attach_adapters, materialized
from autofit.profiler.fit import _fit_shape, fit_shape
from autofit.profiler.measure_blocks import WINDOWS, _memory_run, measure_memory, measure_saved, prepared

from _tiny import tiny_model

pytest.importorskip("bitsandbytes")

SHAPE = (2, 40)


def _twin(model_type: str, task: str, adapted: tuple[str, str, str] | None):
    """A tiny model on the meta device, adapted as (targets, base kind, precision) or plain, made fake."""
    with torch.device("meta"):
        model = tiny_model(model_type, task)
    if adapted is not None:
        targets, base_kind, precision = adapted
        attach_adapters(model, targets=targets, base_kind=base_kind, precision=precision, task=task)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    return materialized(model, fake, "cpu"), fake


CASES = [("bert", "classification", None, "fp32"), ("bert", "classification", ("all-linear", "nf4", "bf16"), "bf16"),
         ("llama", "causal-lm", ("attention", "plain", "fp32"), "fp32"), ("llama", "causal-lm", None, "bf16")]


@pytest.mark.parametrize("model_type,task,adapted,precision", CASES)
def test_a_stopped_backward_reads_what_the_whole_step_measured(model_type, task, adapted, precision):
    model, fake = _twin(model_type, task, adapted)
    with fake, prepared(model, find_layout(model), task, whole=adapted is None) as subject:  # as the profiler
        layer = subject.layer_window
        reads = {f"bwd:{subject.window(k)}" for k in WINDOWS}
        for checkpointed, read in ((False, reads), (True, {f"bwd:{layer}"})):
            runs = [_memory_run(subject, precision, SHAPE, "cpu", count_flops=False, below_frozen=False, padded=True,
                                checkpointed=checkpointed, backward_reads=r) for r in (None, read)]
            whole, stopped = runs
            assert stopped.windows[f"bwd:{layer}"].peak > 0
            for name, window in whole.windows.items():
                if name.startswith("fwd:") or name in read:
                    assert replace(stopped.windows[name], seconds=0) == replace(window, seconds=0), name
            assert stopped.saved.by_phase == whole.saved.by_phase
            assert stopped.batch_unsaved == whole.batch_unsaved
        # held-out runs: the saved bytes are all counted before any backward
        assert measure_saved(subject, precision, SHAPE, "cpu") == measure_memory(subject, precision, SHAPE, "cpu").saved


def test_the_adapted_full_run_skips_layer_0s_backward_and_the_plain_one_does_not():
    for adapted, skipped in ((("all-linear", "plain", "fp32"), True), (None, False)):
        model, fake = _twin("bert", "classification", adapted)
        with fake, prepared(model, find_layout(model), "classification", whole=adapted is None) as subject:
            run = _memory_run(subject, "fp32", SHAPE, "cpu", count_flops=False, below_frozen=False, padded=True,
                              backward_reads={f"bwd:{subject.window(k)}" for k in WINDOWS})
        assert ("bwd:layer0" not in run.windows) == skipped  # embeddings trainable: their backward is read


def _padding_changes_bytes(subject, precision: str) -> bool:
    padded, unpadded = (measure_memory(subject, precision, SHAPE, "cpu", padded=p).model_dump(exclude={"flops"})
                        for p in (True, False))
    return padded != unpadded


@pytest.mark.parametrize("model_type,task,expected", [("bert", "classification", True),
                                                      ("deberta-v2", "classification", False)])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_adapted_twins_share_the_plain_twins_padding_verdict(model_type, task, expected, precision):
    verdicts = []
    for adapted in (None, ("attention", "plain", precision), ("all-linear", "nf4", precision)):
        model, fake = _twin(model_type, task, adapted)
        with fake, prepared(model, find_layout(model), task, whole=adapted is None) as subject:
            verdicts.append(_padding_changes_bytes(subject, precision))
    assert verdicts == [expected] * 3


def test_memoized_fits_equal_computed_ones_and_tell_signed_zeros_apart():
    shapes = [(b, s) for b in (2, 8) for s in (64, 256, 512)]
    values = [1000.0 + 3 * b * s + b * s * s for b, s in shapes]
    for envelope in (False, True):
        assert fit_shape(shapes, values, envelope=envelope) == _fit_shape(shapes, values, ("const", "per_batch",
            "per_token", "per_token_seq", "per_seq", "per_seq_sq"), envelope=envelope)
    zeros = fit_shape(shapes, [0.0] * 6, envelope=True)
    negative_zeros = fit_shape(shapes, [-0.0] * 6, envelope=True)
    assert [str(v) for _, _, v in negative_zeros.measured] == ["-0.0"] * 6
    assert [str(v) for _, _, v in zeros.measured] == ["0.0"] * 6
