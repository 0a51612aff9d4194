import copy

import pytest
import torch
from _tiny import random_batch, tiny_model

from autofit.knobs import Knobs
from autofit.layers import find_layout
from autofit.techniques import checkpointing, freeze

CASES = [("bert", "classification"), ("gpt2", "causal-lm"), ("llama", "causal-lm"), ("deberta-v2", "classification")]


def grads_after_step(model, task, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same dropout masks in both runs
    model(**random_batch(task=task, seed=seed)).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(got, expected):
    assert got.keys() == expected.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("model_type,task", CASES)
@pytest.mark.parametrize("frozen", [0, 1])
def test_checkpointed_grads_equal_plain_grads(model_type, task, frozen):
    model = tiny_model(model_type, task, dropout=True).train()
    if frozen:
        freeze.apply(model, Knobs(freeze_embeddings=True, freeze_layers=frozen))
    expected = grads_after_step(model, task)
    checkpointing.apply(model, [0, 1])
    assert checkpointing.checkpointed_indices(model) == [0, 1]
    got = grads_after_step(model, task)
    assert_same_grads(got, expected)
    # Layer 1 trains above the frozen layer 0: its grads must survive (reentrant checkpointing loses them).
    layer1 = {id(p) for p in find_layout(model).layers[1].parameters()}
    assert sum(1 for p in model.parameters() if id(p) in layer1 and p.grad is not None) == len(layer1)


def count_inner_forwards(model):
    """Forward calls of one Linear inside each layer: a recomputed layer runs it twice per step."""
    counts = {}
    for i, layer in enumerate(find_layout(model).layers):
        linear = next(m for m in layer.modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")
        counts[i] = 0
        linear.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def test_only_named_layers_are_recomputed():
    model = tiny_model("gpt2", "causal-lm", n_layer=3).train()
    counts = count_inner_forwards(model)
    checkpointing.apply(model, [1])
    grads_after_step(model, "causal-lm")
    assert counts == {0: 1, 1: 2, 2: 1}


def test_frozen_checkpointed_layer_is_not_recomputed():
    model = tiny_model("bert").train()
    freeze.apply(model, Knobs(freeze_embeddings=True, freeze_layers=1))
    counts = count_inner_forwards(model)
    checkpointing.apply(model, [0, 1])
    grads_after_step(model, "classification")
    assert counts == {0: 1, 1: 2}


def test_state_dict_keys_unchanged_remove_and_reapply():
    model = tiny_model("llama", "causal-lm").train()
    keys = list(model.state_dict())
    checkpointing.apply(model, [0])
    assert list(model.state_dict()) == keys
    checkpointing.apply(model, [1])  # exactly the named layers, not the union
    assert checkpointing.checkpointed_indices(model) == [1]
    counts = count_inner_forwards(model)
    checkpointing.remove(model)
    assert checkpointing.checkpointed_indices(model) == []
    grads_after_step(model, "causal-lm")
    assert counts == {0: 1, 1: 1}


def test_builtin_hf_checkpointing_is_replaced_by_the_selection():
    model = tiny_model("gpt2", "causal-lm", n_layer=3).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    counts = count_inner_forwards(model)
    with pytest.warns(UserWarning, match="built-in gradient checkpointing"):
        checkpointing.apply(model, [2])
    assert not model.is_gradient_checkpointing
    grads_after_step(model, "causal-lm")
    assert counts == {0: 1, 1: 1, 2: 2}


def test_deep_copy_checkpoints_its_own_layers():
    model = tiny_model("bert").train()
    checkpointing.apply(model, [1])
    clone = copy.deepcopy(model)
    counts = count_inner_forwards(clone)
    grads_after_step(clone, "classification")
    assert counts == {0: 1, 1: 2}
    assert all(p.grad is None for p in model.parameters())  # the original was not touched


def test_eval_and_no_grad_bypass_checkpointing():
    model = tiny_model("llama", "causal-lm").eval()
    checkpointing.apply(model, [0, 1])
    with torch.no_grad():
        out = model(**random_batch(task="causal-lm"), use_cache=True)
    assert out.past_key_values is not None and out.past_key_values.get_seq_length() == 12


def test_bad_indices_raise():
    with pytest.raises(checkpointing.CheckpointingError, match=r"\[2\]"):
        checkpointing.apply(tiny_model("bert"), [0, 2])


def test_only_trainable_checkpointed_layers_recompute():
    assert checkpointing.recomputed_layers(Knobs(checkpoint_layers=(0, 1, 2, 3)), 4) == [0, 1, 2, 3]
    knobs = Knobs(freeze_embeddings=True, freeze_layers=2, checkpoint_layers=(1, 2, 3))
    assert checkpointing.recomputed_layers(knobs, 4) == [2, 3]
