"""The knob space a policy allows: as Optuna parameters, as Knobs, and as an exhaustive enumeration.

Parameters (each a categorical choice; the names are what optuna-dashboard shows):

- `freeze_depth`: 0 = nothing frozen, 1 = embeddings, 1 + k = embeddings and the bottom k layers;
- `checkpoint`: how many trainable layers are checkpointed, lowest first (clipped to the trainable count);
- `precision`, `optimizer_bits`;
- `micro_batch`: the most sequences per micro-batch, powers of two up to the effective batch and the batch
  itself; a step always trains the whole effective batch, in as many micro-batches as the caps need;
- `buckets`: number of length buckets (0 = plain dynamic padding); boundaries are equal-count quantiles;
- `token_budget`: 0 (none), or k in TOKEN_BUDGET_SCALES: cap each bucketed micro-batch at k x micro-batch x
  (shortest bucket's length) tokens, so long
  buckets take fewer sequences (never less than one of the longest). The memory model checks every bucket.

Different parameters can give the same Knobs (checkpoint counts beyond the trainable layers, a token budget
on micro-batch 1); `enumerate` and `size` count distinct Knobs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping
from typing import Any

from autofit.devices import DeviceSpec
from autofit.knobs import Knobs, Precision
from autofit.policy import Policy, PolicyError
from autofit.techniques.bucketing import choose_boundaries
from autofit.workload import Workload

TOKEN_BUDGET_SCALES = (1, 2, 4)
"""Token budgets the search tries, as multiples of micro-batch x the shortest bucket's length: tight ones pad
least, loose ones run fewer, larger micro-batches (which a GPU runs more efficiently)."""
PAD_MULTIPLE = 8
"""Pad to a multiple of 8 tokens (tensor-core friendly); bucket boundaries use the same multiple."""

ORDINAL = ("freeze_depth", "checkpoint")
"""Parameters drawn as integers (consecutive choices); the rest are categorical."""


def micro_batch_sizes(batch_size: int, cap: int | None = None) -> list[int]:
    """Powers of two below `batch_size`, plus `batch_size` itself; none above `cap` (1 always stays). A size
    that does not divide the batch is fine: a step still trains the whole batch, its last micro-batch
    is smaller."""
    sizes = {2**i for i in range(batch_size.bit_length()) if 2**i <= batch_size} | {batch_size}
    return sorted(s for s in sizes if cap is None or s <= cap or s == 1)


class SearchSpace:
    """The space of Knobs `policy` allows for a model with `num_layers` layers on `workload`."""

    def __init__(self, policy: Policy, num_layers: int, workload: Workload, device: DeviceSpec | None = None,
                 *, solve_checkpoint: bool | None = None):
        self.policy, self.num_layers, self.workload = policy, num_layers, workload
        self.boundaries = self._bucket_boundaries()
        self.full_dims: dict[str, list[Any]] = {
            "freeze_depth": self._freeze_depths(),
            "checkpoint": list(range(num_layers + 1)) if policy.checkpointing else [0],
            "precision": self._precisions(device),
            "optimizer_bits": list(policy.optimizer_bits),
            "micro_batch": micro_batch_sizes(workload.batch_size, policy.max_micro_batch),
            "buckets": sorted(self.boundaries),
            "token_budget": [0, *TOKEN_BUDGET_SCALES] if policy.bucketing.token_budget and len(self.boundaries) > 1
            else [0],
        }
        if solve_checkpoint is None:
            solve_checkpoint = policy.objective == "time"
        self.solve_checkpoint = solve_checkpoint and policy.checkpointing
        """When set, the study does not sample `checkpoint`: the objective solves it (see study.py)."""
        self.dims = {k: v for k, v in self.full_dims.items() if not (k == "checkpoint" and self.solve_checkpoint)}
        """The parameters the study samples."""

    def _freeze_depths(self) -> list[int]:
        if not self.policy.freeze.embeddings:
            return [0]
        return list(range(self.policy.freeze.max_frozen_layers(self.num_layers) + 2))

    def _precisions(self, device: DeviceSpec | None) -> list[str]:
        allowed = [p.value for p in self.policy.precisions
                   if not (p == Precision.bf16 and device is not None and not device.supports_bf16)]
        if not allowed:
            raise PolicyError(f"policy {self.policy.name!r} allows only bf16, which {device.name} does not support")
        return allowed

    def _bucket_boundaries(self) -> dict[int, tuple[int, ...]]:
        """Bucket count -> boundaries, keeping only counts that give distinct, real (>1 bucket) splits."""
        result: dict[int, tuple[int, ...]] = {0: ()} if 0 in self.policy.bucketing.counts else {}
        for count in self.policy.bucketing.counts:
            if count == 0:
                continue
            bounds = choose_boundaries(self.workload.lengths, count, multiple=PAD_MULTIPLE)
            if len(bounds) > 1 and bounds not in result.values():
                result[count] = bounds
        return result or {0: ()}

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Draw one parameter set from an Optuna trial. Depths are integers, so TPE sees their order."""
        params = {}
        for name, choices in self.dims.items():
            if name in ORDINAL and len(choices) > 1:
                params[name] = trial.suggest_int(name, choices[0], choices[-1])
            else:
                params[name] = trial.suggest_categorical(name, choices)
        return params

    # --- parameters -> Knobs -----------------------------------------------------------------------------
    def _key(self, params: Mapping[str, Any]) -> tuple:
        """The distinct-Knobs identity of a parameter set (clips what has no effect)."""
        depth = params["freeze_depth"]
        frozen = max(0, depth - 1)
        checkpoint = min(params["checkpoint"], self.num_layers - frozen)
        boundaries = self.boundaries[params["buckets"]]
        micro_batch = params["micro_batch"]
        tokens = None
        if params["token_budget"] and boundaries and micro_batch > 1:
            tokens = max(params["token_budget"] * micro_batch * boundaries[0], boundaries[-1])
        return (depth >= 1, frozen, checkpoint, params["precision"], params["optimizer_bits"], micro_batch,
                boundaries, tokens)

    def knobs(self, params: Mapping[str, Any]) -> Knobs:
        return self._knobs_from_key(self._key(params))

    def _knobs_from_key(self, key: tuple) -> Knobs:
        freeze_embeddings, frozen, checkpoint, precision, bits, micro_batch, boundaries, tokens = key
        return Knobs(
            freeze_embeddings=freeze_embeddings,
            freeze_layers=frozen,
            checkpoint_layers=tuple(range(frozen, frozen + checkpoint)),
            precision=Precision(precision),
            optimizer_bits=bits,
            micro_batch_size=micro_batch,
            tokens_per_micro_batch=tokens,
            bucket_boundaries=boundaries,
            pad_to_multiple_of=PAD_MULTIPLE,
        )

    # --- size and enumeration ----------------------------------------------------------------------------
    def _all_params(self) -> Iterator[dict[str, Any]]:
        names = list(self.full_dims)
        for values in itertools.product(*self.full_dims.values()):
            yield dict(zip(names, values))

    def checkpoint_counts(self, params: Mapping[str, Any]) -> range:
        """Checkpoint counts that make a difference with these parameters (0 .. trainable layers)."""
        return range(self.num_layers - max(0, params["freeze_depth"] - 1) + 1 if self.policy.checkpointing else 1)

    @property
    def grid_size(self) -> int:
        """Sampled parameter combinations (what a grid search runs)."""
        return math.prod(len(v) for v in self.dims.values())

    @property
    def size(self) -> int:
        """Distinct Knobs."""
        return len({self._key(p) for p in self._all_params()})

    def enumerate(self) -> Iterator[Knobs]:
        seen: set[tuple] = set()
        for params in self._all_params():
            key = self._key(params)
            if key not in seen:
                seen.add(key)
                yield self._knobs_from_key(key)

    def starting_points(self) -> list[dict[str, Any]]:
        """Sensible first trials: plain training, every saving at once, and the usual fast recipe."""
        d = self.full_dims

        def pick(name: str, preferred: list[Any], default: Any) -> Any:
            return next((v for v in preferred if v in d[name]), default)

        half = pick("precision", ["bf16", "fp16"], d["precision"][0])
        plain = dict(freeze_depth=0, checkpoint=0, precision=pick("precision", ["fp32"], half),
                     optimizer_bits=pick("optimizer_bits", [32], 8), micro_batch=d["micro_batch"][-1],
                     buckets=d["buckets"][0], token_budget=0)
        everything = dict(freeze_depth=d["freeze_depth"][-1], checkpoint=d["checkpoint"][-1], precision=half,
                          optimizer_bits=pick("optimizer_bits", [8], 32), micro_batch=d["micro_batch"][0],
                          buckets=d["buckets"][-1], token_budget=d["token_budget"][min(1, len(d["token_budget"]) - 1)])
        fast = dict(plain, precision=half, buckets=d["buckets"][-1], token_budget=d["token_budget"][-1])
        return [{k: v for k, v in point.items() if k in self.dims} for point in (plain, everything, fast)]


def enumerate_space(policy: Policy, num_layers: int, workload: Workload,
                    device: DeviceSpec | None = None) -> Iterator[Knobs]:
    """Every distinct Knobs `policy` allows (the exhaustive reference the study is tested against)."""
    return SearchSpace(policy, num_layers, workload, device).enumerate()
