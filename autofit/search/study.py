"""The Optuna search: minimise predicted epoch time (or peak) subject to predicted peak <= budget - headroom.

Stages: the policy's own space, then its fallback (e.g. quality-first's 8-bit states) if nothing fit, then
adapters where the policy keeps them for when nothing else fits (Policy.stages).
Spaces no larger than the trial budget are searched with a GridSampler, so the answer is exact; larger ones
with a constrained TPE sampler seeded with plain training, every saving at once and the usual fast recipe.
When no stage finds a plan that fits, a minimal-memory study over the most permissive space either finds
one after all, or gives the smallest budget that would fit (NoPlanFitsError).
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import optuna

from autofit.cluster import SINGLE, Cluster
from autofit.devices import DeviceSpec
from autofit.knobs import Knobs
from autofit.plan import MemoryBreakdown, TimePrediction
from autofit.policy import Policy, load_policy
from autofit.profiler.schema import Profile
from autofit.search.result import Candidate, NoPlanFitsError, SearchResult, rank, round_up_budget
from autofit.search.space import SearchSpace, adapted_keys
from autofit.workload import Workload

DEFAULT_TRIALS = 250
"""TPE trials for spaces too large to enumerate: a few seconds at most, well inside `autofit plan`'s 30 s."""

MemoryFn = Callable[[Profile, Knobs, Workload, DeviceSpec], MemoryBreakdown]
TimeFn = Callable[[Profile, Knobs, Workload, DeviceSpec], TimePrediction]


class Evaluator:
    """Predicts (memory, time) for knobs once and scores them under a policy."""

    def __init__(self, profile: Profile, workload: Workload, device: DeviceSpec,
                 predict_memory: MemoryFn | None = None, predict_time: TimeFn | None = None,
                 cluster: Cluster = SINGLE):
        if predict_memory is None:
            from autofit.memory import predict_peak as predict_memory
        if predict_time is None:
            from autofit.cost import predict_time
        self.profile, self.workload, self.device, self.cluster = profile, workload, device, cluster
        self.predict_memory, self.predict_time = predict_memory, predict_time
        self._cache: dict[Knobs, tuple[MemoryBreakdown, TimePrediction, bool]] = {}

    def __call__(self, knobs: Knobs, policy: Policy) -> Candidate:
        if knobs not in self._cache:
            args = (self.profile, knobs, self.workload, self.device)
            # several processes: the predictors are told how many (one-process predictors need not know)
            extra = {"cluster": self.cluster} if self.cluster.distributed else {}
            self._cache[knobs] = (self.predict_memory(*args, **extra), self.predict_time(*args, **extra),
                                  self._fits_host(knobs))
        memory, prediction, fits_host = self._cache[knobs]
        risk = policy.risk(knobs, self.profile.num_layers)
        if policy.objective == "memory":
            score = float(memory.peak_bytes)
        else:
            score = prediction.epoch_seconds * (1.0 + policy.risk_price * risk)
        return Candidate(knobs=knobs, memory=memory, time=prediction, risk=risk, score=score, fits_host=fits_host)

    def _fits_host(self, knobs: Knobs) -> bool:
        """Whether CPU offload's shards fit the machines' RAM (always, when it is not given)."""
        if self.cluster.host_memory_bytes is None or not knobs.cpu_offload:
            return True
        from autofit.memory import offloaded_bytes_per_machine

        return offloaded_bytes_per_machine(self.profile, knobs, self.cluster) <= self.cluster.host_memory_bytes

    def evaluated(self, policy: Policy) -> list[Candidate]:
        """Every distinct knobs predicted so far, in the order first seen, scored by `policy`."""
        return [self(knobs, policy) for knobs in self._cache]


def _sampler(space: SearchSpace, budget: int, seed: int) -> optuna.samplers.BaseSampler:
    if space.grid_size <= budget:
        return optuna.samplers.GridSampler(space.dims, seed=seed)
    # TPE reads the constraint each trial sets (Trial.set_constraint): infeasible trials rank below
    # feasible ones by how far over the limit they are.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=min(20, budget // 4))


def run_study(space: SearchSpace, policy: Policy, evaluate: Evaluator, limit_bytes: int | None, *,
              n_trials: int | None, storage: str | None, study_name: str | None,
              seed: int) -> tuple[list[Candidate], int]:
    """Run an Optuna study over each part of `space` (SearchSpace.parts), scoring by `policy`; returns every
    distinct candidate the studies hold (earlier runs of a stored study included) and how many trials this
    call ran. limit_bytes=None runs unconstrained (the minimal-memory study)."""
    found: list[Candidate] = []
    ran = 0
    for suffix, part in space.parts():
        candidates, trials = _run_one_study(part, policy, evaluate, limit_bytes, n_trials=n_trials,
                                            storage=storage, study_name=study_name and study_name + suffix,
                                            seed=seed)
        found += candidates
        ran += trials
    return found, ran


def _run_one_study(space: SearchSpace, policy: Policy, evaluate: Evaluator, limit_bytes: int | None, *,
                   n_trials: int | None, storage: str | None, study_name: str | None,
                   seed: int) -> tuple[list[Candidate], int]:
    budget = n_trials or DEFAULT_TRIALS
    grid = space.grid_size <= budget
    sampler = _sampler(space, budget, seed)
    study = _open_study(storage, study_name, sampler)
    done = len(study.trials)
    if grid:
        budget = max(0, space.grid_size - done)  # a resumed grid only runs what it has not run yet
    else:
        if done == 0:
            for params in space.starting_points():
                study.enqueue_trial(params, skip_if_exists=True)
        budget = max(0, budget - done)  # likewise, a resumed study only runs the trials it has left

    def objective(trial: optuna.Trial) -> float:
        params = space.suggest(trial)
        if space.solve_checkpoint:
            candidate = least_checkpointing(space, params, policy, evaluate, limit_bytes)
            trial.set_user_attr("checkpoint", len(candidate.knobs.checkpoint_layers))
        else:
            candidate = evaluate(space.knobs(params), policy)
        trial.set_user_attr("knobs", candidate.knobs.model_dump(mode="json"))
        trial.set_user_attr("peak_bytes", candidate.peak_bytes)
        trial.set_user_attr("epoch_seconds", candidate.epoch_seconds)
        if limit_bytes is not None:
            trial.set_constraint("peak_over_limit_bytes", candidate.peak_bytes - limit_bytes)
        return candidate.score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if budget:
            study.optimize(objective, n_trials=budget)
    # distinct, in trial order: a set's order follows string hashing (PYTHONHASHSEED), and ties in the ranking
    # keep this order, so the same search would name other plans from one run to the next
    knobs = list(dict.fromkeys(Knobs.model_validate(t.user_attrs["knobs"]) for t in study.trials
                               if "knobs" in t.user_attrs))
    return [evaluate(k, policy) for k in knobs], len(study.trials) - done


class StudyStorageError(ValueError):
    """The --storage URL cannot be opened (an unknown scheme, a missing folder, a locked database)."""


def _open_study(storage: str | None, study_name: str | None,
                sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    try:
        return optuna.create_study(storage=storage, study_name=study_name, load_if_exists=True,
                                   direction="minimize", sampler=sampler)
    except Exception as error:  # noqa: BLE001 - sqlalchemy's many kinds, for a bad URL or file
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise StudyStorageError(f"cannot open the study storage {storage!r}: {first}") from None


def least_checkpointing(space: SearchSpace, params: dict, policy: Policy, evaluate: Evaluator,
                        limit_bytes: int | None) -> Candidate:
    """The candidate with the fewest checkpointed layers that fits (else with all of them checkpointed).

    For a time objective this is the best checkpoint count for the other knobs: recompute only adds time
    and adds no risk, while each checkpointed layer frees its saved activations, so the peak falls with the
    count and a bisection finds the smallest count that fits."""
    counts = space.checkpoint_counts(params)

    def at(count: int) -> Candidate:
        return evaluate(space.knobs({**params, "checkpoint": count}), policy)

    low = at(counts[0])
    if len(counts) == 1:
        return low
    if limit_bytes is None:  # the unconstrained minimal-memory study: the smallest peak, all checkpointed
        return min((low, at(counts[-1])), key=lambda c: c.peak_bytes)
    if low.peak_bytes <= limit_bytes:
        return low
    best = at(counts[-1])
    if best.peak_bytes > limit_bytes:
        return best  # nothing fits; all checkpointed is the nearest miss
    lo, hi = counts[0], counts[-1]  # lo does not fit, hi fits
    while hi - lo > 1:
        mid = (lo + hi) // 2
        candidate = at(mid)
        if candidate.peak_bytes <= limit_bytes:
            hi, best = mid, candidate
        else:
            lo = mid
    return best


def _spaces(policy: Policy, profile: Profile, workload: Workload, device: DeviceSpec,
            cluster: Cluster = SINGLE) -> list[tuple[str, Policy, SearchSpace]]:
    """Each stage of the search with its space; adapters only where the profile has their fits."""
    adapted = adapted_keys(profile)
    return [(suffix, stage, SearchSpace(stage, profile.num_layers, workload, device, adapted=adapted,
                                        cluster=cluster))
            for suffix, stage in policy.stages(adapters=bool(adapted))]


def _default_study_name(profile: Profile, workload: Workload, device: DeviceSpec, budget_bytes: int,
                        policy: Policy, cluster: Cluster = SINGLE) -> str:
    text = "|".join([profile.model_id, str(profile.num_layers), workload.model_dump_json(), device.name,
                     str(budget_bytes), policy.model_dump_json()]
                    + ([cluster.model_dump_json()] if cluster.distributed else []))
    digest = hashlib.sha1(text.encode()).hexdigest()[:10]
    return f"autofit-{profile.model_id.replace('/', '--')}-{policy.name}-{digest}"


@contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna's per-trial INFO lines silenced while a search runs; the caller's verbosity comes back after."""
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


@quiet_optuna()
def search(profile: Profile, workload: Workload, device: DeviceSpec, budget_bytes: int, policy: Policy | str,
           *, n_trials: int | None = None, storage: str | None = None, study_name: str | None = None,
           seed: int = 0, predict_memory: MemoryFn | None = None,
           predict_time: TimeFn | None = None, cluster: Cluster = SINGLE) -> SearchResult:
    """The fastest (or smallest, per the policy) knobs whose predicted peak fits budget - headroom on each of
    `cluster`'s processes.

    Raises NoPlanFitsError with the smallest budget that would fit when none does."""
    policy = load_policy(policy)
    started = time.perf_counter()
    evaluate = Evaluator(profile, workload, device, predict_memory, predict_time, cluster)
    headroom = policy.headroom.for_budget(budget_bytes)
    limit = budget_bytes - headroom
    if storage and not study_name:
        study_name = _default_study_name(profile, workload, device, budget_bytes, policy, cluster)
    trials = 0
    common = dict(n_trials=n_trials, storage=storage, seed=seed)

    def result(ranked: list[Candidate], space: SearchSpace, relaxed: bool) -> SearchResult:
        return SearchResult(best=ranked[0], ranked=ranked[1:], evaluated=evaluate.evaluated(stage),
                            policy=policy.name, relaxed=relaxed,
                            num_layers=profile.num_layers, budget_bytes=budget_bytes, headroom_bytes=headroom,
                            trials=trials, seconds=time.perf_counter() - started, space_size=space.size,
                            storage=storage, study_name=study_name)

    spaces = _spaces(policy, profile, workload, device, cluster)
    for suffix, stage, space in spaces:
        name = study_name and study_name + suffix
        candidates, ran = run_study(space, stage, evaluate, limit, study_name=name, **common)
        trials += ran
        ranked = rank(candidates, stage, limit)
        if ranked:
            return result(ranked, space, relaxed=bool(suffix))
    # Nothing fit: search the most permissive space for its smallest peak.
    smallest, ran = minimal_memory(space, stage, evaluate,
                                   study_name=study_name and study_name + ".min-memory", **common)
    trials += ran
    ranked = rank(smallest, stage, limit)
    if ranked:  # the time study missed a corner that fits; these plans do
        return result(ranked, space, relaxed=len(spaces) > 1)
    # the smallest budget for a plan the machines' RAM can hold too (offload's shards), when there is one
    least = min([c for c in smallest if c.fits_host] or smallest, key=lambda c: c.peak_bytes)
    needed = round_up_budget(policy.headroom.smallest_budget_for(least.peak_bytes))
    raise NoPlanFitsError(budget_bytes, needed, least.knobs, least.peak_bytes, profile.num_layers, cluster.processes,
                          device.kind)


def minimal_memory(space: SearchSpace, policy: Policy, evaluate: Evaluator,
                   **study_args) -> tuple[list[Candidate], int]:
    """Every candidate of an unconstrained study minimising the predicted peak over `space`, scored by
    `policy` (so they can be ranked against the budget as usual)."""
    by_memory = policy.model_copy(update={"objective": "memory"})
    candidates, ran = run_study(space, by_memory, evaluate, None, **study_args)
    return [evaluate(c.knobs, policy) for c in candidates], ran


def exhaustive_best(profile: Profile, workload: Workload, device: DeviceSpec, budget_bytes: int,
                    policy: Policy | str, *, predict_memory: MemoryFn | None = None,
                    predict_time: TimeFn | None = None, cluster: Cluster = SINGLE) -> Candidate | None:
    """The best plan by brute force over every distinct Knobs of each stage (the study's reference)."""
    policy = load_policy(policy)
    evaluate = Evaluator(profile, workload, device, predict_memory, predict_time, cluster)
    limit = budget_bytes - policy.headroom.for_budget(budget_bytes)
    for _, stage, space in _spaces(policy, profile, workload, device, cluster):
        ranked = rank([evaluate(k, stage) for k in space.enumerate()], stage, limit)
        if ranked:
            return ranked[0]
    return None
