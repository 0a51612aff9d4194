import random

import pytest
import torch
from _tiny import tiny_model

from autofit.knobs import Knobs
from autofit.techniques.accumulation import (
    AccumulationError,
    count_units,
    cut_step,
    epoch_micro_batches,
    eval_micro_batches,
    expected_chunk_lengths,
    loss_scale,
    memory_shapes,
    micro_batch_size_for,
    padding_efficiency,
    step_layout,
    step_units,
    steps_per_epoch,
)
from autofit.techniques.bucketing import choose_boundaries, padded_length, upper_lengths
from autofit.techniques.padding import PaddingCollator
from autofit.workload import LengthHistogram


def skewed_lengths(n=2000, seed=0):
    """Mostly short examples with a long tail, like real fine-tuning text."""
    rng = random.Random(seed)
    return [min(500, 4 + int(rng.expovariate(1 / 30))) for _ in range(n)]


def test_micro_batch_size_for_caps_by_token_budget():
    knobs = Knobs(micro_batch_size=32, tokens_per_micro_batch=1024)
    assert micro_batch_size_for(16, knobs) == 32
    assert micro_batch_size_for(128, knobs) == 8
    assert micro_batch_size_for(4096, knobs) == 1
    assert micro_batch_size_for(4096, Knobs(micro_batch_size=4)) == 4


def test_step_layout_counts_each_buckets_micro_batches():
    hist = LengthHistogram.from_lengths([10] * 100 + [60] * 100 + [200] * 3)
    knobs = Knobs(micro_batch_size=16, tokens_per_micro_batch=1024, bucket_boundaries=(16, 64, 256))
    layout = step_layout(knobs, hist, batch_size=32)
    assert [(b.upper_length, b.micro_batch_size, b.micro_batches_per_step) for b in layout.buckets] == [
        (16, 16, 2), (64, 16, 2), (200, 3, 1)]  # 1024 // 200 = 5 a micro-batch, but the bucket holds 3
    assert layout.micro_batches_per_step == (1, 2) and layout.steps_per_epoch == 7  # ceil(203 / 32)
    # A cap that does not divide the batch: 32 examples in micro-batches of up to 12 is 3 of them.
    assert step_layout(Knobs(micro_batch_size=12), hist, 32).buckets[0].micro_batches_per_step == 3
    # A cap above the batch is the batch: one micro-batch per step, nothing accumulates.
    only = step_layout(Knobs(micro_batch_size=64), hist, 32).buckets
    assert [(b.micro_batch_size, b.micro_batches_per_step, b.grads_held) for b in only] == [(32, 1, False)]


def test_step_layout_says_which_buckets_hold_pad_tokens_and_gradients():
    hist = LengthHistogram.from_lengths([16] * 50 + [60] * 50 + [64] * 50)
    knobs = Knobs(micro_batch_size=8, bucket_boundaries=(16, 64))
    first, second = step_layout(knobs, hist, batch_size=8).buckets
    # the 16-token bucket holds one length, its padded length: no micro-batch pads; the other mixes 60 and 64
    assert (first.padded, second.padded) == (False, True)
    # one micro-batch per step, but 50 % 8 examples of each bucket are pooled into a mixed step, where
    # the second bucket's micro-batch follows the first's: its gradients are then live
    assert (first.grads_held, second.grads_held) == (False, True)
    assert step_layout(Knobs(micro_batch_size=8), LengthHistogram.fixed(60, 100), 8).buckets[0].padded


def test_expected_chunk_lengths_match_simulation():
    hist = LengthHistogram.from_lengths(skewed_lengths(500))
    population = [n for n, c in zip(hist.lengths, hist.counts) for _ in range(c)]
    rng, rounds, sums = random.Random(1), 4000, [0.0] * 4
    for _ in range(rounds):
        drawn = sorted(rng.sample(population, 32))
        for j in range(4):
            sums[j] += padded_length(drawn[min(8 * (j + 1), 32) - 1], 8)
    expected = expected_chunk_lengths(hist, 32, 8, 8)
    assert expected == pytest.approx([x / rounds for x in sums], rel=0.03)
    assert expected == sorted(expected)  # later micro-batches of a sorted step hold longer examples
    assert expected_chunk_lengths(LengthHistogram.fixed(100, 10), 4, 4, 8) == pytest.approx([104])
    assert expected_chunk_lengths(hist, hist.num_samples, hist.num_samples, None) == pytest.approx([hist.max_length])


def test_epoch_micro_batches_cover_every_example_under_the_caps():
    hist = LengthHistogram.from_lengths(skewed_lengths())
    knobs = Knobs(micro_batch_size=32, tokens_per_micro_batch=2048, bucket_boundaries=choose_boundaries(hist, 4))
    batches = epoch_micro_batches(knobs, hist, batch_size=32)
    assert sum(b * n for b, _, n in batches) == pytest.approx(hist.num_samples)
    assert all(b * length <= 2048 * 1.01 for b, length, _ in batches)


def test_padding_efficiency_sorting_and_bucketing():
    hist = LengthHistogram.from_lengths(skewed_lengths())
    plain = Knobs(micro_batch_size=32)
    sorted_steps = Knobs(micro_batch_size=4)  # a step of 32 sorted and cut in 8 pads far less
    bucketed = Knobs(micro_batch_size=32, bucket_boundaries=choose_boundaries(hist, 8))
    assert padding_efficiency(plain, hist, 32) < 0.5 < padding_efficiency(bucketed, hist, 32) <= 1.0
    assert padding_efficiency(plain, hist, 32) < padding_efficiency(sorted_steps, hist, 32)
    assert padding_efficiency(Knobs(micro_batch_size=8, pad_to_multiple_of=None),
                              LengthHistogram.fixed(64, 100), 8) == pytest.approx(1.0)


def test_cut_step_sorts_and_cuts_each_bucket_under_its_cap():
    lengths = [10, 60, 12, 61, 200, 11, 9, 63, 14]
    knobs = Knobs(micro_batch_size=3, tokens_per_micro_batch=128, bucket_boundaries=(16, 64))
    uppers = upper_lengths(lengths, knobs)
    assert uppers == {0: 16, 1: 64, 2: 200}
    pieces = cut_step(range(len(lengths)), lengths, knobs, uppers)
    # bucket 0: 3 a micro-batch, shortest first; bucket 1: 128 // 64 = 2; bucket 2 (beyond): 1
    assert pieces == [[6, 0, 5], [2, 8], [1, 3], [7], [4]]
    assert sorted(i for p in pieces for i in p) == list(range(len(lengths)))


def test_eval_micro_batches_never_exceed_the_largest_training_micro_batch():
    lengths = [5, 1, 9, 3, 7, 40, 33]
    pieces = eval_micro_batches(lengths, Knobs(micro_batch_size=2, pad_to_multiple_of=None), max_tokens=40)
    assert pieces == [[1, 3], [0, 4], [2], [6], [5]]  # 9 + 33 > 40 alone; 33 and 40 one each
    assert all(len(p) * max(lengths[i] for i in p) <= 40 for p in pieces)


def test_steps_per_epoch():
    assert steps_per_epoch(100, 32) == 4 and steps_per_epoch(100, 32, drop_last=True) == 3
    with pytest.raises(AccumulationError):
        steps_per_epoch(10, 0)


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
    total = step_units(micro_batches, task)
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


def test_memory_shapes_check_a_single_sequence_buckets_unpadded_and_padded_examples_apart():
    """One sequence per micro-batch: a 256-token example never pads, a 203-token one pads to 208 only."""
    hist = LengthHistogram.from_lengths([200] * 31 + [256])
    shapes = memory_shapes(Knobs(micro_batch_size=1), hist, 8)
    assert [(s.batch, s.length, s.padded) for s in shapes] == [(1, 256, False)]
    mixed = memory_shapes(Knobs(micro_batch_size=1), LengthHistogram.from_lengths([203] * 31 + [256]), 8)
    assert [(s.batch, s.length, s.padded) for s in mixed] == [(1, 256, False), (1, 208, True)]
    # several sequences a micro-batch: the bucket's largest, padded as soon as lengths differ
    many = memory_shapes(Knobs(micro_batch_size=4), LengthHistogram.from_lengths([203] * 31 + [256]), 8)
    assert [(s.batch, s.length, s.padded) for s in many] == [(4, 256, True)]
