import random

import pytest

from autofit.knobs import Knobs
from autofit.techniques.accumulation import (
    AccumulationError,
    cut_step,
    epoch_micro_batches,
    eval_micro_batches,
    StepSampler,
    bucket_uppers,
    memory_shapes,
    micro_batch_size_for,
    padding_efficiency,
    run_shapes,
    step_layout,
    steps_per_epoch,
)
from autofit.techniques.bucketing import choose_boundaries, padded_length
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


def test_step_layout_caps_each_bucket_and_counts_micro_batches_per_step():
    hist = LengthHistogram.from_lengths([10] * 100 + [60] * 100 + [200] * 3)
    knobs = Knobs(micro_batch_size=16, tokens_per_micro_batch=1024, bucket_boundaries=(16, 64, 256))
    layout = step_layout(knobs, hist, batch_size=32)
    # 1024 // 200 = 5 a micro-batch at 200 tokens, but that bucket is pad-free (all 200): only its 3 join
    assert [(b.upper_length, b.micro_batch_size) for b in layout.buckets] == [(16, 16), (64, 16), (200, 3)]
    assert layout.steps_per_epoch == 7  # ceil(203 / 32)
    fewest, most = layout.micro_batches_per_step
    assert 2 <= fewest <= layout.mean_micro_batches_per_step <= most <= 4  # 32 random examples, 16 at most a piece
    # A cap that does not divide the batch: 32 examples in micro-batches of up to 12 is 3 of them.
    assert step_layout(Knobs(micro_batch_size=12), hist, 32).micro_batches_per_step == (3, 3)
    # A cap above the batch is the batch: one micro-batch per step, nothing accumulates.
    only = step_layout(Knobs(micro_batch_size=64), hist, 32)
    assert [(b.micro_batch_size, b.grads_held) for b in only.buckets] == [(32, False)]
    assert only.micro_batches_per_step == (1, 1)


def test_step_layout_says_which_buckets_hold_pad_tokens_and_gradients():
    hist = LengthHistogram.from_lengths([16] * 50 + [60] * 50 + [64] * 50)
    knobs = Knobs(micro_batch_size=8, bucket_boundaries=(16, 64))
    first, second = step_layout(knobs, hist, batch_size=8).buckets
    # the 16-token bucket holds one length, its padded length: no micro-batch pads; the other mixes 60 and 64
    assert (first.padded, second.padded) == (False, True)
    # micro-batches run longest first: the long bucket's opens the step before any gradient exists; the
    # short one's can follow it, with its gradients live
    assert (first.grads_held, second.grads_held) == (True, False)
    assert (first.later_length, second.later_length) == (None, None)  # 8 a step fit one micro-batch
    # with micro-batches of 2, a second micro-batch of the long bucket follows its first: the 3rd longest
    # example (64) can open it
    assert step_layout(Knobs(micro_batch_size=2, bucket_boundaries=(16, 64)), hist, 8).buckets[1].later_length == 64
    assert step_layout(Knobs(micro_batch_size=8), LengthHistogram.fixed(60, 100), 8).buckets[0].padded


def test_the_simulated_epoch_matches_an_epoch_the_sampler_and_cut_really_make():
    lengths = skewed_lengths(4000, seed=3)
    hist = LengthHistogram.from_lengths(lengths)
    knobs = Knobs(micro_batch_size=32, tokens_per_micro_batch=1024, bucket_boundaries=choose_boundaries(hist, 8))
    uppers, exact = bucket_uppers(lengths, knobs)
    pieces = [p for step in StepSampler(len(lengths), 32, seed=1).epoch_steps(0)
              for p in cut_step(step, lengths, knobs, uppers, exact)]
    computed = sum(len(p) * padded_length(max(lengths[i] for i in p), 8) for p in pieces)
    predicted = epoch_micro_batches(knobs, hist, 32)
    assert sum(count for _, _, count in predicted) == pytest.approx(len(pieces), rel=0.05)
    assert sum(b * n * c for b, n, c in predicted) == pytest.approx(computed, rel=0.05)
    assert padding_efficiency(knobs, hist, 32) == pytest.approx(sum(lengths) / computed, rel=0.05)
    assert all(b * n <= 1024 * 1.01 or b < 1.01 for b, n, _ in predicted)


def test_an_epoch_of_less_data_than_one_step_is_that_one_short_step():
    # 5 examples, steps of 33: the epoch is one step of the 5, not 5/33 of a step (which put the padding
    # efficiency at 6.2 and failed the plan's validation)
    hist = LengthHistogram.from_lengths([30] * 5)
    knobs = Knobs(micro_batch_size=33, pad_to_multiple_of=None)
    assert epoch_micro_batches(knobs, hist, 33) == [(5, 30, pytest.approx(1.0))]
    assert padding_efficiency(knobs, hist, 33) == pytest.approx(1.0)


def test_padding_efficiency_never_exceeds_one_on_a_handful_of_examples():
    # two very different lengths at one sequence a micro-batch: the simulated draws' real tokens, not the
    # data's, are what the simulated padded tokens are compared with
    for lengths in ([7, 96], [8, 8, 64], [3, 500, 17]):
        for batch in (1, 2, 3):
            efficiency = padding_efficiency(Knobs(micro_batch_size=batch), LengthHistogram.from_lengths(lengths), batch)
            assert 0 < efficiency <= 1.0


def test_run_shapes_are_the_micro_batches_the_collator_makes():
    lengths = skewed_lengths(300, seed=5)
    knobs = Knobs(micro_batch_size=8, tokens_per_micro_batch=512,
                  bucket_boundaries=choose_boundaries(LengthHistogram.from_lengths(lengths), 4))
    steps = StepSampler(len(lengths), 16, seed=2).epoch_steps(0)
    uppers, exact = bucket_uppers(lengths, knobs)
    collate = PaddingCollator(pad_token_id=0, pad_to_multiple_of=8)
    made = set()
    for step in steps:
        for k, piece in enumerate(cut_step(step, lengths, knobs, uppers, exact)):
            batch = collate([{"input_ids": [1] * lengths[i], "labels": 0} for i in piece])
            made.add((*batch["input_ids"].shape, bool((batch["attention_mask"] == 0).any()), k > 0))
    shapes = run_shapes(steps, lengths, knobs)
    assert {(s.batch, s.length, s.padded, s.grads_held) for s in shapes} == made and len(shapes) == len(made)
    # every one is within what the plan's bound checks: no larger than its bucket's largest micro-batch
    largest = {b.upper_length: b.micro_batch_size for b in step_layout(knobs, LengthHistogram.from_lengths(lengths),
                                                                       16).buckets}
    assert all(s.batch <= max(m for u, m in largest.items() if u >= s.length) for s in shapes)


def test_padding_efficiency_sorting_and_token_budgets():
    hist = LengthHistogram.from_lengths(skewed_lengths())
    plain = Knobs(micro_batch_size=32)
    sorted_steps = Knobs(micro_batch_size=4)  # a step of 32 sorted and cut in 8 pads far less
    budgeted = Knobs(micro_batch_size=32, tokens_per_micro_batch=512, bucket_boundaries=choose_boundaries(hist, 8))
    assert padding_efficiency(plain, hist, 32) < 0.3 < padding_efficiency(sorted_steps, hist, 32)
    assert padding_efficiency(plain, hist, 32) < padding_efficiency(budgeted, hist, 32) <= 1.0
    assert padding_efficiency(Knobs(micro_batch_size=8, pad_to_multiple_of=None),
                              LengthHistogram.fixed(64, 100), 8) == pytest.approx(1.0)


def test_cut_step_fills_each_micro_batch_up_to_its_longest_examples_cap():
    lengths = [10, 60, 12, 61, 200, 11, 9, 63, 14]
    knobs = Knobs(micro_batch_size=3, tokens_per_micro_batch=128, bucket_boundaries=(16, 64))
    uppers, exact = bucket_uppers(lengths, knobs)
    assert uppers == {0: 16, 1: 64, 2: 200} and exact == {2}
    pieces = cut_step(range(len(lengths)), lengths, knobs, uppers, exact)
    # longest first: 200 (pad-free bucket, alone) | 63 61 (128 // 64 = 2) | 60 14 (opened at 64 tokens: 2) |
    # 12 11 10 | 9
    assert pieces == [[4], [7, 3], [1, 8], [2, 5, 0], [6]]
    assert sorted(i for p in pieces for i in p) == list(range(len(lengths)))
    # shorter examples fill a longer bucket's micro-batch when its cap allows
    assert cut_step([0, 1], [10, 60], Knobs(micro_batch_size=4, bucket_boundaries=(16, 64)), {0: 16, 1: 64}) == [[1, 0]]


def test_step_sampler_draws_random_steps_of_the_batch():
    sampler = StepSampler(100, 32, seed=3)
    steps = sampler.epoch_steps(0)
    assert [len(s) for s in steps] == [32, 32, 32, 4] and len(sampler) == 4
    assert sorted(i for s in steps for i in s) == list(range(100))
    assert steps == StepSampler(100, 32, seed=3).epoch_steps(0)  # reproducible
    assert steps != sampler.epoch_steps(1) and steps != StepSampler(100, 32, seed=4).epoch_steps(0)
    assert [len(s) for s in StepSampler(100, 32, drop_last=True).epoch_steps(0)] == [32] * 3
    assert StepSampler(10, 4, shuffle=False).epoch_steps(0) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(AccumulationError):
        StepSampler(0, 4)


def test_eval_micro_batches_never_exceed_the_largest_training_micro_batch():
    lengths = [5, 1, 9, 3, 7, 40, 33]
    pieces = eval_micro_batches(lengths, Knobs(micro_batch_size=2, pad_to_multiple_of=None), max_tokens=40)
    assert pieces == [[1, 3], [0, 4], [2], [6], [5]]  # 9 + 33 > 40 alone; 33 and 40 one each
    assert all(len(p) * max(lengths[i] for i in p) <= 40 for p in pieces)


def test_steps_per_epoch():
    assert steps_per_epoch(100, 32) == 4 and steps_per_epoch(100, 32, drop_last=True) == 3
    with pytest.raises(AccumulationError):
        steps_per_epoch(10, 0)


def test_memory_shapes_check_a_single_sequence_buckets_unpadded_and_padded_examples_apart():
    """One sequence per micro-batch: a 256-token example never pads, a 203-token one pads to 208 only."""
    hist = LengthHistogram.from_lengths([200] * 31 + [256])
    shapes = memory_shapes(Knobs(micro_batch_size=1), hist, 8)
    # the second micro-batch of a step follows the first with its gradients: at most the 2nd longest, 200
    assert [(s.batch, s.length, s.padded, s.grads_held) for s in shapes] == [(1, 200, True, True),
                                                                             (1, 256, False, False)]
    mixed = memory_shapes(Knobs(micro_batch_size=1), LengthHistogram.from_lengths([203] * 31 + [256]), 8)
    assert [(s.batch, s.length, s.padded) for s in mixed] == [(1, 208, True), (1, 256, False), (1, 208, True)]
    # several sequences a micro-batch: the bucket's largest, padded as soon as lengths differ
    many = memory_shapes(Knobs(micro_batch_size=4), LengthHistogram.from_lengths([203] * 31 + [256]), 8)
    assert [(s.batch, s.length, s.padded) for s in many] == [(4, 208, True), (4, 256, True)]


def _dominated(shapes, size, length, padded, grads_live) -> bool:
    return any(s.batch >= size and s.length >= length and (s.padded or not padded) and (s.grads_held or not grads_live)
               for s in shapes)


@pytest.mark.parametrize("seed", range(6))
def test_every_micro_batch_the_executor_runs_is_one_the_memory_model_checks(seed):
    """Random skewed data, caps, buckets and batch sizes: each micro-batch of random steps, cut as the executor
    cuts them, is no larger, no longer and no more padded than a shape memory_shapes returns, and runs with
    gradients live only where that shape has them."""
    rng = random.Random(seed)
    lengths = [min(256, 3 + int(rng.expovariate(1 / rng.choice([10, 30])))) for _ in range(rng.choice([40, 300]))]
    hist = LengthHistogram.from_lengths(lengths)
    batch = rng.choice([1, 4, 16, 32])
    knobs = Knobs(micro_batch_size=rng.choice([1, 2, 8, 16, 32]), tokens_per_micro_batch=rng.choice([None, 128, 512]),
                  bucket_boundaries=rng.choice([(), tuple(choose_boundaries(hist, 4)), tuple(choose_boundaries(hist, 8))]))
    shapes = memory_shapes(knobs, hist, batch)
    uppers, exact = bucket_uppers(lengths, knobs)
    for step in StepSampler(len(lengths), batch, seed=seed).epoch_steps(0) * 3:
        for j, piece in enumerate(cut_step(step, lengths, knobs, uppers, exact)):
            longest = padded_length(max(lengths[i] for i in piece), knobs.pad_to_multiple_of)
            padded = any(lengths[i] != longest for i in piece)
            assert _dominated(shapes, len(piece), longest, padded, j > 0), (piece, j, shapes)


def test_a_step_in_one_micro_batch_has_no_gradients_while_it_runs():
    """Micro-batch = step = 16: the shortest bucket's 16 sequences fill a step alone (no gradients yet), and
    after a longer example only 15 of them remain, so (16 sequences, gradients live) is never checked."""
    hist = LengthHistogram.from_lengths([12] * 200 + [100] * 20)
    shapes = memory_shapes(Knobs(micro_batch_size=16, bucket_boundaries=(16, 104)), hist, 16)
    short = [(s.batch, s.grads_held) for s in shapes if s.length == 16]
    assert sorted(short) == [(15, True), (16, False)]


def test_a_second_micro_batch_of_a_bucket_holds_what_the_first_left_of_the_step():
    """One bucket, caps of 12 in steps of 16: the first micro-batch takes 12 examples, the second the other 4."""
    shapes = memory_shapes(Knobs(micro_batch_size=12), LengthHistogram.from_lengths([10, 11, 12, 13] * 50), 16)
    assert sorted((s.batch, s.length, s.grads_held) for s in shapes) == [(4, 16, True), (12, 16, False)]
