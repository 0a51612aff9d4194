import pytest
import torch
from _tiny import TINY, random_batch, tiny_model
from torch import nn

from autofit.knobs import Knobs
from autofit.layers import UnmappableModelError, find_layout
from autofit.techniques import freeze
from autofit.techniques.optimizer import build_optimizer

FREEZE_ONE = Knobs(freeze_embeddings=True, freeze_layers=1)


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_frozen_params_get_no_grad_no_state_and_never_change(model_type):
    model = tiny_model(model_type).train()
    layout = find_layout(model)
    report = freeze.apply(model, FREEZE_ONE)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    expected = {id(p) for p in layout.embedding_params} | {id(p) for p in layout.layers[0].parameters()}
    assert {id(p) for p in model.parameters() if not p.requires_grad} == expected
    assert report.frozen_tensors == len(frozen) and report.frozen_layers == 1 and report.embeddings_frozen
    assert report.frozen_numel + report.trainable_numel == sum(p.numel() for p in model.parameters())

    optimizer = build_optimizer(model, FREEZE_ONE, lr=1e-2)
    trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for step in range(3):
        model(**random_batch(seed=step)).loss.backward()
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    held = {id(p) for p in optimizer.state}
    assert held and not held & expected
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    changed = [n for n, p in model.named_parameters()
               if n in trainable_before and not torch.equal(p, trainable_before[n])]
    assert len(changed) >= len(trainable_before) // 2  # training really happened above the boundary


def test_tied_lm_head_freezes_with_embeddings():
    model = tiny_model("gpt2", "causal-lm")
    freeze.apply(model, Knobs(freeze_embeddings=True))
    assert not model.lm_head.weight.requires_grad
    assert all(p.requires_grad for p in model.transformer.h.parameters())


def test_no_freeze_keeps_everything_trainable_and_counts_match_pure_side():
    model = tiny_model("bert")
    layout = find_layout(model)
    report = freeze.apply(model, Knobs())
    assert report.frozen_tensors == 0
    embedding = sum(p.numel() for p in layout.embedding_params)
    layers = [sum(p.numel() for p in layer.parameters()) for layer in layout.layers]
    head = sum(p.numel() for p in layout.head_params)
    assert freeze.trainable_numel(embedding, layers, head, Knobs()) == report.trainable_numel
    report = freeze.apply(model, FREEZE_ONE)
    assert freeze.trainable_numel(embedding, layers, head, FREEZE_ONE) == report.trainable_numel
    assert 0 < freeze.frozen_fraction(embedding, layers, head, FREEZE_ONE) < 1


def test_too_deep_freeze_is_a_value_error():
    with pytest.raises(ValueError, match="freeze_layers=3"):
        freeze.apply(tiny_model("bert"), Knobs(freeze_embeddings=True, freeze_layers=3))


def test_model_without_layer_stack_raises_unmappable():
    with pytest.raises(UnmappableModelError):
        freeze.apply(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)), FREEZE_ONE)
