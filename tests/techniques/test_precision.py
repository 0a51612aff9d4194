import warnings

import pytest
import torch
from _tiny import random_batch, tiny_model

from autofit.knobs import Knobs, Precision
from autofit.techniques import precision as amp
from autofit.techniques.optimizer import build_optimizer


def test_pure_helpers():
    assert amp.accelerate_mixed_precision(Precision.fp32) == "no"
    assert amp.accelerate_mixed_precision(Precision.fp16) == "fp16"
    assert amp.accelerate_mixed_precision(Precision.bf16) == "bf16"
    assert amp.needs_grad_scaler(Precision.fp16) and not amp.needs_grad_scaler(Precision.bf16)


@pytest.mark.parametrize("precision,dtype", [(Precision.fp16, torch.float16), (Precision.bf16, torch.bfloat16),
                                             (Precision.fp32, torch.float32)])
def test_cpu_autocast_computes_in_half_and_keeps_fp32_weights(precision, dtype):
    assert amp.resolve(precision, "cpu") is precision
    linear = torch.nn.Linear(8, 8)
    with amp.autocast(precision, "cpu"):
        out = linear(torch.randn(2, 8))
    assert out.dtype == dtype and linear.weight.dtype == torch.float32


def test_bf16_without_cuda_support_falls_back_to_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    with pytest.warns(UserWarning, match="fp16"):
        assert amp.resolve(Precision.bf16, "cuda") is Precision.fp16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert amp.resolve(Precision.bf16, "cuda") is Precision.bf16


def test_unknown_autocast_device_is_an_error():
    with pytest.raises(amp.PrecisionError):
        amp.resolve(Precision.fp16, "meta")
    assert amp.resolve(Precision.fp32, "meta") is Precision.fp32


def test_fp16_grad_scaler_skips_overflow_step_and_keeps_fp32_master_weights():
    model = tiny_model("bert").train()
    optimizer = build_optimizer(model, Knobs(precision=Precision.fp16), lr=1e-2)
    scaler = amp.grad_scaler(Precision.fp16, "cpu")
    assert scaler.is_enabled() and not amp.grad_scaler(Precision.bf16, "cpu").is_enabled()

    def step(seed, inject_inf=False):
        with amp.autocast(Precision.fp16, "cpu"):
            loss = model(**random_batch(seed=seed)).loss
        scaler.scale(loss).backward()
        if inject_inf:
            next(p for p in model.parameters() if p.grad is not None).grad[0].fill_(float("inf"))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    step(0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scale = scaler.get_scale()
    step(1, inject_inf=True)
    assert scaler.get_scale() == scale * 0.5  # overflow detected: scale backs off
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), f"{name} changed in a skipped step"
    step(2)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    for p in model.parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p).all()
    for state in optimizer.state.values():
        assert state["exp_avg"].dtype == torch.float32 and torch.isfinite(state["exp_avg"]).all()


@pytest.mark.gpu
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_and_scaler():
    precision = amp.resolve(Precision.bf16, "cuda")
    linear = torch.nn.Linear(8, 8).cuda()
    with amp.autocast(precision, "cuda"):
        out = linear(torch.randn(2, 8, device="cuda"))
    assert out.dtype == amp.autocast_dtype(precision) and linear.weight.dtype == torch.float32
    assert amp.grad_scaler(Precision.fp16, "cuda").is_enabled()
