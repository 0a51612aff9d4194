"""The training step: accumulation weights, optimizer step, evaluation."""

from __future__ import annotations

import torch

from autofit.executor.loop import StepContext, accumulate, evaluate, optimizer_step
from autofit.knobs import Precision
from autofit.techniques.padding import PaddingCollator


def context(model, task="classification", precision=Precision.fp32, max_grad_norm=None):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=precision is Precision.fp16)
    return StepContext(model, optimizer, scaler, precision, torch.device("cpu"), task, max_grad_norm)


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def window_grads(tiny_model, token_data, task: str, pieces: list[list[int]]):
    model = tiny_model("gpt2" if task == "causal-lm" else "bert", task)
    data = token_data(6, task=task, seed=3)
    collate = PaddingCollator(0, 8, task=task)
    loss = accumulate(context(model, task), [collate([data.example(i) for i in p]) for p in pieces])
    return float(loss), grads(model)


def test_uneven_micro_batches_give_the_full_batch_gradient(tiny, data):
    for task in ("classification", "causal-lm"):
        full_loss, full = window_grads(tiny, data, task, [[0, 1, 2, 3, 4, 5]])
        split_loss, split = window_grads(tiny, data, task, [[0, 1, 2, 3, 4], [5]])  # the usual 1/steps scaling is wrong here
        assert abs(full_loss - split_loss) < 1e-5
        assert full.keys() == split.keys()
        for name in full:
            torch.testing.assert_close(split[name], full[name], atol=1e-6, rtol=1e-4)


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
