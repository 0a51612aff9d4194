from types import SimpleNamespace

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


@pytest.mark.parametrize("knobs", [Knobs(), Knobs(freeze_embeddings=True), FREEZE_ONE,
                                   Knobs(freeze_embeddings=True, freeze_layers=2)])
def test_the_pure_side_names_exactly_what_apply_leaves_trainable(knobs):
    """freeze.trains, which the memory and time models use, agrees with what apply really freezes."""
    model = tiny_model("bert")
    layout = find_layout(model)
    freeze.apply(model, knobs)
    parts = [("embeddings", 0, layout.embedding_params), ("head", 0, layout.head_params)]
    parts += [("layer", i, list(layer.parameters())) for i, layer in enumerate(layout.layers)]
    for kind, index, params in parts:
        assert all(p.requires_grad == freeze.trains(kind, index, knobs) for p in params), (kind, index)


def test_block_copies_walk_bottom_up_and_say_whose_input_needs_a_gradient():
    blocks = [SimpleNamespace(kind="embeddings", count=1), SimpleNamespace(kind="layer", count=3),
              SimpleNamespace(kind="head", count=1)]
    copies = freeze.block_copies(blocks, FREEZE_ONE)
    assert [(c.block.kind, c.index, c.trains, c.needs_input_grad) for c in copies] == [
        ("embeddings", 0, False, False), ("layer", 0, False, False), ("layer", 1, True, False),
        ("layer", 2, True, True), ("head", 0, True, True)]
    copies = freeze.block_copies(blocks, Knobs())
    assert [c.needs_input_grad for c in copies] == [False, True, True, True, True]


def test_too_deep_freeze_is_a_value_error():
    with pytest.raises(ValueError, match="freeze_layers=3"):
        freeze.apply(tiny_model("bert"), Knobs(freeze_embeddings=True, freeze_layers=3))


def test_model_without_layer_stack_raises_unmappable():
    with pytest.raises(UnmappableModelError):
        freeze.apply(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)), FREEZE_ONE)
