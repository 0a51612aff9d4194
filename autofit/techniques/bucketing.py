"""Uniform dynamic padding: batch examples of similar length together (length buckets).

Trade-off: saves the compute and activation memory spent on pad tokens (a batch pads only to its bucket's
longest example, and a token budget lets short buckets take more sequences); costs batch randomness
(batches are drawn within a bucket), which a per-epoch shuffle of buckets and batch order keeps small.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch.utils.data import Sampler

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


def micro_batch_size_for(length: int, knobs: Knobs) -> int:
    """Sequences in a micro-batch padded to `length`: micro_batch_size, capped by the token budget (>= 1)."""
    if knobs.tokens_per_micro_batch is None:
        return knobs.micro_batch_size
    return max(1, min(knobs.micro_batch_size, knobs.tokens_per_micro_batch // max(1, length)))


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


def worst_case_batches(knobs: Knobs, hist: LengthHistogram) -> list[tuple[int, int, bool]]:
    """(batch, padded length, can hold pad tokens) of the largest micro-batch each bucket can form; memory
    is the max over them. Pad tokens are ruled out only for a bucket whose examples all have its padded
    length (models skip the attention mask for batches without padding)."""
    batches = []
    for bucket in split_buckets(hist, knobs):
        batch = min(micro_batch_size_for(bucket.upper_length, knobs), bucket.hist.num_samples)
        batches.append((batch, bucket.upper_length, bucket.hist.lengths != [bucket.upper_length]))
    return batches


def expected_padded_max(hist: LengthHistogram, batch: int, multiple: int | None) -> float:
    """E[padded length of the longest of `batch` examples drawn without replacement from `hist`]."""
    n = hist.num_samples
    batch = min(batch, n)
    expected, below, prev_cdf = 0.0, 0, 0.0
    for length, count in zip(hist.lengths, hist.counts):
        below += count
        # P(all `batch` draws are among the `below` shortest) = C(below, batch) / C(n, batch).
        cdf = 0.0 if below < batch else math.exp(_log_choose(below, batch) - _log_choose(n, batch))
        expected += padded_length(length, multiple) * (cdf - prev_cdf)
        prev_cdf = cdf
    return expected


def _log_choose(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def expected_micro_batches(knobs: Knobs, hist: LengthHistogram) -> list[tuple[int, int, float]]:
    """(batch, expected padded length, micro-batches of that kind per epoch): the time model's input.

    Each bucket yields full batches plus one partial batch of the remainder; a random batch pads to the
    expected padded maximum of its lengths (the bucket's, or the whole data's without bucketing). The
    expected length is rounded to the nearest integer; `padding_efficiency` uses the exact value."""
    return [(b, round(length), count) for b, length, count in _expected_batches(knobs, hist)]


def _expected_batches(knobs: Knobs, hist: LengthHistogram) -> list[tuple[int, float, float]]:
    batches = []
    for bucket in split_buckets(hist, knobs):
        size = micro_batch_size_for(bucket.upper_length, knobs)
        full, rest = divmod(bucket.hist.num_samples, size)
        for batch, count in ((size, full), (rest, 1)):
            if batch and count:
                length = expected_padded_max(bucket.hist, batch, knobs.pad_to_multiple_of)
                batches.append((batch, length, float(count)))
    return batches


def padding_efficiency(knobs: Knobs, hist: LengthHistogram) -> float:
    """Real tokens / computed (padded) tokens, expected over an epoch of random batches."""
    computed = sum(batch * length * count for batch, length, count in _expected_batches(knobs, hist))
    return hist.num_tokens / computed


# ---- apply side: the batch sampler the executor's DataLoader uses ---------------------------------------


class BucketBatchSampler(Sampler[list[int]]):
    """Train-safe bucketed batches: each epoch shuffles within buckets and the order of all batches.

    A bucket's batch size is `micro_batch_size_for(its padded longest length)`, so the token budget
    holds for every batch. Without boundaries it yields plain random batches over the whole data.
    Reproducible: the order depends only on (seed, epoch); `state_dict` records the position inside
    the epoch so a resumed run continues with exactly the remaining batches."""

    def __init__(self, lengths: Sequence[int], knobs: Knobs, *, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False):
        if not lengths:
            raise BucketingError("cannot batch an empty dataset")
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch, self.position = 0, 0
        buckets = split_buckets(LengthHistogram.from_lengths(lengths), knobs)
        upper = {bucket_index(b.hist.max_length, knobs.bucket_boundaries): b.upper_length for b in buckets}
        members: dict[int, list[int]] = {}
        for i, length in enumerate(lengths):
            members.setdefault(bucket_index(length, knobs.bucket_boundaries), []).append(i)
        # (indices, batch size) per bucket, in bucket order.
        self.buckets = [(members[k], micro_batch_size_for(upper[k], knobs)) for k in sorted(members)]

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its first batch (the DataLoader convention for reshuffling)."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches of `epoch`, in order; a pure function of (seed, epoch, lengths, knobs)."""
        rng = random.Random(self.seed * 1_000_003 + epoch)
        batches = []
        for indices, size in self.buckets:
            order = list(indices)
            if self.shuffle:
                rng.shuffle(order)
            for start in range(0, len(order), size):
                batch = order[start:start + size]
                if len(batch) == size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.epoch_batches(self.epoch)
        while self.position < len(batches):
            self.position += 1
            yield batches[self.position - 1]
        self.position = 0  # a finished epoch restarts from its first batch unless set_epoch moves on

    def __len__(self) -> int:
        count = (len(ix) // size if self.drop_last else -(-len(ix) // size) for ix, size in self.buckets)
        return sum(count)

    def state_dict(self, consumed: int | None = None) -> dict[str, int]:
        """Where the run is. With DataLoader workers the sampler runs ahead of the training loop: pass
        `consumed`, the batches the loop actually trained on this epoch."""
        position = self.position if consumed is None else consumed
        return {"seed": self.seed, "epoch": self.epoch, "position": position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed:
            raise BucketingError(f"sampler state has seed {state['seed']}, this sampler {self.seed}")
        if not 0 <= state["position"] <= len(self):
            raise BucketingError(f"sampler position {state['position']} outside 0..{len(self)}")
        self.epoch, self.position = state["epoch"], state["position"]


def sorted_eval_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Evaluation batches of examples sorted by length, so each batch pads almost nothing."""
    if batch_size < 1:
        raise BucketingError(f"batch_size must be >= 1, not {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
