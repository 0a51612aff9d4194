"""The search (autofit/search/): the Optuna study against brute force, the budget constraint, the no-fit error,
the space it searches, ranking, alternatives, and resuming a stored study. Hand-built profiles only."""

import pytest

from autofit.budget import format_bytes
from autofit.devices import get_device
from autofit.knobs import Knobs, Precision
from autofit.plan import MemoryBreakdown, TimePrediction
from autofit.policy import Policy, PolicyError, load_policy
from autofit.report import knobs_line
from autofit.search import (
    Candidate,
    Evaluator,
    NoPlanFitsError,
    SearchSpace,
    alternatives,
    changed_techniques,
    enumerate_space,
    exhaustive_best,
    micro_batch_sizes,
    rank,
    search,
)
from autofit.search.space import adapted_keys
from autofit.techniques import freeze
from autofit.workload import LengthHistogram, Workload

from _profiles import cached_models, make_profile, skewed_workload

MB = 2**20
A100 = get_device("a100")
WORKLOAD = skewed_workload(n=500, batch_size=16)
PROFILES = {n: make_profile(hidden=256, layers=n, vocab=30000) for n in (4, 6)}


MODELS = cached_models()


def run(layers, budget_mb, policy, **kw):
    if not kw:  # a search without storage is deterministic (seeded): share results between tests
        key = (layers, budget_mb, policy)
        if key not in _RESULTS:
            _RESULTS[key] = run(layers, budget_mb, policy, seed=0)
        return _RESULTS[key]
    return search(PROFILES[layers], WORKLOAD, A100, budget_mb * MB, policy, **MODELS, **kw)


_RESULTS = {}


def brute_force(layers, budget_mb, policy):
    return exhaustive_best(PROFILES[layers], WORKLOAD, A100, budget_mb * MB, policy, **MODELS)


def limit_of(result) -> int:
    return result.budget_bytes - result.headroom_bytes


# Budgets (MB) from just above the smallest plan to nearly unconstrained (the fastest plan of the 4-layer model
# peaks at ~1.9 GB under balanced). Quality-first at 654/680 MB fits only with its fallback (8-bit state).
CASES = [
    (4, "balanced", 640), (4, "balanced", 800), (4, "balanced", 2200), (6, "balanced", 660),
    (4, "quality-first", 654), (4, "quality-first", 1200), (6, "quality-first", 680),
    (4, "minimal-memory", 1000),
]


@pytest.mark.parametrize("layers,policy,budget_mb", CASES)
def test_the_study_finds_the_brute_force_optimum(layers, policy, budget_mb):
    result = run(layers, budget_mb, policy)
    best = brute_force(layers, budget_mb, policy)
    assert best is not None
    tolerance = load_policy(policy).tie_tolerance
    if result.best.knobs != best.knobs:  # another plan that the policy counts as tied
        assert result.best.score <= best.score * (1 + tolerance), (
            knobs_line(result.best.knobs, layers), knobs_line(best.knobs, layers))
    # the brute force saw every point: nothing the study found may beat its best score by more than a tie
    assert min(c.score for c in [result.best, *result.ranked]) >= best.score / (1 + tolerance)
    assert result.best.peak_bytes <= limit_of(result)


@pytest.mark.parametrize("layers,policy,budget_mb", CASES)
def test_no_plan_exceeds_budget_minus_headroom(layers, policy, budget_mb):
    result = run(layers, budget_mb, policy)
    pol = load_policy(policy)
    assert result.headroom_bytes == pol.headroom.for_budget(budget_mb * MB) > 0
    assert result.ranked, "a search over a small space keeps its runner-ups"
    for candidate in [result.best, *result.ranked]:
        assert candidate.peak_bytes <= result.budget_bytes - result.headroom_bytes
        assert candidate.knobs.micro_batch_size <= WORKLOAD.batch_size
        candidate.knobs.validate_for(layers)
    # ranked: the best first, then by score outside the tie window
    scores = [c.score for c in result.ranked]
    cutoff = result.best.score * (1 + pol.tie_tolerance)
    outside = [s for s in scores if s > cutoff]
    assert outside == sorted(outside)


def test_a_tighter_budget_never_gives_a_better_plan():
    def best_score(mb):
        result = run(4, mb, "balanced")
        return min(c.score for c in [result.best, *result.ranked])

    scores = [best_score(mb) for mb in (2200, 800, 640)]
    assert all(a <= b for a, b in zip(scores, scores[1:])), scores
    assert scores[0] < scores[-1]
    assert run(4, 2200, "balanced").best.epoch_seconds < run(4, 640, "balanced").best.epoch_seconds


def test_quality_first_changes_training_only_when_nothing_else_fits():
    loose = run(4, 1200, "quality-first")
    assert not loose.relaxed
    for c in [loose.best, *loose.ranked]:
        assert c.knobs.freeze_layers == 0 and c.knobs.optimizer_bits == 32 and c.knobs.precision != Precision.fp16
    tight = run(4, 654, "quality-first")
    assert tight.relaxed
    assert tight.best.knobs.optimizer_bits == 8 or tight.best.knobs.precision == Precision.fp16
    assert tight.best.knobs.freeze_layers == 0  # the fallback does not allow freezing layers either
    # and the strict policy really has nothing that fits there
    strict = load_policy("quality-first").model_copy(update={"fallback": None})
    assert brute_force(4, 654, strict) is None


@pytest.mark.parametrize("policy", ["quality-first", "balanced"])
def test_no_plan_fits_a_tiny_budget_and_the_smallest_budget_does(policy):
    pol, profile, workload = load_policy(policy), PROFILES[4], skewed_workload(n=300, batch_size=4)
    with pytest.raises(NoPlanFitsError) as info:
        search(profile, workload, A100, 100 * MB, policy, **MODELS)
    error = info.value
    assert error.budget_bytes == 100 * MB < error.smallest_budget_bytes
    message = str(error)
    assert "\n" not in message and format_bytes(error.smallest_budget_bytes) in message
    # the reported plan is the smallest the most permissive stage has (brute force over it)
    widest = pol.relaxed() or pol
    evaluate = Evaluator(profile, workload, A100, **MODELS)
    no_fits = adapted_keys(profile)  # a profile without LoRA fits: adapters are not searched
    assert not no_fits
    smallest_peak = min(evaluate(k, widest).peak_bytes
                        for k in enumerate_space(widest, 4, workload, A100, adapted=no_fits))
    assert error.peak_bytes == smallest_peak == evaluate(error.knobs, widest).peak_bytes
    # the suggested budget is the true smallest one, rounded up to what format_bytes prints (0.1 MB)
    needed = pol.headroom.smallest_budget_for(smallest_peak)
    assert needed <= error.smallest_budget_bytes < needed + MB // 10
    assert exhaustive_best(profile, workload, A100, needed - 1, policy, **MODELS) is None
    assert exhaustive_best(profile, workload, A100, needed, policy, **MODELS) is not None
    # and the study finds a plan there
    result = search(profile, workload, A100, error.smallest_budget_bytes, policy, **MODELS)
    assert result.best.peak_bytes <= result.budget_bytes - result.headroom_bytes
    assert result.best.knobs.micro_batch_size <= 4


def test_bf16_only_policy_on_a_card_without_bf16_is_a_policy_error():
    policy = Policy(name="bf16-only", precisions=[Precision.bf16])
    with pytest.raises(PolicyError, match="bf16"):
        SearchSpace(policy, 4, WORKLOAD, get_device("t4"))
    space = SearchSpace(load_policy("balanced"), 4, WORKLOAD, get_device("t4"))
    assert "bf16" not in space.dims["precision"]
    assert all(k.precision != Precision.bf16 for k in space.enumerate())


# --- the space ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch,cap,expected", [
    (32, None, [1, 2, 4, 8, 16, 32]),
    (24, None, [1, 2, 4, 8, 16, 24]),
    (24, 8, [1, 2, 4, 8]),
    (24, 16, [1, 2, 4, 8, 16]),
    (7, None, [1, 2, 4, 7]),
    (1, None, [1]),
    (6, 1, [1]),
    (12, 12, [1, 2, 4, 8, 12]),
])
def test_micro_batch_sizes(batch, cap, expected):
    """Caps need not divide the batch: a step trains the whole batch either way, its last piece smaller."""
    assert micro_batch_sizes(batch, cap) == expected


@pytest.mark.parametrize("policy", ["balanced", "quality-first", "fastest", "minimal-memory"])
@pytest.mark.parametrize("batch", [12, 16])
def test_every_candidate_keeps_the_effective_batch(policy, batch):
    workload = skewed_workload(n=300, batch_size=batch)
    pol = load_policy(policy)
    space = SearchSpace(pol, 4, workload, A100)
    knobs = list(space.enumerate())
    assert len(knobs) == len(set(knobs)) == space.size
    max_frozen = pol.freeze.max_frozen_layers(4)
    for k in knobs:
        assert 1 <= k.micro_batch_size <= batch  # a cap: every step still trains the whole batch
        assert k.freeze_layers <= max_frozen
        assert k.optimizer_bits in pol.optimizer_bits and k.precision in pol.precisions
        assert all(freeze.trains("layer", i, k) for i in k.checkpoint_layers)  # only trainable layers
        assert k.checkpoint_layers == tuple(range(k.freeze_layers, k.freeze_layers + len(k.checkpoint_layers)))
        if k.tokens_per_micro_batch is not None:
            assert k.bucket_boundaries and k.micro_batch_size > 1
            assert k.tokens_per_micro_batch >= k.bucket_boundaries[-1]  # one longest sequence always fits
        k.validate_for(4)


def test_search_keeps_a_non_power_of_two_effective_batch():
    workload = skewed_workload(n=300, batch_size=12)
    result = search(PROFILES[4], workload, A100, 700 * MB, "quality-first", **MODELS)
    for c in [result.best, *result.ranked]:
        assert c.knobs.micro_batch_size in (1, 2, 4, 8, 12)  # 8 does not divide 12: steps of 8 + 4
    assert result.best.memory.peak_bytes <= 700 * MB


def test_policy_caps_the_micro_batch_and_freezing():
    policy = load_policy("balanced").model_copy(update={"max_micro_batch": 4})
    knobs = list(enumerate_space(policy, 8, WORKLOAD))
    assert {k.micro_batch_size for k in knobs} == {1, 2, 4}
    assert max(k.freeze_layers for k in knobs) == 2  # max_fraction 0.25 of 8 layers


def test_a_fixed_length_workload_has_no_buckets():
    workload = Workload(lengths=LengthHistogram.fixed(128, 256), batch_size=16)
    space = SearchSpace(load_policy("balanced"), 4, workload, A100)
    assert space.dims["buckets"] == [0] and space.dims["token_budget"] == [0]
    assert all(not k.bucket_boundaries and k.tokens_per_micro_batch is None for k in space.enumerate())


# --- ranking, words, alternatives --------------------------------------------------------------------------


def _candidate(score, risk, peak, seconds=None, knobs=None) -> Candidate:
    memory = MemoryBreakdown(weights=peak, gradients=0, optimizer_state=0, activations=0, temporaries=0,
                             overhead=0, peak_phase="backward")
    time = TimePrediction(step_seconds=1.0, epoch_seconds=seconds or score, samples_per_second=1.0)
    return Candidate(knobs=knobs or Knobs(), memory=memory, time=time, risk=risk, score=score)


def test_rank_prefers_the_least_risky_of_tied_plans_and_drops_what_does_not_fit():
    policy = Policy(name="p", tie_tolerance=0.05)
    fast_risky = _candidate(100.0, 0.3, 10)
    tied_safe = _candidate(104.0, 0.0, 10)
    slower = _candidate(106.0, 0.0, 10)
    slowest = _candidate(200.0, 0.0, 10)
    too_big = _candidate(50.0, 0.0, 11)
    ranked = rank([slowest, too_big, slower, fast_risky, tied_safe], policy, limit_bytes=10)
    assert ranked == [tied_safe, fast_risky, slower, slowest]
    assert rank([too_big], policy, limit_bytes=10) == []
    assert rank([fast_risky, tied_safe], policy.model_copy(update={"tie_tolerance": 0.0}), 10)[0] is fast_risky


def test_evaluator_scores_time_with_the_risk_price_and_memory_by_peak():
    evaluate = Evaluator(PROFILES[4], WORKLOAD, A100, **MODELS)
    knobs = Knobs(freeze_embeddings=True, precision=Precision.fp16, micro_batch_size=4)
    balanced = load_policy("balanced")
    c = evaluate(knobs, balanced)
    assert c.risk == pytest.approx(balanced.risk(knobs, 4)) and c.risk > 0
    assert c.score == pytest.approx(c.epoch_seconds * (1 + balanced.risk_price * c.risk))
    assert evaluate(knobs, load_policy("minimal-memory")).score == c.peak_bytes
    assert evaluate(knobs, load_policy("fastest")).score == pytest.approx(c.epoch_seconds)  # risk_price 0


def test_what_changed_is_as_coarse_as_a_person_weighs_it():
    chosen = Knobs(freeze_embeddings=True, freeze_layers=2, checkpoint_layers=(2, 3, 4, 5), micro_batch_size=2)
    # all trainable layers checkpointed either way; which layers does not count, how many does
    assert changed_techniques(chosen, Knobs(checkpoint_layers=tuple(range(6)), micro_batch_size=2), 6) == [
        "freezing"]
    assert changed_techniques(chosen, chosen.model_copy(update=dict(checkpoint_layers=(3, 4))), 6) == [
        "checkpointing"]
    other = chosen.model_copy(update=dict(optimizer_bits=8, precision=Precision.bf16, micro_batch_size=4))
    assert changed_techniques(chosen, other, 6) == ["precision", "optimizer", "micro-batch"]
    # a token budget without buckets changes nothing: dynamic padding either way
    assert changed_techniques(chosen, chosen.model_copy(update=dict(tokens_per_micro_batch=512)), 6) == []


@pytest.mark.parametrize("layers,budget_mb", [(4, 800), (6, 660)])
def test_alternatives_differ_from_the_plan_and_from_each_other(layers, budget_mb):
    result = run(layers, budget_mb, "balanced")
    alts = alternatives(result, k=3)
    assert len(alts) == 3
    changed = set()
    for a in alts:
        assert a.knobs != result.best.knobs
        assert a.peak_bytes <= limit_of(result)
        diff = {k for k, v in a.knobs.model_dump().items() if v != result.best.knobs.model_dump()[k]}
        assert diff - {"micro_batch_size"}, "more than the micro-batch differs"
        assert a.changed == changed_techniques(result.best.knobs, a.knobs, layers)
        assert a.changed != ["micro-batch"]
        changed.add(tuple(a.changed))
    assert len(changed) == len(alts)
    assert alternatives(result, k=1) == alts[:1]


# --- a stored study ----------------------------------------------------------------------------------------

SMALL = Policy(name="small", freeze={"embeddings": True, "max_layers": 1}, precisions=[Precision.bf16],
               bucketing={"counts": [0]}, max_micro_batch=2)


def test_a_stored_grid_study_resumes_without_new_trials(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    workload = skewed_workload(n=300, batch_size=8)
    space = SearchSpace(SMALL, 4, workload, A100)
    first = search(PROFILES[4], workload, A100, 1000 * MB, SMALL, storage=storage, **MODELS)
    assert first.trials == space.grid_size == 6 and first.storage == storage and first.study_name
    again = search(PROFILES[4], workload, A100, 1000 * MB, SMALL, storage=storage, **MODELS)
    assert again.trials == 0
    assert again.study_name == first.study_name
    assert again.best.knobs == first.best.knobs and again.best.score == first.best.score
    assert [c.knobs for c in again.ranked] == [c.knobs for c in first.ranked]
    # and a stored study answers what an in-memory one does
    assert search(PROFILES[4], workload, A100, 1000 * MB, SMALL, **MODELS).best.knobs == first.best.knobs


def test_a_stored_sampled_study_resumes_without_new_trials(tmp_path):
    """A space larger than the trial budget is sampled (TPE): resuming runs only the trials left."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    first = run(4, 1200, "quality-first", storage=storage, n_trials=6)
    assert first.trials == 6
    again = run(4, 1200, "quality-first", storage=storage, n_trials=6)
    assert again.trials == 0
    assert again.best.knobs == first.best.knobs and again.best.score == first.best.score
    more = run(4, 1200, "quality-first", storage=storage, n_trials=8)
    assert more.trials == 2
    assert min(c.score for c in [more.best, *more.ranked]) <= min(c.score for c in [first.best, *first.ranked])


def test_search_leaves_the_callers_optuna_verbosity_as_it_was():
    import optuna

    before = optuna.logging.get_verbosity()
    try:
        optuna.logging.set_verbosity(optuna.logging.DEBUG)
        search(PROFILES[4], WORKLOAD, A100, 800 * MB, SMALL, **MODELS)
        assert optuna.logging.get_verbosity() == optuna.logging.DEBUG
    finally:
        optuna.logging.set_verbosity(before)
