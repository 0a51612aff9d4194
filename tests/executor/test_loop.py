"""The training step: accumulation weights, optimizer step, evaluation."""

from __future__ import annotations

import pytest
import torch

from autofit.executor.loop import (CollatedPieces, NonFiniteGradientError, StepContext, accumulate, evaluate,
                                   optimizer_step, unit_weights)
from autofit.knobs import Knobs, Precision
from autofit.techniques.accumulation import bucket_uppers, cut_step
from autofit.techniques.loss_weighting import count_units
from autofit.techniques.padding import PaddingCollator


def context(model, task="classification", precision=Precision.fp32, max_grad_norm=None):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=precision is Precision.fp16)
    return StepContext(model, optimizer, scaler, precision, torch.device("cpu"), task, max_grad_norm)


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def step_grads(tiny_model, token_data, task: str, pieces: list[list[int]]):
    model = tiny_model("gpt2" if task == "causal-lm" else "bert", task)
    data = token_data(6, task=task, seed=3)
    collate = PaddingCollator(0, 8, task=task)
    loss = accumulate(context(model, task), [collate([data.example(i) for i in p]) for p in pieces])
    return float(loss), grads(model)


def test_uneven_micro_batches_give_the_full_batch_gradient(tiny, data):
    for task in ("classification", "causal-lm"):
        full_loss, full = step_grads(tiny, data, task, [[0, 1, 2, 3, 4, 5]])
        split_loss, split = step_grads(tiny, data, task, [[0, 1, 2, 3, 4], [5]])  # the usual 1/steps scaling is wrong here
        assert abs(full_loss - split_loss) < 1e-5
        assert full.keys() == split.keys()
        for name in full:
            torch.testing.assert_close(split[name], full[name], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("model_type, task", [("bert", "classification"), ("gpt2", "causal-lm"),
                                             ("roberta", "classification")])
def test_a_bucketed_token_budgeted_step_has_the_big_batch_gradient(tiny, data, model_type, task):
    """16 examples of mixed lengths, cut as the executor cuts a step (sorted, under a token budget: 1 to 4
    sequences a micro-batch), accumulate to the gradient of the same 16 in one padded batch."""
    train = data(16, task=task, min_len=3, max_len=40, seed=5)
    knobs = Knobs(micro_batch_size=4, tokens_per_micro_batch=64, bucket_boundaries=(8, 16, 32))
    pieces = cut_step(range(16), train.lengths, knobs, *bucket_uppers(train.lengths, knobs))
    assert len({len(p) for p in pieces}) > 1 and len(pieces) > 4  # uneven micro-batches, several buckets
    collate = PaddingCollator(0, 8, task=task)
    results = []
    for cut in ([list(range(16))], pieces):
        model = tiny(model_type, task)
        loss = accumulate(context(model, task), [collate([train.example(i) for i in p]) for p in cut])
        results.append((float(loss), grads(model)))
    (big_loss, big), (step_loss, step) = results
    assert step_loss == pytest.approx(big_loss, rel=1e-5)
    assert step.keys() == big.keys()
    flat_big = torch.cat([big[name].flatten() for name in big])
    flat_step = torch.cat([step[name].flatten() for name in big])
    assert float((flat_step - flat_big).norm() / flat_big.norm()) < 1e-5  # the gradient, as one vector
    scale = float(flat_big.abs().max())
    for name in big:  # and every tensor, up to rounding of the largest entries (key biases' are ~0 exactly)
        torch.testing.assert_close(step[name], big[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_a_step_collates_each_micro_batch_at_its_turn_with_the_same_gradient(tiny, data):
    """The memory model counts the running micro-batch's inputs: the later ones of a step must not be collated
    (alive) yet. Weights from the examples' unit counts give the gradient of the step collated up front."""
    task = "causal-lm"
    train = data(8, task=task, min_len=3, max_len=30, seed=7)
    collate = PaddingCollator(0, 8, task=task)
    pieces = [[0, 1, 2], [3, 4], [5, 6, 7]]
    events = []

    def collate_logged(piece):
        events.append(("collate", piece[0]))
        return collate([train.example(i) for i in piece])

    model = tiny("gpt2", task)
    model.register_forward_pre_hook(lambda module, args, kwargs: events.append(("forward", None)), with_kwargs=True)
    units = {i: count_units_of(collate, train, i, task) for i in range(8)}
    lazy = CollatedPieces(pieces, collate_logged)
    lazy_loss = accumulate(context(model, task), lazy, unit_weights(pieces, units.__getitem__))
    assert events == [("collate", 0), ("forward", None), ("collate", 3), ("forward", None), ("collate", 5),
                      ("forward", None)]
    padded = [collate([train.example(i) for i in p]) for p in pieces]
    assert lazy.tokens == [(int(b["attention_mask"].sum()), b["input_ids"].numel()) for b in padded]
    eager = tiny("gpt2", task)
    eager_loss = accumulate(context(eager, task), padded)
    assert float(lazy_loss) == pytest.approx(float(eager_loss), rel=1e-6)
    lazy_grads, eager_grads = grads(model), grads(eager)
    for name in eager_grads:
        torch.testing.assert_close(lazy_grads[name], eager_grads[name], atol=1e-6, rtol=1e-5)


def count_units_of(collate, train, index, task):
    return count_units(collate([train.example(index)]), task)


def test_optimizer_step_updates_and_clears_grads(tiny, data):
    model = tiny()
    ctx = context(model, max_grad_norm=1.0)
    data, collate = data(4), PaddingCollator(0, 8)
    before = [p.detach().clone() for p in model.parameters()]
    accumulate(ctx, [collate([data.example(i) for i in range(4)])])
    assert optimizer_step(ctx)
    assert all(p.grad is None for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_fp16_overflow_skips_the_update(tiny, data):
    model = tiny()
    ctx = context(model, precision=Precision.fp16)
    data, collate = data(4), PaddingCollator(0, 8)
    accumulate(ctx, [collate([data.example(i) for i in range(4)])])
    for p in model.parameters():
        p.grad.fill_(float("inf"))
    before = [p.detach().clone() for p in model.parameters()]
    assert not optimizer_step(ctx)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_non_finite_gradients_outside_fp16_raise_before_the_update(tiny, data):
    model = tiny()
    ctx = context(model, max_grad_norm=1.0)
    data, collate = data(4), PaddingCollator(0, 8)
    accumulate(ctx, [collate([data.example(i) for i in range(4)])])
    next(model.parameters()).grad.fill_(float("nan"))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteGradientError, match="gradient norm is nan"):
        optimizer_step(ctx)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_evaluate_reports_loss_and_accuracy(tiny, data):
    model = tiny()
    token_data, collate = data, PaddingCollator(0, 8)
    data = token_data(10)
    batches = [collate([data.example(i) for i in range(k, k + 5)]) for k in (0, 5)]
    loss, accuracy, samples = evaluate(context(model), batches)
    assert samples == 10 and 0.0 <= accuracy <= 1.0 and loss > 0
    assert model.training  # mode restored
    lm = tiny("gpt2", "causal-lm")
    lm_data, lm_collate = token_data(4, task="causal-lm"), PaddingCollator(0, 8, task="causal-lm")
    _, accuracy, _ = evaluate(context(lm, "causal-lm"), [lm_collate([lm_data.example(i) for i in range(4)])])
    assert accuracy is None


def test_a_training_step_builds_no_key_value_cache(tiny, data):
    """gpt2 builds a DynamicCache by default: in training it held a frozen layer's keys and values (which no
    op saves) until the forward's output was dropped. The profiler measures without it too."""
    model = tiny("gpt2", "causal-lm")
    assert model.config.use_cache
    caches = []
    model.register_forward_hook(lambda module, args, output: caches.append(output.past_key_values))
    train = data(4, task="causal-lm", seed=3)
    accumulate(context(model, "causal-lm"), [PaddingCollator(0, 8, task="causal-lm")([train.example(i)
                                                                                      for i in range(4)])])
    assert caches == [None] and model.config.use_cache  # none built, and the setting given back
