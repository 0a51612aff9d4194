"""Gradient accumulation: an optimizer step trains the whole effective batch, cut into micro-batches.

A step is made of examples, not micro-batches: it always holds `batch_size` examples drawn at random, as a
plain training loop draws them (only an epoch's last step may be short). Its examples are sorted by length,
longest first, and cut into micro-batches under the knobs' caps: at most `micro_batch_size` sequences and,
with a token budget, at most `tokens_per_micro_batch` tokens at the padded upper length of the length bucket
of the micro-batch's longest example. So long examples go a few at a time, short ones share large
micro-batches, and each micro-batch pads little; the number of micro-batches per step follows from the
step's lengths. Each micro-batch's loss is weighted by its share of the step (loss_weighting.py), so the
summed gradient is exactly the big batch's gradient: length bucketing changes how a step is computed, never
which examples train together.

With several processes a step's examples are dealt out first (`deal_step`): sorted by length, longest first,
the p-th of every `processes` goes to process p, so each process gets the same share of long and short
examples (at most ceil(batch_size / processes)) and cuts its share as above. Every process's micro-batches
are those of a one-process step of that per-process batch: the memory model checks that batch.

Trade-off: saves activation memory (only one micro-batch is live, the effective batch is unchanged); costs
device efficiency, since smaller micro-batches use it less well and run one after another.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache

from pydantic import BaseModel, Field

from autofit.knobs import Knobs
from autofit.intmath import ceil_div
from autofit.techniques.bucketing import bucket_index, padded_length, split_buckets
from autofit.workload import LengthHistogram

SIMULATED_STEPS = 200
"""Random steps drawn to estimate an epoch's micro-batches: enough that the time model's counts settle within
a few percent, few enough to take milliseconds."""


class AccumulationError(ValueError):
    """Bad accumulation input (non-positive sizes, a step without units)."""


# ---- pure side: how a step is cut -------------------------------------------------------------------------


def micro_batch_size_for(length: int, knobs: Knobs) -> int:
    """Sequences in a micro-batch padded to `length`: micro_batch_size, capped by the token budget (>= 1)."""
    if knobs.tokens_per_micro_batch is None:
        return knobs.micro_batch_size
    return max(1, min(knobs.micro_batch_size, knobs.tokens_per_micro_batch // max(1, length)))


class BucketSteps(BaseModel):
    """The micro-batches topped by a length bucket's examples."""

    upper_length: int = Field(ge=1)
    """Padded length of the bucket's longest example: no micro-batch it tops pads beyond it."""
    examples: int = Field(ge=1)
    """Examples of the data in this bucket."""
    micro_batch_size: int = Field(ge=1)
    """Most sequences of a micro-batch whose longest example is in this bucket: the knobs' caps at
    `upper_length`, and no more than a step or the examples that can join it hold."""
    padded: bool
    """Whether its micro-batches can hold pad tokens (False when every example has the padded length)."""
    grads_held: bool
    """Whether gradients of earlier micro-batches of the same step can be live while its largest runs (only
    when the step may hold longer examples: micro-batches run longest first)."""
    later_length: int | None = None
    """The longest padded length of a micro-batch that follows one of the same bucket in a step, with the
    gradients of that one live; None when a step never holds more of its examples than one micro-batch takes."""


class StepLayout(BaseModel):
    """An optimizer step as it runs: the effective batch, each bucket's micro-batches, how many per step."""

    batch_size: int = Field(ge=1)
    """Examples per optimizer step (the effective batch); only an epoch's last step may hold fewer."""
    processes: int = Field(1, ge=1)
    """Processes the step's examples are dealt to (`deal_step`); the buckets and micro-batch counts below are
    one process's, for its share of at most `process_batch_size` examples."""
    process_batch_size: int = Field(1, ge=1)
    steps_per_epoch: int = Field(ge=1)
    buckets: list[BucketSteps]
    micro_batches_per_step: tuple[int, int]
    """(fewest, most) micro-batches one process's share of a full step ran in, over simulated random steps."""
    mean_micro_batches_per_step: float = Field(ge=1)


def process_batch_size(batch_size: int, processes: int = 1) -> int:
    """Most examples of a step one of `processes` trains (`deal_step` gives out at most this many)."""
    if not 1 <= processes <= batch_size:
        raise AccumulationError(f"a step of {batch_size} examples cannot give each of {processes} processes one")
    return ceil_div(batch_size, processes)


def step_layout(knobs: Knobs, hist: LengthHistogram, batch_size: int, processes: int = 1) -> StepLayout:
    """The step of `batch_size` random examples that `knobs` make of data with lengths `hist`, as each of
    `processes` runs its share of it."""
    if batch_size < 1:
        raise AccumulationError(f"batch_size must be >= 1, not {batch_size}")
    total, batch_size = batch_size, process_batch_size(batch_size, processes)
    parts = split_buckets(hist, knobs)
    sizes = [b.hist.num_samples for b in parts]
    exact = [b.hist.lengths == [b.upper_length] for b in parts]
    buckets = []
    for k, bucket in enumerate(parts):
        cap = min(micro_batch_size_for(bucket.upper_length, knobs), batch_size)
        # shorter examples fill its micro-batches, unless they or it must stay free of pad tokens
        joining = sizes[k] + (0 if exact[k] else sum(n for n, e in zip(sizes[:k], exact[:k]) if not e))
        # micro-batches run longest first: its largest follows another one of its step only when longer
        # examples may be in the step; a second one of its own follows the first, at a shorter length
        later = None
        if min(batch_size, sizes[k]) > cap:  # the (cap+1)-th longest can open a second micro-batch
            longest_first = [n for n, c in zip(reversed(bucket.hist.lengths), reversed(bucket.hist.counts))
                             for _ in range(c)]
            later = padded_length(longest_first[cap], knobs.pad_to_multiple_of)
        buckets.append(BucketSteps(upper_length=bucket.upper_length, examples=sizes[k],
                                   micro_batch_size=min(cap, joining), padded=not exact[k],
                                   grads_held=sum(sizes[k + 1:]) > 0, later_length=later))
    counts = [count for _, _, count in _simulated_steps(knobs, hist, batch_size)[1]]
    return StepLayout(batch_size=total, processes=processes, process_batch_size=batch_size,
                      steps_per_epoch=steps_per_epoch(hist.num_samples, total),
                      buckets=buckets, micro_batches_per_step=(min(counts), max(counts)),
                      mean_micro_batches_per_step=sum(counts) / len(counts))


class MicroBatchShape(BaseModel):
    """One micro-batch shape the memory model must check: the largest a bucket tops."""

    batch: int
    length: int
    padded: bool
    """Whether it can hold pad tokens (models skip their attention mask for a batch without any)."""
    grads_held: bool


def memory_shapes(knobs: Knobs, hist: LengthHistogram, batch_size: int) -> list[MicroBatchShape]:
    """The largest micro-batch of every bucket, and the largest that follows another of the same bucket in a
    step (with its gradients live). A bucket of one sequence per micro-batch pads only the examples whose
    length is no multiple of the padding: its longest unpadded example and its longest padded one are
    checked apart (truncated data puts many examples exactly at the cap)."""
    shapes = []
    for bucket, steps in zip(split_buckets(hist, knobs), step_layout(knobs, hist, batch_size).buckets):
        first = steps.micro_batch_size
        if steps.later_length is not None:  # the first took `first` of the step's examples: the rest follow
            shapes.append(MicroBatchShape(batch=min(first, batch_size - first), length=steps.later_length,
                                          padded=steps.padded, grads_held=True))
        if first > 1 or not steps.padded:
            shapes += [MicroBatchShape(batch=n, length=steps.upper_length, padded=steps.padded, grads_held=held)
                       for n, held in _first_micro_batches(first, steps.grads_held, batch_size)]
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


def _first_micro_batches(size: int, grads_held: bool, batch_size: int) -> list[tuple[int, bool]]:
    """(sequences, gradients live) of a bucket's largest micro-batch: gradients are live only when a longer
    example of the step ran first, and that example is one of the step's `batch_size`."""
    if not grads_held or size < batch_size:
        return [(size, grads_held)]
    return [(size, False)] + ([(batch_size - 1, True)] if batch_size > 1 else [])


def epoch_micro_batches(knobs: Knobs, hist: LengthHistogram,
                        batch_size: int) -> list[tuple[int, float, float]]:
    """(sequences, padded length, how many per epoch) of the micro-batches an epoch runs, one entry per bucket
    topping them: the time model's input. From simulated random steps cut as `cut_step` cuts them; each
    entry keeps its micro-batches' count and padded tokens (sequences x length) exactly."""
    return list(_simulated_steps(knobs, hist, batch_size)[0])


def padding_efficiency(knobs: Knobs, hist: LengthHistogram, batch_size: int) -> float:
    """Real tokens / computed (padded) tokens, expected over an epoch of random steps: both counted on the
    same simulated steps, so sampling noise cannot push it over 1."""
    micro_batches, steps = _simulated_steps(knobs, hist, batch_size)
    computed = sum(b * length * count for b, length, count in micro_batches)
    real = sum(tokens for _, tokens, _ in steps) * sum(count for _, _, count in micro_batches) \
        / sum(pieces for _, _, pieces in steps)
    return real / computed


def _simulated_steps(knobs: Knobs, hist: LengthHistogram, batch_size: int):
    return _simulate(tuple(hist.lengths), tuple(hist.counts), batch_size, knobs.micro_batch_size,
                     knobs.tokens_per_micro_batch, knobs.bucket_boundaries, knobs.pad_to_multiple_of)


@lru_cache(maxsize=1024)
def _simulate(lengths: tuple[int, ...], counts: tuple[int, ...], batch_size: int, micro_batch: int,
              tokens: int | None, boundaries: tuple[int, ...], pad: int | None):
    """(per topping bucket: (sequences a micro-batch, padded length, micro-batches an epoch); per simulated
    step: (examples, tokens, micro-batches)) of SIMULATED_STEPS random full steps, cut as the executor cuts
    them. Seeded, so a plan is reproducible; cached, as a search asks for each batching many times."""
    knobs = Knobs(micro_batch_size=micro_batch, tokens_per_micro_batch=tokens, bucket_boundaries=boundaries,
                  pad_to_multiple_of=pad)
    population = [n for n, c in zip(lengths, counts) for _ in range(c)]
    uppers, exact = bucket_uppers(population, knobs)
    rng, size = random.Random(0), min(batch_size, len(population))
    totals: dict[int, list[int]] = {}  # topping bucket -> [micro-batches, sequences, padded tokens]
    per_step = []
    for _ in range(SIMULATED_STEPS):
        drawn = rng.sample(population, size)
        pieces = cut_step(range(size), drawn, knobs, uppers, exact)
        per_step.append((size, sum(drawn), len(pieces)))
        for piece in pieces:
            longest = max(drawn[i] for i in piece)
            entry = totals.setdefault(bucket_index(longest, boundaries), [0, 0, 0])
            entry[0] += 1
            entry[1] += len(piece)
            entry[2] += len(piece) * padded_length(longest, pad)
    # micro-batches of a simulated step -> an epoch's: steps of `size` examples (the whole data when it is
    # smaller than a step) cover an epoch
    per_epoch = (sum(counts) / size) / SIMULATED_STEPS
    shapes = tuple((seqs / count, padded / seqs, count * per_epoch)
                   for count, seqs, padded in (totals[k] for k in sorted(totals)))
    return shapes, tuple(per_step)


# ---- apply side: draw a step, cut it -------------------------------------------------------------


class StepSampler:
    """Train-safe steps of exactly `batch_size` examples: each epoch is a fresh random order of all examples,
    cut into steps, as a plain training loop draws its batches; only the epoch's last step may be short
    (`drop_last` drops it). Length buckets do not decide which examples train together: they only cap the
    micro-batches a step is cut into (`cut_step`). An epoch's steps depend only on (seed, epoch, number of
    examples), so a resumed run finds the remaining steps of its epoch again."""

    def __init__(self, num_examples: int, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False):
        if num_examples < 1:
            raise AccumulationError("cannot draw steps from an empty dataset")
        if batch_size < 1:
            raise AccumulationError(f"batch_size must be >= 1, not {batch_size}")
        self.num_examples, self.batch_size = num_examples, batch_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last

    def epoch_steps(self, epoch: int) -> list[list[int]]:
        """All steps of `epoch`, in order."""
        order = list(range(self.num_examples))
        if self.shuffle:
            random.Random(f"autofit-steps-{self.seed}-{epoch}").shuffle(order)  # str seeds hash stably
        steps = [order[start:start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        if self.drop_last and len(steps[-1]) < self.batch_size:
            steps.pop()
        return steps

    def __len__(self) -> int:
        return steps_per_epoch(self.num_examples, self.batch_size, self.drop_last)


def deal_step(step: Sequence[int], lengths: Sequence[int], processes: int) -> list[list[int]]:
    """One step's examples shared out among `processes`: sorted longest first, the p-th of every `processes`
    to process p. Each share mirrors the step's lengths, so the processes' micro-batches, and their times,
    match; a share is empty only when the step holds fewer examples than there are processes."""
    ordered = sorted(step, key=lambda i: (-lengths[i], i))
    return [ordered[p::processes] for p in range(processes)]


def bucket_uppers(lengths: Sequence[int], knobs: Knobs) -> tuple[dict[int, int], frozenset[int]]:
    """(bucket index -> padded length of its longest example, the buckets whose every example has exactly
    that length): what `cut_step` needs to know of the data."""
    uppers: dict[int, int] = {}
    uneven: set[int] = set()
    for length in lengths:
        index = bucket_index(length, knobs.bucket_boundaries)
        padded = padded_length(length, knobs.pad_to_multiple_of)
        if padded != length or uppers.get(index, padded) != padded:
            uneven.add(index)
        uppers[index] = max(uppers.get(index, 0), padded)
    return uppers, frozenset(set(uppers) - uneven)


def cut_step(step: Iterable[int], lengths: Sequence[int], knobs: Knobs, upper_lengths: Mapping[int, int],
             exact_buckets: frozenset[int] = frozenset()) -> list[list[int]]:
    """The micro-batches of one step, longest first: its examples sorted by length, longest first, each
    micro-batch opened by its longest example and filled with the next ones up to the cap at the padded
    upper length of that example's bucket (`upper_lengths`, by bucket index).

    So a micro-batch topped by a bucket's example is never larger than the shape the memory model checks for
    that bucket, and the micro-batch of the step's longest examples runs first, before any gradient of the
    step exists (and the worst shape of the longest bucket really occurs once an epoch, where its longest
    example is). The buckets in `exact_buckets` (every example exactly its padded length) share micro-batches
    with no other bucket: theirs stay free of pad tokens, as the memory model assumes."""
    pieces: list[list[int]] = []
    current: list[int] = []
    top, size = -1, 0
    for i in sorted(step, key=lambda i: (-lengths[i], i)):
        bucket = bucket_index(lengths[i], knobs.bucket_boundaries)
        apart = bucket != top and (bucket in exact_buckets or top in exact_buckets)
        if current and (len(current) >= size or apart):
            pieces.append(current)
            current = []
        if not current:
            top, size = bucket, micro_batch_size_for(upper_lengths[bucket], knobs)
        current.append(i)
    if current:
        pieces.append(current)
    return pieces


def run_shapes(steps: Iterable[Sequence[int]], lengths: Sequence[int], knobs: Knobs) -> list[MicroBatchShape]:
    """Every distinct micro-batch shape `steps` are cut into, as the executor cuts them: what a run of those
    steps trains, for the memory model to price. A micro-batch after the first of its step runs with the
    step's gradients held; it has pad tokens unless all its examples are exactly its padded length."""
    uppers, exact = bucket_uppers(lengths, knobs)
    shapes = set()
    for step in steps:
        for k, piece in enumerate(cut_step(step, lengths, knobs, uppers, exact)):
            width = padded_length(max(lengths[i] for i in piece), knobs.pad_to_multiple_of)
            shapes.add((len(piece), width, any(lengths[i] != width for i in piece), k > 0))
    return [MicroBatchShape(batch=b, length=n, padded=padded, grads_held=held)
            for b, n, padded, held in sorted(shapes)]


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


def steps_per_epoch(num_examples: int, batch_size: int, drop_last: bool = False) -> int:
    """Optimizer steps of an epoch: full steps of `batch_size`, plus the short last one unless dropped."""
    if batch_size < 1:
        raise AccumulationError(f"batch_size must be >= 1, not {batch_size}")
    return num_examples // batch_size if drop_last else ceil_div(num_examples, batch_size)
