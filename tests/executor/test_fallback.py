"""Out-of-memory fallback inside run_plan: an injected OOM moves to smaller knobs, keeps the effective
batch and every finished step, and a run with nothing smaller left fails with one clear error."""

from __future__ import annotations

import pytest
import torch

from autofit.executor import FallbackError, TrainingOutOfMemoryError, default_fallback, run_plan
from autofit.knobs import Precision
from autofit.techniques import checkpointing

LR = 3e-3


class FaultyForward:
    """Replaces `model.forward`: raises `error` (at most `times` times) on forward calls numbered
    `at_call` or later whose micro-batch holds more than `max_ok` sequences, or while `when()` holds."""

    def __init__(self, model, error: BaseException, *, at_call: int = 1, max_ok: int = 0, times: int = 1,
                 when=None) -> None:
        self.model, self.inner = model, model.forward
        self.error, self.at_call, self.max_ok, self.times = error, at_call, max_ok, times
        self.when = when or (lambda: True)
        self.calls, self.fired, self.sizes = 0, [], []
        model.forward = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        size = len(kwargs["input_ids"])
        if len(self.fired) < self.times and self.calls >= self.at_call and size > self.max_ok and self.when():
            self.fired.append(self.calls)
            raise self.error
        self.sizes.append(size)
        return self.inner(*args, **kwargs)


def oom_errors():
    return [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 15.77 GiB total capacity)"),
            RuntimeError("[enforce fail at alloc_cpu.cpp:83] DefaultCPUAllocator: can't allocate memory: "
                         "you tried to allocate 1 bytes. Error code 12 (Cannot allocate memory) out of memory")]


def train(tiny, data, plan_for, *, fault=None, n=16, epochs=2, model_type="bert", task="classification", **knobs):
    model, train_data = tiny(model_type, task), data(n, task=task)
    plan = plan_for(model, task, train_data, **knobs)
    faulty = FaultyForward(model, **fault) if fault else None
    result = run_plan(model, plan, train_data, epochs=epochs, lr=LR, quiet=True, measure_memory=False)
    return model, plan, result, faulty


@pytest.mark.parametrize("error", oom_errors(), ids=["OutOfMemoryError", "RuntimeError", "cpu-alloc"])
def test_oom_halves_the_micro_batch_and_keeps_the_effective_batch(tiny, data, plan_for, error):
    knobs = dict(batch_size=8, micro_batch_size=4)  # 16 examples: 2 steps of 2 x 4 per epoch
    ref_model, _, ref, _ = train(tiny, data, plan_for, **knobs)
    # Call 4 is the second micro-batch of step 2: the first one has already run its backward.
    model, plan, result, faulty = train(tiny, data, plan_for, fault=dict(error=error, at_call=4, max_ok=2), **knobs)

    assert faulty.fired == [4]
    fallback, = result.fallbacks
    assert fallback.step == 1  # one step had finished
    assert error.args[0].splitlines()[0] in fallback.error and type(error).__name__ in fallback.error
    assert fallback.knobs.micro_batch_size == 2
    assert result.plan.batch_size == plan.batch_size == 8
    assert fallback.summary == "micro_batch_size 4 -> 2"
    assert result.plan.knobs == fallback.knobs and result.plan != plan
    assert result.predicted_peak_bytes == plan.predicted.peak_bytes  # the input plan's prediction

    # Same steps, same samples per step, nothing lost or repeated.
    assert result.optimizer_steps == ref.optimizer_steps == 4
    assert [r.step for r in result.history] == [1, 2, 3, 4]
    assert [r.samples for r in result.history] == [r.samples for r in ref.history] == [8] * 4
    assert [r.micro_batches for r in result.history] == [2, 4, 4, 4]
    assert faulty.sizes[:3] == [4, 4, 4] and set(faulty.sizes[3:]) == {2}
    assert len(faulty.sizes) == 3 + 4 * 3  # the failed step is re-run whole, in 4 micro-batches
    assert result.history[0].loss == ref.history[0].loss  # the step before the fault is untouched
    # The same examples, re-split: the same gradients up to rounding (a leftover gradient of the failed
    # micro-batch, or other examples, would move the weights far more).
    for r, s in zip(result.history, ref.history):
        assert r.loss == pytest.approx(s.loss, rel=1e-5)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)


def test_oom_at_micro_batch_one_checkpoints_the_trainable_layers(tiny, data, plan_for):
    knobs = dict(batch_size=4, micro_batch_size=1, freeze_embeddings=True, freeze_layers=1)
    ref_model, _, ref, _ = train(tiny, data, plan_for, n=8, **knobs)
    model = tiny()
    # Out of memory while no layer is checkpointed, from the 6th forward on.
    when = lambda: checkpointing.checkpointed_indices(model) == []  # noqa: E731
    train_data = data(8)
    plan = plan_for(model, data=train_data, **knobs)
    faulty = FaultyForward(model, RuntimeError("CUDA out of memory"), at_call=6, times=99, when=when)
    result = run_plan(model, plan, train_data, epochs=2, lr=LR, quiet=True, measure_memory=False)

    assert faulty.fired == [6]
    fallback, = result.fallbacks
    assert fallback.step == 1 and fallback.knobs.checkpoint_layers == (1,)  # only the trainable layer
    assert fallback.knobs.micro_batch_size == 1
    assert result.optimizer_steps == ref.optimizer_steps == 4
    assert [r.samples for r in result.history] == [4] * 4
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)
    assert checkpointing.checkpointed_indices(model) == []  # removed again at the end


def test_oom_with_nothing_smaller_left_is_one_clear_error(tiny, data, plan_for):
    model, train_data = tiny(), data(8)
    flags = [p.requires_grad for p in model.parameters()]
    plan = plan_for(model, data=train_data, micro_batch_size=2, freeze_embeddings=True)
    seen = []

    def spy(plan):
        seen.append(plan.knobs)
        return default_fallback(plan)

    FaultyForward(model, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB\nmore detail"),
                  times=99)
    with pytest.raises(TrainingOutOfMemoryError) as info:
        run_plan(model, plan, train_data, quiet=True, measure_memory=False, fallback=spy)
    message = str(info.value)
    assert "\n" not in message
    assert "no smaller plan is left" in message and "after 0 steps" in message
    assert "micro-batches of up to 1 and 2 checkpointed layers" in message
    assert "OutOfMemoryError: CUDA out of memory. Tried to allocate 9.00 GiB" in message
    # The ladder: micro-batch 2 -> 1, then checkpoint every layer, then give up.
    assert [(k.micro_batch_size, k.checkpoint_layers) for k in seen] == [(2, ()), (1, ()), (1, (0, 1))]
    # The model comes back as it was given.
    assert [p.requires_grad for p in model.parameters()] == flags
    assert checkpointing.checkpointed_indices(model) == []


def test_a_fallback_that_returns_the_same_knobs_gives_up(tiny, data, plan_for):
    model, train_data = tiny(), data(8)
    plan = plan_for(model, data=train_data, micro_batch_size=4)
    FaultyForward(model, RuntimeError("CUDA out of memory"), times=99)
    with pytest.raises(TrainingOutOfMemoryError, match="micro-batches of up to 4 and 0 checkpointed"):
        run_plan(model, plan, train_data, quiet=True, measure_memory=False, fallback=lambda p: p)
    with pytest.raises(TrainingOutOfMemoryError, match="no smaller plan"):
        run_plan(model, plan, train_data, quiet=True, measure_memory=False, fallback=lambda p: None)


def test_a_fallback_may_not_change_precision(tiny, data, plan_for):
    model, train_data = tiny(), data(8)
    plan = plan_for(model, data=train_data, micro_batch_size=4)
    FaultyForward(model, RuntimeError("CUDA out of memory"))

    def to_bf16(plan):
        return plan.model_copy(update=dict(knobs=plan.knobs.model_copy(update=dict(precision=Precision.bf16))))

    with pytest.raises(FallbackError, match="cannot change precision"):
        run_plan(model, plan, train_data, quiet=True, measure_memory=False, fallback=to_bf16)


def test_errors_other_than_oom_are_not_caught(tiny, data, plan_for):
    model, train_data = tiny(), data(8)
    plan = plan_for(model, data=train_data, micro_batch_size=4)
    called = []
    faulty = FaultyForward(model, RuntimeError("shape mismatch in an unrelated kernel"), at_call=2)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_plan(model, plan, train_data, quiet=True, measure_memory=False,
                 fallback=lambda p: called.append(p) or default_fallback(p))
    assert faulty.fired == [2] and called == []
    assert all(p.requires_grad for p in model.parameters())
