import random

import pytest

from autofit.knobs import Knobs
from autofit.techniques.accumulation import cut_step
from autofit.techniques.bucketing import (
    BucketingError,
    StepSampler,
    bucket_index,
    choose_boundaries,
    padded_length,
    upper_lengths,
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


def test_upper_lengths_per_bucket():
    knobs = Knobs(bucket_boundaries=(16, 64))
    assert upper_lengths([3, 15, 20, 64, 70], knobs) == {0: 16, 1: 64, 2: 72}
    assert upper_lengths([3, 15], Knobs(pad_to_multiple_of=None)) == {0: 15}


def sampler_for(lengths, batch_size=32, **kw):
    knobs = Knobs(micro_batch_size=32, tokens_per_micro_batch=2048,
                  bucket_boundaries=choose_boundaries(LengthHistogram.from_lengths(lengths), 6))
    return StepSampler(lengths, knobs, batch_size, **kw)


def test_every_step_holds_the_batch_and_every_example_comes_once():
    lengths = skewed_lengths()  # 2000 examples: 62 full steps of 32 and a short one of 16
    sampler = sampler_for(lengths)
    steps = list(sampler)
    assert sorted(i for step in steps for i in step) == list(range(len(lengths)))
    assert [len(step) for step in steps] == [32] * 62 + [16]  # only the epoch's last step is short
    assert len(steps) == len(sampler) == 63
    plain = list(StepSampler(lengths, Knobs(micro_batch_size=7), 24))
    assert [len(step) for step in plain] == [24] * 83 + [8]


def test_steps_stay_within_a_bucket_where_they_can():
    lengths = skewed_lengths()
    knobs = Knobs(bucket_boundaries=choose_boundaries(LengthHistogram.from_lengths(lengths), 6))
    steps = StepSampler(lengths, knobs, 32).epoch_steps(0)
    spans = [len({bucket_index(lengths[i], knobs.bucket_boundaries) for i in step}) for step in steps]
    # each bucket's leftovers are pooled in bucket order: only those few steps span two or more buckets
    assert sum(span > 1 for span in spans) <= len(knobs.bucket_boundaries) - 1
    assert spans.count(1) >= len(steps) - len(knobs.bucket_boundaries)


def test_drop_last_drops_the_short_step():
    lengths = [10] * 10 + [100] * 5
    knobs = Knobs(micro_batch_size=4, bucket_boundaries=(16, 128))
    sampler = StepSampler(lengths, knobs, 4, drop_last=True)
    steps = list(sampler)
    assert [len(s) for s in steps] == [4, 4, 4] and len(sampler) == 3


def test_epochs_differ_and_seed_reproduces():
    lengths = skewed_lengths()
    a, b = sampler_for(lengths, seed=3), sampler_for(lengths, seed=3)
    first = list(a)
    assert first == list(b)
    a.set_epoch(1)
    assert list(a) != first
    assert list(sampler_for(lengths, seed=4)) != first
    assert list(sampler_for(lengths, shuffle=False)) == list(sampler_for(lengths, shuffle=False, seed=9))


def test_resume_from_state_gives_the_remaining_steps():
    lengths = skewed_lengths()
    sampler = sampler_for(lengths, seed=5)
    sampler.set_epoch(2)
    full = sampler.epoch_steps(2)
    it = iter(sampler)
    seen = [next(it) for _ in range(7)]
    state = sampler.state_dict()
    assert seen == full[:7] and state["position"] == 7
    resumed = sampler_for(lengths, seed=5)
    resumed.load_state_dict(state)
    assert list(resumed) == full[7:]
    resumed.set_epoch(3)
    assert list(resumed) == sampler.epoch_steps(3)
    with pytest.raises(BucketingError):
        sampler_for(lengths, seed=6).load_state_dict(state)


def test_bucketed_steps_pad_less_than_random_steps():
    lengths = skewed_lengths()
    knobs = Knobs(micro_batch_size=8, bucket_boundaries=choose_boundaries(LengthHistogram.from_lengths(lengths), 6))

    def efficiency(sampler_knobs):
        uppers = upper_lengths(lengths, sampler_knobs)
        steps = StepSampler(lengths, sampler_knobs, 32).epoch_steps(0)
        pieces = [p for step in steps for p in cut_step(step, lengths, sampler_knobs, uppers)]
        return sum(lengths) / sum(len(p) * padded_length(max(lengths[i] for i in p), 8) for p in pieces)

    assert efficiency(knobs) > 1.3 * efficiency(Knobs(micro_batch_size=8))
