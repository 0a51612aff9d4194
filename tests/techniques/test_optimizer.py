import warnings

import pytest
import torch
from _tiny import random_batch, tiny_model
from torch import nn

from autofit.knobs import Knobs
from autofit.techniques import optimizer as opt
from autofit.techniques.optimizer import (
    NoTrainableParametersError,
    OptimizerUnavailableError,
    build_optimizer,
    embedding_weights,
    state_bytes,
    state_bytes_for,
)

EIGHT = Knobs(optimizer_bits=8)
BIG = dict(hidden_size=64, intermediate_size=300, vocab_size=1000)  # several tensors >= 4096, odd block counts


def measured_state_bytes(optimizer):
    """Bytes of all distinct tensors in the optimizer state (shared tensors counted once)."""
    storages = {}
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return sum(storages.values())


def trained(model, knobs, steps=2):
    optimizer = build_optimizer(model, knobs, lr=1e-3)
    task = "causal-lm" if hasattr(model, "lm_head") else "classification"
    for step in range(steps):
        model(**random_batch(vocab=1000, seed=step, task=task)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer


@pytest.mark.parametrize("model_type,task", [("bert", "classification"), ("gpt2", "causal-lm"),
                                             ("llama", "causal-lm")])
def test_8bit_state_bytes_are_predicted_exactly(model_type, task):
    kw = dict(BIG) if model_type != "gpt2" else dict(n_embd=64, vocab_size=1000)
    model = tiny_model(model_type, task, **kw)
    optimizer = trained(model, EIGHT)
    n_params = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(optimizer.state) == n_params
    qmaps = 2 * 256 * 4  # bitsandbytes' two quantisation maps, shared by every 8-bit tensor
    assert measured_state_bytes(optimizer) == state_bytes_for(model, 8) + qmaps
    # Sanity of the prediction itself: well below 32-bit, well above the 2 B/param floor.
    numel = sum(p.numel() for p in model.parameters())
    assert 2 * numel < state_bytes_for(model, 8) < state_bytes_for(model, 32) == 8 * numel


def test_8bit_state_layout_embeddings_stay_fp32():
    model = tiny_model("bert", **BIG)
    optimizer = trained(model, EIGHT)
    embeddings = {id(p) for p in embedding_weights(model)}
    assert embeddings  # word, position and token-type embeddings
    for p, state in optimizer.state.items():
        if id(p) in embeddings or p.numel() < opt.BNB_MIN_8BIT_SIZE:
            assert state["state1"].dtype == torch.float32 and state["state2"].dtype == torch.float32
        else:
            assert state["state1"].dtype == torch.uint8
            assert state["absmax1"].numel() == -(-p.numel() // opt.BNB_BLOCK_SIZE)
    assert any(s["state1"].dtype == torch.uint8 for s in optimizer.state.values())


def test_32bit_state_bytes_match_torch_adamw():
    model = tiny_model("bert", **BIG)
    optimizer = trained(model, Knobs())
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["foreach"]
    step_counters = 4 * len(optimizer.state)  # torch keeps a float32 step tensor per parameter
    assert measured_state_bytes(optimizer) == state_bytes_for(model, 32) + step_counters


def test_state_bytes_pure():
    assert state_bytes([100], [], 8) == 800  # small tensors stay 32-bit
    assert state_bytes([4096], [], 8) == 2 * (4096 + 4 * 16)
    assert state_bytes([4097, 8192], [8192], 8) == 2 * (4097 + 4 * 17) + 8 * 8192
    assert state_bytes([4097, 8192], [8192], 32) == 8 * (4097 + 8192)


def test_only_trainable_params_and_no_decay_on_1d():
    model = tiny_model("bert")
    model.bert.embeddings.requires_grad_(False)
    optimizer = build_optimizer(model, Knobs(freeze_embeddings=True), lr=1e-3, weight_decay=0.1)
    grouped = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert set(grouped) == {id(p) for p in model.parameters() if p.requires_grad}
    for p in model.parameters():
        if p.requires_grad:
            assert grouped[id(p)] == (0.1 if p.ndim >= 2 else 0.0)


def test_two_8bit_optimizers_do_not_leak_overrides():
    # bitsandbytes' global override manager keys overrides by (group, index) across optimizers; ours must not.
    first, second = tiny_model("gpt2", "causal-lm", n_embd=64, vocab_size=1000), tiny_model("bert", **BIG)
    trained(first, EIGHT)
    optimizer = trained(second, EIGHT)
    assert measured_state_bytes(optimizer) == state_bytes_for(second, 8) + 2048


def test_everything_frozen_is_an_error():
    model = tiny_model("bert").requires_grad_(False)
    with pytest.raises(NoTrainableParametersError):
        build_optimizer(model, Knobs(), lr=1e-3)


def test_unavailable_bitsandbytes_raises_or_falls_back(monkeypatch):
    def unavailable(device_type):
        raise OptimizerUnavailableError("bitsandbytes cannot be imported")

    monkeypatch.setattr(opt, "_bnb_adamw8bit", unavailable)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    with pytest.raises(OptimizerUnavailableError, match="bitsandbytes"):
        build_optimizer(model, EIGHT, lr=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer = build_optimizer(model, EIGHT, lr=1e-3, fallback=True)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert any("falling back to 32-bit" in str(w.message) for w in caught)
    assert issubclass(OptimizerUnavailableError, ValueError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_8bit_on_a_missing_device_reports_clearly():
    with pytest.raises(OptimizerUnavailableError, match="cannot run on 'cuda'"):
        opt._bnb_adamw8bit("cuda")


@pytest.mark.gpu
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_8bit_state_bytes_on_cuda():
    model = tiny_model("bert", **BIG).cuda()
    optimizer = build_optimizer(model, EIGHT, lr=1e-3)
    for step in range(2):
        batch = {k: v.cuda() for k, v in random_batch(vocab=1000, seed=step).items()}
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert measured_state_bytes(optimizer) == state_bytes_for(model, 8) + 2048
