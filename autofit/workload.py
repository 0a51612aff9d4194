"""What is being trained on: the length distribution of the data and the effective batch. Pure data."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Task = Literal["classification", "causal-lm", "token-classification"]
"""What the model learns: sequence labels (classes or a regression score), next tokens, or token labels."""

TOKEN_LEVEL_TASKS: tuple[Task, ...] = ("token-classification", "causal-lm")
"""Tasks whose loss is a mean over label tokens, not over examples."""

MAX_BATCH_SIZE = 1 << 20
"""No effective batch holds more examples than this (a sanity bound on plan files)."""


class LengthHistogram(BaseModel):
    """Token lengths of the training examples, as sorted unique lengths with their counts."""

    model_config = ConfigDict(extra="forbid")

    lengths: list[int]
    counts: list[int]

    @model_validator(mode="after")
    def _check(self) -> LengthHistogram:
        if len(self.lengths) != len(self.counts) or not self.lengths:
            raise ValueError("lengths and counts must be non-empty and of equal size")
        if self.lengths != sorted(set(self.lengths)) or min(self.lengths) < 1 or min(self.counts) < 1:
            raise ValueError("lengths must be sorted, unique and positive; counts positive")
        return self

    @classmethod
    def from_lengths(cls, lengths: Iterable[int]) -> LengthHistogram:
        counter = Counter(int(n) for n in lengths)
        keys = sorted(counter)
        return cls(lengths=keys, counts=[counter[k] for k in keys])

    @classmethod
    def fixed(cls, seq_len: int, num_samples: int) -> LengthHistogram:
        return cls(lengths=[seq_len], counts=[num_samples])

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    @property
    def max_length(self) -> int:
        return self.lengths[-1]

    @property
    def num_tokens(self) -> int:
        return sum(n * c for n, c in zip(self.lengths, self.counts))

    def quantile(self, q: float) -> int:
        """Smallest length L such that a fraction >= q of the examples are no longer than L."""
        target, seen = q * self.num_samples, 0
        for length, count in zip(self.lengths, self.counts):
            seen += count
            if seen >= target:
                return length
        return self.max_length


class Workload(BaseModel):
    """The training job the plan is for."""

    model_config = ConfigDict(extra="forbid")

    task: Task = "classification"
    lengths: LengthHistogram
    """Token lengths of the examples (a single length when planning from --seq-len)."""
    batch_size: int = Field(32, ge=1, le=MAX_BATCH_SIZE)
    """Effective batch size: examples per optimizer step, whatever the micro-batches (kept by every plan)."""
    from_data: bool = False
    """True when `lengths` were measured on real data, False when assumed from --seq-len."""
    max_length: int | None = Field(None, ge=1)
    """The length examples were cut at (--seq-len when planning, max_length when training): training a saved
    plan cuts its data there too unless told otherwise. None in plans from before it was recorded."""
