import pytest

from autofit.knobs import Knobs
from autofit.techniques.bucketing import BucketingError, bucket_index, choose_boundaries, padded_length, split_buckets
from autofit.workload import LengthHistogram


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


def test_split_buckets_by_boundaries_and_beyond():
    hist = LengthHistogram.from_lengths([3, 15, 20, 64, 70])
    buckets = split_buckets(hist, Knobs(bucket_boundaries=(16, 64)))
    assert [(b.hist.lengths, b.upper_length) for b in buckets] == [([3, 15], 16), ([20, 64], 64), ([70], 72)]
    assert [bucket_index(n, (16, 64)) for n in (3, 16, 17, 64, 65)] == [0, 0, 1, 1, 2]
