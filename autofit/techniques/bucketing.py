"""Uniform dynamic padding: batch examples of similar length together (length buckets).

Trade-off: saves the compute and activation memory spent on pad tokens: a step's examples are sorted and
cut into micro-batches whose caps follow their bucket's length, so with a token budget short examples run
many to a micro-batch and long ones few, each micro-batch padding little. Costs more micro-batches per step
(each runs less efficiently on the device). It costs no randomness: steps are drawn at random whatever the
buckets; how a step is drawn and cut lives in accumulation.py.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

from autofit.intmath import round_up
from autofit.knobs import Knobs
from autofit.workload import LengthHistogram


class BucketingError(ValueError):
    """Bad input to a bucketing function (e.g. no buckets asked for)."""


def padded_length(length: int, multiple: int | None) -> int:
    """`length` rounded up to a multiple of `multiple` (unchanged when multiple is None or 1)."""
    if not multiple or multiple <= 1:
        return length
    return round_up(length, multiple)


def choose_boundaries(hist: LengthHistogram, num_buckets: int, multiple: int | None = 8) -> tuple[int, ...]:
    """Upper lengths of `num_buckets` equal-count buckets (quantiles, padded); the last is the padded max."""
    if num_buckets < 1:
        raise BucketingError(f"num_buckets must be >= 1, not {num_buckets}")
    bounds = {padded_length(hist.quantile(i / num_buckets), multiple) for i in range(1, num_buckets)}
    bounds.add(padded_length(hist.max_length, multiple))
    return tuple(sorted(bounds))


def bucket_index(length: int, boundaries: tuple[int, ...]) -> int:
    """Index of the first bucket whose upper length holds `length`; len(boundaries) means beyond the last."""
    return bisect_left(boundaries, length)


@dataclass(frozen=True)
class Bucket:
    """The examples of one length bucket, as a histogram, and the padded length its batches never exceed."""

    hist: LengthHistogram
    upper_length: int
    """Padded length of the bucket's longest example: every batch drawn from it pads to at most this."""


def split_buckets(hist: LengthHistogram, knobs: Knobs) -> list[Bucket]:
    """Split the data into the knobs' non-empty buckets (one bucket when there are no boundaries).

    Examples longer than the last boundary (data unlike the data planned for) form one extra bucket."""
    groups: dict[int, tuple[list[int], list[int]]] = {}
    for length, count in zip(hist.lengths, hist.counts):
        lengths, counts = groups.setdefault(bucket_index(length, knobs.bucket_boundaries), ([], []))
        lengths.append(length)
        counts.append(count)
    buckets = []
    for index in sorted(groups):
        lengths, counts = groups[index]
        part = LengthHistogram(lengths=lengths, counts=counts)
        buckets.append(Bucket(part, padded_length(part.max_length, knobs.pad_to_multiple_of)))
    return buckets
