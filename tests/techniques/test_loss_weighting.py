"""Loss weighting: uneven micro-batches weighted by their share of the step give the big batch's gradient."""

import pytest
import torch
from _tiny import tiny_model

from autofit.techniques.accumulation import AccumulationError
from autofit.techniques.loss_weighting import count_units, loss_scale
from autofit.techniques.padding import PaddingCollator


def test_count_units():
    labels = torch.tensor([[1, 2, -100], [3, -100, -100]])
    assert count_units({"labels": labels}, "token-classification") == 3
    assert count_units({"labels": labels}, "causal-lm") == 1  # first label of each row is never predicted
    assert count_units({"labels": torch.tensor([0, 1, 1])}, "classification") == 3
    assert count_units({"input_ids": torch.zeros(5, 4)}, "classification") == 5
    with pytest.raises(AccumulationError):
        count_units({"input_ids": torch.zeros(5, 4)}, "causal-lm")


def test_loss_scale():
    assert loss_scale(3, 12) == 0.25
    with pytest.raises(AccumulationError):
        loss_scale(1, 0)


def examples(task, n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 3 + (7 * i) % 11
        ids = torch.randint(3, 100, (length,), generator=g).tolist()
        ex = {"input_ids": ids}
        if task == "classification":
            ex["labels"] = i % 2
        elif task == "token-classification":
            ex["labels"] = [t % 2 if t % 5 else -100 for t in ids]
        out.append(ex)
    return out


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_type,task", [("bert", "classification"), ("bert", "token-classification"),
                                             ("gpt2", "causal-lm"), ("llama", "causal-lm")])
def test_accumulated_uneven_micro_batches_equal_one_big_batch(model_type, task):
    data = examples(task)
    collate = PaddingCollator(pad_token_id=0, task=task)
    model = tiny_model(model_type, task).train()  # dropout disabled in tiny models

    model(**collate(data)).loss.backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)

    micro_batches = [collate(data[:2]), collate(data[2:7]), collate(data[7:])]  # sizes 2, 5, 2
    total = sum(count_units(batch, task) for batch in micro_batches)
    for batch in micro_batches:
        (model(**batch).loss * loss_scale(count_units(batch, task), total)).backward()
    got = grads(model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)

    # The naive 1/steps scaling is measurably wrong on uneven micro-batches: the test can fail.
    model.zero_grad(set_to_none=True)
    for batch in micro_batches:
        (model(**batch).loss / len(micro_batches)).backward()
    naive = grads(model)
    assert max((naive[n] - expected[n]).abs().max().item() for n in expected) > 1e-4
