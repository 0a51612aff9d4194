"""What a search returns: evaluated candidates, their ranking, alternatives, and the no-fit error."""

from __future__ import annotations

from pydantic import BaseModel

from autofit.budget import format_bytes
from autofit.knobs import Knobs
from autofit.plan import Alternative, MemoryBreakdown, SearchInfo, TimePrediction
from autofit.policy import Policy


class Candidate(BaseModel):
    """One evaluated point of the space."""

    knobs: Knobs
    memory: MemoryBreakdown
    time: TimePrediction
    risk: float
    score: float
    """What the policy minimises: epoch seconds x (1 + risk_price x risk), or peak bytes."""

    @property
    def peak_bytes(self) -> int:
        return self.memory.peak_bytes

    @property
    def epoch_seconds(self) -> float:
        return self.time.epoch_seconds


class SearchResult(BaseModel):
    best: Candidate
    ranked: list[Candidate]
    """Feasible runner-ups, best first (the best excluded)."""
    evaluated: list[Candidate] = []
    """Every distinct configuration the search predicted, fitting or not, in every stage (the checkpoint
    bisection's steps included), scored by the policy of the stage that answered; in the order first seen."""
    policy: str
    relaxed: bool = False
    """True when only the policy's fallback (second-stage) space had a plan that fits."""
    num_layers: int
    budget_bytes: int
    headroom_bytes: int
    trials: int
    seconds: float
    space_size: int | None = None
    storage: str | None = None
    study_name: str | None = None

    @property
    def knobs(self) -> Knobs:
        return self.best.knobs

    @property
    def memory(self) -> MemoryBreakdown:
        return self.best.memory

    @property
    def time(self) -> TimePrediction:
        return self.best.time

    def info(self) -> SearchInfo:
        return SearchInfo(trials=self.trials, seconds=self.seconds, space_size=self.space_size,
                          storage=self.storage)


class NoPlanFitsError(ValueError):
    """No knobs the policy allows fit the budget; carries the smallest budget that would, and how."""

    def __init__(self, budget_bytes: int, smallest_budget_bytes: int, knobs: Knobs, peak_bytes: int,
                 num_layers: int):
        self.budget_bytes, self.smallest_budget_bytes = budget_bytes, smallest_budget_bytes
        self.knobs, self.peak_bytes = knobs, peak_bytes
        super().__init__(
            f"no plan fits in {format_bytes(budget_bytes)}; the smallest budget that fits is "
            f"{format_bytes(smallest_budget_bytes)} ({describe_knobs(knobs, num_layers)})")


def round_up_budget(n: int) -> int:
    """Round up to a tenth of the unit `format_bytes` prints, so the printed budget is one that fits."""
    unit = next((u for u in (2**30, 2**20, 2**10) if n >= u), 1)
    step = max(1, unit // 10)
    return -(-n // step) * step


def rank(candidates: list[Candidate], policy: Policy, limit_bytes: int) -> list[Candidate]:
    """Feasible candidates, best first: the least risky of those within the tie tolerance of the best
    score, then the rest by score."""
    feasible = sorted((c for c in candidates if c.peak_bytes <= limit_bytes), key=lambda c: c.score)
    if not feasible:
        return []
    cutoff = feasible[0].score * (1.0 + policy.tie_tolerance)
    tied = [c for c in feasible if c.score <= cutoff]
    tied.sort(key=lambda c: (round(c.risk, 9), c.epoch_seconds, c.peak_bytes))
    return tied + [c for c in feasible if c.score > cutoff]


# --- words ---------------------------------------------------------------------------------------------


def _freeze_words(k: Knobs) -> str:
    if not k.freeze_embeddings:
        return "no freezing"
    return f"freeze embeddings + {k.freeze_layers} layers" if k.freeze_layers else "freeze embeddings"


def _checkpoint_words(k: Knobs, num_layers: int) -> str:
    trainable = num_layers - k.freeze_layers
    if not k.checkpoint_layers:
        return "no checkpointing"
    if len(k.checkpoint_layers) == trainable:
        return "checkpoint all"
    return f"checkpoint {len(k.checkpoint_layers)} layers"


def _batch_words(k: Knobs) -> str:
    return f"micro-batches of up to {k.micro_batch_size}"


def _padding_words(k: Knobs) -> str:
    if not k.bucket_boundaries:
        return "dynamic padding"
    words = f"{len(k.bucket_boundaries)} length buckets"
    return words + (f", {k.tokens_per_micro_batch}-token budget" if k.tokens_per_micro_batch else "")


def knob_words(k: Knobs, num_layers: int) -> dict[str, str]:
    """Each technique's setting in words, keyed by technique."""
    return {
        "freezing": _freeze_words(k),
        "checkpointing": _checkpoint_words(k, num_layers),
        "precision": k.precision.value,
        "optimizer": f"{k.optimizer_bits}-bit AdamW",
        "micro-batch": _batch_words(k),
        "padding": _padding_words(k),
    }


def describe_knobs(k: Knobs, num_layers: int) -> str:
    """e.g. "freeze embeddings + 6 layers, checkpoint all, bf16, 8-bit AdamW, micro-batch 1 x 32 steps"."""
    return ", ".join(knob_words(k, num_layers).values())


def describe_changes(chosen: Knobs, other: Knobs, num_layers: int) -> tuple[str, ...]:
    """The settings of `other` that differ from `chosen`, in words."""
    mine, theirs = knob_words(chosen, num_layers), knob_words(other, num_layers)
    return tuple(theirs[t] for t in theirs if theirs[t] != mine[t])


def _speed_words(ratio: float) -> str:
    if abs(ratio - 1.0) < 0.005:
        return "same speed"
    return f"{ratio:.2f}x slower" if ratio > 1 else f"{1 / ratio:.2f}x faster"


def alternatives(result: SearchResult, k: int = 3) -> list[Alternative]:
    """The `k` best runner-ups that differ from the chosen plan in more than the micro-batch, one per
    distinct set of changed techniques, each with a one-line comparison."""
    best, chosen = result.best, []
    seen: set[tuple[str, ...]] = set()
    for candidate in result.ranked:
        mine = knob_words(best.knobs, result.num_layers)
        theirs = knob_words(candidate.knobs, result.num_layers)
        changed = tuple(t for t in theirs if theirs[t] != mine[t])
        if not changed or changed == ("micro-batch",) or changed in seen:
            continue
        seen.add(changed)
        words = " and ".join(theirs[t] for t in changed)
        ratio = candidate.epoch_seconds / best.epoch_seconds
        note = f"with {words}: {_speed_words(ratio)}, {format_bytes(candidate.peak_bytes)}"
        chosen.append(Alternative(knobs=candidate.knobs, peak_bytes=candidate.peak_bytes,
                                  epoch_seconds=candidate.epoch_seconds, note=note))
        if len(chosen) == k:
            break
    return chosen
