"""Gradient accumulation: an optimizer step trains the whole effective batch, cut into micro-batches.

A step is made of examples, not micro-batches: it always holds `batch_size` examples (only an epoch's last
step may be short), drawn by the sampler (techniques/bucketing.py) from one length bucket where it can. Its
examples are sorted by length and cut, bucket by bucket, into micro-batches under the knobs' caps: at most
`micro_batch_size` sequences and, with a token budget, at most `tokens_per_micro_batch` padded tokens. So
the number of micro-batches per step follows from the caps: a long bucket needs more of them. The loss of
each micro-batch is weighted by its share of the step's units (examples, or label tokens), so the summed
gradient is exactly the big batch's gradient.

Trade-off: saves activation memory (only one micro-batch is live, the effective batch is unchanged); costs
device efficiency, since smaller micro-batches use it less well and run one after another.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field

from autofit.knobs import Knobs
from autofit.techniques.bucketing import bucket_index, padded_length, split_buckets
from autofit.workload import TOKEN_LEVEL_TASKS, LengthHistogram

IGNORE_INDEX = -100
"""Label value excluded from token-level losses (transformers' and torch's cross-entropy default)."""



class AccumulationError(ValueError):
    """Bad accumulation input (non-positive sizes, a step without units)."""


# ---- pure side: how a step is cut -------------------------------------------------------------------------


def micro_batch_size_for(length: int, knobs: Knobs) -> int:
    """Sequences in a micro-batch padded to `length`: micro_batch_size, capped by the token budget (>= 1)."""
    if knobs.tokens_per_micro_batch is None:
        return knobs.micro_batch_size
    return max(1, min(knobs.micro_batch_size, knobs.tokens_per_micro_batch // max(1, length)))


class BucketSteps(BaseModel):
    """How the steps drawn from one length bucket run."""

    upper_length: int = Field(ge=1)
    """Padded length of the bucket's longest example: none of its micro-batches pads beyond it."""
    examples: int = Field(ge=1)
    """Examples of the data in this bucket."""
    micro_batch_size: int = Field(ge=1)
    """Sequences per micro-batch in this bucket (the knobs' caps at `upper_length`)."""
    micro_batches_per_step: int = Field(ge=1)
    """Micro-batches of a full step drawn from this bucket (its gradient-accumulation steps)."""
    padded: bool
    """Whether its micro-batches can hold pad tokens (False when every example has the padded length)."""
    grads_held: bool
    """Whether gradients of earlier micro-batches of the same step can be live while it runs."""


class StepLayout(BaseModel):
    """An optimizer step as it runs: the effective batch, and each bucket's micro-batches."""

    batch_size: int = Field(ge=1)
    """Examples per optimizer step (the effective batch); only an epoch's last step may hold fewer."""
    steps_per_epoch: int = Field(ge=1)
    buckets: list[BucketSteps]

    @property
    def micro_batches_per_step(self) -> tuple[int, int]:
        """(fewest, most) micro-batches of a full step, over the buckets."""
        counts = [b.micro_batches_per_step for b in self.buckets]
        return min(counts), max(counts)


def step_layout(knobs: Knobs, hist: LengthHistogram, batch_size: int) -> StepLayout:
    """The step of `batch_size` examples that `knobs` make of data with lengths `hist`."""
    if batch_size < 1:
        raise AccumulationError(f"batch_size must be >= 1, not {batch_size}")
    buckets, earlier_rest = [], False
    for bucket in split_buckets(hist, knobs):
        n = bucket.hist.num_samples
        size = min(micro_batch_size_for(bucket.upper_length, knobs), batch_size)
        per_step = -(-min(batch_size, n) // size)
        rest = n % batch_size
        # An epoch's leftover examples of every bucket are pooled into mixed steps, in bucket order: there a
        # bucket's micro-batches can follow a shorter bucket's, whose gradients are then live.
        buckets.append(BucketSteps(upper_length=bucket.upper_length, examples=n, micro_batch_size=min(size, n),
                                   micro_batches_per_step=per_step,
                                   padded=bucket.hist.lengths != [bucket.upper_length],
                                   grads_held=per_step > 1 or (rest > 0 and earlier_rest)))
        earlier_rest = earlier_rest or rest > 0
    return StepLayout(batch_size=batch_size, steps_per_epoch=-(-hist.num_samples // batch_size), buckets=buckets)


class MicroBatchShape(BaseModel):
    """One micro-batch shape the memory model must check: the largest a bucket forms."""

    batch: int
    length: int
    padded: bool
    """Whether it can hold pad tokens (models skip their attention mask for a batch without any)."""
    grads_held: bool


def memory_shapes(knobs: Knobs, hist: LengthHistogram, batch_size: int) -> list[MicroBatchShape]:
    """The largest micro-batch of every bucket. A bucket of one sequence per micro-batch pads only the
    examples whose length is no multiple of the padding: its longest unpadded example and its longest
    padded one are checked apart (truncated data puts many examples exactly at the cap)."""
    shapes = []
    for bucket, steps in zip(split_buckets(hist, knobs), step_layout(knobs, hist, batch_size).buckets):
        if steps.micro_batch_size > 1 or not steps.padded:
            shapes.append(MicroBatchShape(batch=steps.micro_batch_size, length=steps.upper_length,
                                          padded=steps.padded, grads_held=steps.grads_held))
            continue
        multiple = knobs.pad_to_multiple_of
        exact = [n for n in bucket.hist.lengths if padded_length(n, multiple) == n]
        uneven = [n for n in bucket.hist.lengths if padded_length(n, multiple) != n]
        if exact:
            shapes.append(MicroBatchShape(batch=1, length=max(exact), padded=False, grads_held=steps.grads_held))
        if uneven:
            shapes.append(MicroBatchShape(batch=1, length=padded_length(max(uneven), multiple), padded=True,
                                          grads_held=steps.grads_held))
    return shapes


def epoch_micro_batches(knobs: Knobs, hist: LengthHistogram,
                        batch_size: int) -> list[tuple[int, float, float]]:
    """(sequences, expected padded length, how many per epoch) of the micro-batches an epoch runs: the time
    model's input. Full steps draw `batch_size` examples from a bucket; its leftover examples run as one
    smaller group. Each group is sorted and cut into micro-batches, so the j-th pads to an order statistic."""
    result = []
    for bucket in split_buckets(hist, knobs):
        n = bucket.hist.num_samples
        size = min(micro_batch_size_for(bucket.upper_length, knobs), batch_size)
        full, rest = divmod(n, batch_size)
        for group, count in ((batch_size, full), (rest, 1)):
            if group and count:
                lengths = expected_chunk_lengths(bucket.hist, group, size, knobs.pad_to_multiple_of)
                sizes = [size] * (len(lengths) - 1) + [group - size * (len(lengths) - 1)]
                result += [(b, length, float(count)) for b, length in zip(sizes, lengths)]
    return result


def padding_efficiency(knobs: Knobs, hist: LengthHistogram, batch_size: int) -> float:
    """Real tokens / computed (padded) tokens, expected over an epoch of random steps."""
    computed = sum(b * length * count for b, length, count in epoch_micro_batches(knobs, hist, batch_size))
    return hist.num_tokens / computed


def expected_chunk_lengths(hist: LengthHistogram, n: int, chunk: int, multiple: int | None) -> list[float]:
    """Expected padded length of each micro-batch when `n` examples drawn at random (without replacement)
    from `hist` are sorted by length and cut into micro-batches of `chunk`: the j-th pads to the
    min((j+1) x chunk, n)-th shortest of the draws.

    P(r-th shortest <= L) = P(at least r of the n draws are among the K(L) examples no longer than L), a
    hypergeometric tail, computed in log space for every length at once."""
    total = hist.num_samples
    n = min(n, total)
    if n < 1 or chunk < 1:
        raise AccumulationError(f"need n >= 1 and chunk >= 1, got {n} and {chunk}")
    log_fact = _log_factorials(total)
    shorter = np.cumsum(hist.counts)[:, None]  # K(L) for each length L
    draws = np.arange(n + 1)[None, :]  # i of the n draws among the K(L) shortest
    valid = (draws <= shorter) & (n - draws <= total - shorter)
    log_p = (log_fact[shorter] - log_fact[draws] - log_fact[np.maximum(shorter - draws, 0)]
             + log_fact[total - shorter] - log_fact[n - draws]
             - log_fact[np.maximum(total - shorter - n + draws, 0)]
             - (log_fact[total] - log_fact[n] - log_fact[total - n]))
    p = np.where(valid, np.exp(np.where(valid, log_p, 0.0)), 0.0)
    at_least = np.cumsum(p[:, ::-1], axis=1)[:, ::-1]  # [L, r] = P(at least r draws <= L)
    ranks = [min((j + 1) * chunk, n) for j in range(-(-n // chunk))]
    cdf = at_least[:, ranks]
    pmf = np.diff(cdf, axis=0, prepend=0.0)
    padded = np.array([padded_length(length, multiple) for length in hist.lengths], dtype=float)[:, None]
    return [float(x) for x in (padded * pmf).sum(axis=0)]


@lru_cache(maxsize=8)
def _log_factorials(n: int) -> np.ndarray:
    """log(k!) for k = 0..n."""
    return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=float)))])


# ---- apply side: cut a step, weight its losses -------------------------------------------------------------


def cut_step(step: Sequence[int], lengths: Sequence[int], knobs: Knobs,
             upper_lengths: Mapping[int, int]) -> list[list[int]]:
    """The micro-batches of one step: its examples sorted by (bucket, length), each bucket's run cut into
    micro-batches of the cap at that bucket's padded upper length (`upper_lengths`, by bucket index).

    A micro-batch never mixes buckets, so each is no larger than the shape the memory model checks for its
    bucket, and a bucket whose examples all have one length stays free of pad tokens."""
    def bucket(i: int) -> int:
        return bucket_index(lengths[i], knobs.bucket_boundaries)

    pieces: list[list[int]] = []
    current: list[int] = []
    for i in sorted(step, key=lambda i: (bucket(i), lengths[i], i)):
        size = micro_batch_size_for(upper_lengths[bucket(i)], knobs)
        if current and (bucket(current[0]) != bucket(i) or len(current) >= size):
            pieces.append(current)
            current = []
        current.append(i)
    if current:
        pieces.append(current)
    return pieces


def eval_micro_batches(lengths: Sequence[int], knobs: Knobs, max_tokens: int) -> list[list[int]]:
    """Evaluation micro-batches under the plan's caps: examples sorted by length, each micro-batch as large
    as the caps at its padded length allow and never more than `max_tokens` padded tokens (the largest
    training micro-batch), so evaluation stays within the memory the plan checked."""
    pieces: list[list[int]] = []
    current: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (lengths[i], i)):
        width = padded_length(lengths[i], knobs.pad_to_multiple_of)
        size = max(1, min(micro_batch_size_for(width, knobs), max_tokens // width))
        if current and len(current) >= size:
            pieces.append(current)
            current = []
        current.append(i)
    if current:
        pieces.append(current)
    return pieces


def count_units(batch: Mapping[str, Any], task: str) -> int:
    """What the task's loss averages over: samples, or non-ignored label tokens for token-level tasks.

    Causal-LM losses shift labels by one (token t predicts t+1), so the first label of a row never counts."""
    if task not in TOKEN_LEVEL_TASKS:
        first = batch.get("labels", batch.get("input_ids"))
        if first is None:
            raise AccumulationError("batch has neither labels nor input_ids to count samples from")
        return len(first)
    labels = batch.get("labels")
    if labels is None:
        raise AccumulationError(f"a {task} batch needs token labels to count")
    labels = torch.as_tensor(labels)
    if task == "causal-lm":
        labels = labels[..., 1:]
    return int((labels != IGNORE_INDEX).sum())


def step_units(batches: Iterable[Mapping[str, Any]], task: str) -> int:
    """Units in a whole step (collate the step's micro-batches first, then weight each)."""
    return sum(count_units(batch, task) for batch in batches)


def loss_scale(micro_count: int, step_count: int) -> float:
    """Weight of a micro-batch's mean loss so the summed gradients equal the gradient of the step's mean.

    sum_i (n_i / N) * mean_i = (1/N) * sum of all per-unit losses: exact for uneven micro-batches, where
    the usual 1/accumulation_steps scaling over-weights small ones. A micro-batch with no units has a NaN
    mean loss: skip its backward rather than scale it by 0."""
    if step_count < 1:
        raise AccumulationError(f"an optimizer step must hold at least one unit, got {step_count}")
    if not 0 <= micro_count <= step_count:
        raise AccumulationError(f"micro-batch count {micro_count} outside 0..{step_count}")
    return micro_count / step_count


def steps_per_epoch(num_examples: int, batch_size: int, drop_last: bool = False) -> int:
    """Optimizer steps of an epoch: full steps of `batch_size`, plus the short last one unless dropped."""
    if batch_size < 1:
        raise AccumulationError(f"batch_size must be >= 1, not {batch_size}")
    return num_examples // batch_size if drop_last else math.ceil(num_examples / batch_size)
