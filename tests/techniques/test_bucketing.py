import random

import pytest

from autofit.knobs import Knobs
from autofit.techniques.bucketing import (
    BucketBatchSampler,
    BucketingError,
    choose_boundaries,
    expected_micro_batches,
    expected_padded_max,
    micro_batch_size_for,
    padded_length,
    padding_efficiency,
    sorted_eval_batches,
    worst_case_batches,
)
from autofit.workload import LengthHistogram


def skewed_lengths(n=2000, seed=0):
    """Mostly short examples with a long tail, like real fine-tuning text."""
    rng = random.Random(seed)
    return [min(500, 4 + int(rng.expovariate(1 / 30))) for _ in range(n)]


def test_padded_length():
    assert padded_length(13, 8) == 16
    assert padded_length(16, 8) == 16
    assert padded_length(13, None) == 13
    assert padded_length(13, 1) == 13


def test_choose_boundaries_are_quantiles_and_end_at_padded_max():
    hist = LengthHistogram.from_lengths(range(1, 101))
    assert choose_boundaries(hist, 4, multiple=None) == (25, 50, 75, 100)
    assert choose_boundaries(hist, 3, multiple=8) == (40, 72, 104)
    assert choose_boundaries(LengthHistogram.fixed(30, 10), 4) == (32,)
    with pytest.raises(BucketingError):
        choose_boundaries(hist, 0)


def test_micro_batch_size_for_caps_by_token_budget():
    knobs = Knobs(micro_batch_size=32, tokens_per_micro_batch=1024)
    assert micro_batch_size_for(16, knobs) == 32
    assert micro_batch_size_for(128, knobs) == 8
    assert micro_batch_size_for(4096, knobs) == 1
    assert micro_batch_size_for(4096, Knobs(micro_batch_size=4)) == 4


def worst_case_shapes(knobs, hist):
    return [(batch, length) for batch, length, _ in worst_case_batches(knobs, hist)]


def test_worst_case_shapes_one_per_bucket():
    hist = LengthHistogram.from_lengths([10] * 100 + [60] * 100 + [200] * 3)
    knobs = Knobs(micro_batch_size=16, tokens_per_micro_batch=1024, bucket_boundaries=(16, 64, 256))
    assert worst_case_shapes(knobs, hist) == [(16, 16), (16, 64), (3, 200)]
    assert worst_case_shapes(Knobs(micro_batch_size=16), hist) == [(16, 200)]
    # Data longer than the last boundary still gets a (conservative) bucket of its own.
    assert worst_case_shapes(Knobs(micro_batch_size=4, bucket_boundaries=(16,)), hist) == [(4, 16), (4, 200)]


def test_worst_case_batches_say_which_buckets_can_hold_pad_tokens():
    hist = LengthHistogram.from_lengths([16] * 50 + [60] * 50 + [64] * 50)
    knobs = Knobs(micro_batch_size=8, bucket_boundaries=(16, 64))
    # the 16-token bucket holds one length, its padded length: no batch pads; the other mixes 60 and 64
    assert worst_case_batches(knobs, hist) == [(8, 16, False), (8, 64, True)]
    # a length padded up to a multiple of 8 always carries pad tokens
    assert worst_case_batches(Knobs(micro_batch_size=8), LengthHistogram.fixed(60, 100)) == [(8, 64, True)]


def test_expected_padded_max_matches_simulation():
    hist = LengthHistogram.from_lengths(skewed_lengths(500))
    rng, lengths = random.Random(1), [n for n, c in zip(hist.lengths, hist.counts) for _ in range(c)]
    simulated = sum(padded_length(max(rng.sample(lengths, 8)), 8) for _ in range(20000)) / 20000
    assert expected_padded_max(hist, 8, 8) == pytest.approx(simulated, rel=0.02)
    assert expected_padded_max(LengthHistogram.fixed(100, 10), 4, 8) == pytest.approx(104)
    assert expected_padded_max(hist, hist.num_samples, None) == pytest.approx(hist.max_length)


def test_expected_micro_batches_cover_every_example():
    hist = LengthHistogram.from_lengths(skewed_lengths())
    knobs = Knobs(micro_batch_size=32, tokens_per_micro_batch=2048, bucket_boundaries=choose_boundaries(hist, 4))
    batches = expected_micro_batches(knobs, hist)
    assert sum(b * n for b, _, n in batches) == hist.num_samples
    assert all(b * length <= 2048 * 1.01 for b, length, _ in batches)


def test_padding_efficiency_bucketing_beats_random():
    hist = LengthHistogram.from_lengths(skewed_lengths())
    plain = Knobs(micro_batch_size=32)
    bucketed = Knobs(micro_batch_size=32, bucket_boundaries=choose_boundaries(hist, 8))
    assert padding_efficiency(plain, hist) < 0.5 < padding_efficiency(bucketed, hist) <= 1.0
    assert padding_efficiency(Knobs(micro_batch_size=8, pad_to_multiple_of=None),
                              LengthHistogram.fixed(64, 100)) == pytest.approx(1.0)


def sampler_for(lengths, **kw):
    knobs = Knobs(micro_batch_size=32, tokens_per_micro_batch=2048,
                  bucket_boundaries=choose_boundaries(LengthHistogram.from_lengths(lengths), 6))
    return BucketBatchSampler(lengths, knobs, **kw)


def test_every_example_exactly_once_and_token_budget_holds():
    lengths = skewed_lengths()
    sampler = sampler_for(lengths)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert len(batches) == len(sampler)
    assert max(len(b) * padded_length(max(lengths[i] for i in b), 8) for b in batches) <= 2048
    no_buckets = BucketBatchSampler(lengths, Knobs(micro_batch_size=7))
    plain = list(no_buckets)
    assert sorted(i for b in plain for i in b) == list(range(len(lengths)))
    assert [len(b) for b in plain].count(7) == len(lengths) // 7


def test_drop_last_drops_partial_batches():
    lengths = [10] * 10 + [100] * 5
    knobs = Knobs(micro_batch_size=4, bucket_boundaries=(16, 128))
    batches = list(BucketBatchSampler(lengths, knobs, drop_last=True))
    assert all(len(b) == 4 for b in batches) and len(batches) == 3
    assert len(BucketBatchSampler(lengths, knobs, drop_last=True)) == 3


def test_epochs_differ_and_seed_reproduces():
    lengths = skewed_lengths()
    a, b = sampler_for(lengths, seed=3), sampler_for(lengths, seed=3)
    first = list(a)
    assert first == list(b)
    a.set_epoch(1)
    assert list(a) != first
    assert list(sampler_for(lengths, seed=4)) != first
    assert list(sampler_for(lengths, shuffle=False)) == list(sampler_for(lengths, shuffle=False, seed=9))


def test_resume_from_state_gives_the_remaining_batches():
    lengths = skewed_lengths()
    sampler = sampler_for(lengths, seed=5)
    sampler.set_epoch(2)
    full = sampler.epoch_batches(2)
    it = iter(sampler)
    seen = [next(it) for _ in range(7)]
    state = sampler.state_dict()
    assert seen == full[:7] and state["position"] == 7
    resumed = sampler_for(lengths, seed=5)
    resumed.load_state_dict(state)
    assert list(resumed) == full[7:]
    resumed.set_epoch(3)
    assert list(resumed) == sampler.epoch_batches(3)
    with pytest.raises(BucketingError):
        sampler_for(lengths, seed=6).load_state_dict(state)


def test_sampler_padding_efficiency_beats_random_batching():
    lengths = skewed_lengths()

    def efficiency(batches):
        computed = sum(len(b) * padded_length(max(lengths[i] for i in b), 8) for b in batches)
        return sum(lengths) / computed

    random_batches = list(BucketBatchSampler(lengths, Knobs(micro_batch_size=32)))
    bucketed = list(sampler_for(lengths))
    assert efficiency(bucketed) > 1.5 * efficiency(random_batches)


def test_sorted_eval_batches():
    lengths = [5, 1, 9, 3, 7]
    assert sorted_eval_batches(lengths, 2) == [[1, 3], [0, 4], [2]]
