"""Uniform dynamic padding: batch examples of similar length together (length buckets).

Trade-off: saves the compute and activation memory spent on pad tokens (a step's micro-batches pad only to
their bucket's lengths, and a token budget lets short buckets take more sequences per micro-batch); costs
step randomness (a step's examples are drawn within a bucket), which a per-epoch shuffle of every bucket
and of the step order keeps small. How a step is cut into micro-batches lives in accumulation.py.
"""

from __future__ import annotations

import random
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from autofit.knobs import Knobs
from autofit.workload import LengthHistogram


class BucketingError(ValueError):
    """Bad input to a bucketing function (e.g. no buckets asked for)."""


def padded_length(length: int, multiple: int | None) -> int:
    """`length` rounded up to a multiple of `multiple` (unchanged when multiple is None or 1)."""
    if not multiple or multiple <= 1:
        return length
    return -(-length // multiple) * multiple


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


def upper_lengths(lengths: Sequence[int], knobs: Knobs) -> dict[int, int]:
    """Bucket index -> padded length of that bucket's longest example in `lengths` (what `split_buckets`
    calls each bucket's upper length, keyed as `bucket_index` numbers them)."""
    uppers: dict[int, int] = {}
    for length in lengths:
        index = bucket_index(length, knobs.bucket_boundaries)
        uppers[index] = max(uppers.get(index, 0), padded_length(length, knobs.pad_to_multiple_of))
    return uppers


# ---- apply side: the sampler that draws each step's examples ----------------------------------------------


class StepSampler:
    """Train-safe steps of exactly `batch_size` examples, drawn to keep padding low.

    Each epoch shuffles every bucket and cuts it into full steps; the examples left over in each bucket
    are pooled in bucket order (so a pooled step spans neighbouring lengths) and cut into steps too. The
    steps are shuffled; the one short step of the epoch, if any, comes last (`drop_last` drops it). Without
    boundaries the whole data is one bucket: plain random steps. Reproducible: an epoch's steps depend only
    on (seed, epoch, lengths, boundaries); `state_dict` records the position inside the epoch, so a resumed
    run continues with exactly the remaining steps."""

    def __init__(self, lengths: Sequence[int], knobs: Knobs, batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = False):
        if not lengths:
            raise BucketingError("cannot draw steps from an empty dataset")
        if batch_size < 1:
            raise BucketingError(f"batch_size must be >= 1, not {batch_size}")
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.num_examples = len(lengths)
        self.epoch, self.position = 0, 0
        members: dict[int, list[int]] = {}
        for i, length in enumerate(lengths):
            members.setdefault(bucket_index(length, knobs.bucket_boundaries), []).append(i)
        self.buckets = [members[k] for k in sorted(members)]

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its first step (the DataLoader convention for reshuffling)."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def epoch_steps(self, epoch: int) -> list[list[int]]:
        """All steps of `epoch`, in order; a pure function of (seed, epoch, lengths, boundaries)."""
        rng = random.Random(f"autofit-steps-{self.seed}-{epoch}")  # str seeds hash stably across runs
        size, steps, leftover = self.batch_size, [], []
        for indices in self.buckets:
            order = list(indices)
            if self.shuffle:
                rng.shuffle(order)
            full = len(order) - len(order) % size
            steps += [order[start:start + size] for start in range(0, full, size)]
            leftover += order[full:]
        steps += [leftover[start:start + size] for start in range(0, len(leftover), size)]
        short = steps.pop() if steps and len(steps[-1]) < size else None
        if self.shuffle:
            rng.shuffle(steps)
        if short is not None and not self.drop_last:
            steps.append(short)
        return steps

    def __iter__(self) -> Iterator[list[int]]:
        steps = self.epoch_steps(self.epoch)
        while self.position < len(steps):
            self.position += 1
            yield steps[self.position - 1]
        self.position = 0  # a finished epoch restarts from its first step unless set_epoch moves on

    def __len__(self) -> int:
        full, rest = divmod(self.num_examples, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def state_dict(self, consumed: int | None = None) -> dict[str, int]:
        """Where the run is: `consumed`, the steps the loop actually trained this epoch (default: drawn)."""
        position = self.position if consumed is None else consumed
        return {"seed": self.seed, "epoch": self.epoch, "position": position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed:
            raise BucketingError(f"sampler state has seed {state['seed']}, this sampler {self.seed}")
        if not 0 <= state["position"] <= len(self):
            raise BucketingError(f"sampler position {state['position']} outside 0..{len(self)}")
        self.epoch, self.position = state["epoch"], state["position"]
