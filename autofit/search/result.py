"""What a search returns: evaluated candidates, their ranking, alternatives, and the no-fit error."""

from __future__ import annotations

from pydantic import BaseModel

from autofit.budget import format_bytes
from autofit.intmath import round_up
from autofit.knobs import Knobs
from autofit.plan import Alternative, MemoryBreakdown, SearchInfo, Technique, TimePrediction
from autofit.policy import Policy
from autofit.report import knobs_line


class Candidate(BaseModel):
    """One evaluated point of the space."""

    knobs: Knobs
    memory: MemoryBreakdown
    time: TimePrediction
    risk: float
    score: float
    """What the policy minimises: epoch seconds x (1 + risk_price x risk), or peak bytes."""
    fits_host: bool = True
    """False when the plan's offloaded shards need more CPU RAM than the machines have (Cluster)."""

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
    """True when only a later stage had a plan that fits: the policy's fallback, or its fallback adapters."""
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
                          storage=self.storage, risk=self.best.risk)


class NoPlanFitsError(ValueError):
    """No knobs the policy allows fit the budget; carries the smallest budget that would, and how."""

    def __init__(self, budget_bytes: int, smallest_budget_bytes: int, knobs: Knobs, peak_bytes: int,
                 num_layers: int, processes: int = 1, device_kind: str = "cuda"):
        self.budget_bytes, self.smallest_budget_bytes = budget_bytes, smallest_budget_bytes
        self.knobs, self.peak_bytes = knobs, peak_bytes
        self._made = (budget_bytes, smallest_budget_bytes, knobs, peak_bytes, num_layers, processes, device_kind)
        each = (" per GPU" if device_kind == "cuda" else " per process") if processes > 1 else ""
        super().__init__(
            f"no plan fits in {format_bytes(budget_bytes)}{each}; the smallest budget that fits is "
            f"{format_bytes(smallest_budget_bytes)}{each} ({knobs_line(knobs, num_layers, processes)})")

    def __reduce__(self):
        """Picklable with its figures: the main process of a launch sends it to the others."""
        return type(self), self._made


def round_up_budget(n: int) -> int:
    """Round up to a tenth of the unit `format_bytes` prints, so the printed budget is one that fits."""
    unit = next((u for u in (2**30, 2**20, 2**10) if n >= u), 1)
    step = max(1, unit // 10)
    return round_up(n, step)


def rank(candidates: list[Candidate], policy: Policy, limit_bytes: int) -> list[Candidate]:
    """Feasible candidates, best first: the least risky of those within the tie tolerance of the best
    score, then the rest by score."""
    feasible = sorted((c for c in candidates if c.peak_bytes <= limit_bytes and c.fits_host), key=lambda c: c.score)
    if not feasible:
        return []
    cutoff = feasible[0].score * (1.0 + policy.tie_tolerance)
    tied = [c for c in feasible if c.score <= cutoff]
    tied.sort(key=lambda c: (round(c.risk, 9), c.epoch_seconds, c.peak_bytes))
    return tied + [c for c in feasible if c.score > cutoff]


# --- what changed --------------------------------------------------------------------------------------


def knob_settings(k: Knobs, num_layers: int, share: int | None = None) -> dict[Technique, tuple]:
    """Each technique's setting, keyed by technique, as coarse as a person weighs it: two plans set a technique
    differently when these differ (which layers are checkpointed does not count, only how many, or all; a
    micro-batch counts up to `share`, the most examples a process trains in a step)."""
    trainable = num_layers - k.freeze_layers
    checkpointed = len(k.checkpoint_layers)
    adapter = ("none",) if k.adapter == "none" else (k.adapter, k.lora_rank, k.lora_targets, k.quantized,
                                                     k.quantized and k.double_quant)  # a plain base follows precision
    return {
        "adapter": adapter,
        "freezing": (k.freeze_embeddings, k.freeze_layers),
        "checkpointing": ("all",) if checkpointed and checkpointed == trainable else (checkpointed,),
        "precision": (k.precision.value,),
        "optimizer": (k.optimizer_bits,),
        "micro-batch": (min(k.micro_batch_size, share or k.micro_batch_size),),
        "padding": (k.bucket_boundaries and len(k.bucket_boundaries),
                    k.tokens_per_micro_batch if k.bucket_boundaries else None),
        "sharding": (k.strategy, k.reshard_after_forward, k.cpu_offload, k.fsdp_unit_layers),
    }


def changed_techniques(chosen: Knobs, other: Knobs, num_layers: int, share: int | None = None) -> list[Technique]:
    """The techniques `other` sets differently from `chosen`, in plan order (micro-batches as `knob_settings`)."""
    mine, theirs = knob_settings(chosen, num_layers, share), knob_settings(other, num_layers, share)
    return [t for t in theirs if theirs[t] != mine[t]]


def alternatives(result: SearchResult, k: int = 3, share: int | None = None) -> list[Alternative]:
    """The `k` best runner-ups that differ from the chosen plan in more than the micro-batch, one per
    distinct set of changed techniques; micro-batches count up to `share`, the most examples a process trains
    in a step (a larger cap changes nothing)."""
    best, chosen = result.best, []
    seen: set[tuple[str, ...]] = set()
    for candidate in result.ranked:
        changed = tuple(changed_techniques(best.knobs, candidate.knobs, result.num_layers, share))
        if not changed or changed == ("micro-batch",) or changed in seen:
            continue
        seen.add(changed)
        chosen.append(Alternative(knobs=candidate.knobs, peak_bytes=candidate.peak_bytes,
                                  epoch_seconds=candidate.epoch_seconds, changed=list(changed), risk=candidate.risk))
        if len(chosen) == k:
            break
    return chosen
