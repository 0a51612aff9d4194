"""The search with adapters (LoRA/QLoRA): the space's knobs, its stages per adapter mode, the study against
brute force, and quality-first's order (full fine-tuning, then its fallback, then adapters). Hand-built
profiles with LoRA fits (tests/_profiles.py), priced by the real memory and time models."""

import pytest

from autofit.devices import get_device
from autofit.knobs import Knobs, Precision
from autofit.policy import Policy, PolicyError, load_policy
from autofit.search import NoPlanFitsError, SearchSpace, exhaustive_best, search
from autofit.search.space import adapted_keys
from autofit.techniques.lora import activation_key

from _profiles import cached_models, adapted_profile, make_profile, skewed_workload

MB = 2**20
A100 = get_device("a100")
WORKLOAD = skewed_workload(n=300, batch_size=8)
PROFILE = adapted_profile(hidden=512, layers=4, vocab=4000)


MODELS = cached_models()
SMALL = Policy(name="small-lora", freeze={"embeddings": True, "max_layers": 1},
               precisions=[Precision.bf16, Precision.fp32], optimizer_bits=[32, 8], bucketing={"counts": [0, 4]},
               risk_price=1.0, adapters={"mode": "allowed", "ranks": [8, 32]})


def space(policy, adapted=None, profile=PROFILE):
    policy = load_policy(policy)
    return SearchSpace(policy, profile.num_layers, WORKLOAD, A100,
                       adapted=adapted_keys(profile) if adapted is None else adapted)


# --- the space ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["adapters", "balanced", "fastest", SMALL])
def test_every_adapter_knob_is_valid_and_each_is_counted_once(policy):
    s = space(policy)
    rule = s.policy.adapters
    knobs = list(s.enumerate())
    assert len(knobs) == len(set(knobs)) == s.size
    lora = [k for k in knobs if k.adapter == "lora"]
    assert lora and (rule.mode == "always") == (len(lora) == len(knobs))
    for k in knobs:
        k.validate_for(PROFILE.num_layers)
        Knobs.model_validate(k.model_dump())  # the Knobs' own rules hold
    for k in lora:
        assert not k.freeze_embeddings and k.freeze_layers == 0  # the adapter freezes the base itself
        assert k.base_dtype in ("nf4", k.precision.value)  # a plain base takes the precision's dtype
        assert k.lora_rank in rule.ranks and k.lora_targets in rule.targets
        assert k.double_quant or k.base_dtype == "nf4"
    # every rank x targets x base the rule allows is there, for every precision
    allowed = {(r, t, b == "nf4", p)
               for r in rule.ranks for t in rule.targets for b in rule.bases for p in s.policy.precisions}
    assert {(k.lora_rank, k.lora_targets, k.base_dtype == "nf4", k.precision) for k in lora} == allowed


def test_allowed_adds_adapter_plans_to_the_full_fine_tuning_space():
    allowed = set(space(SMALL).enumerate())
    never = set(space(SMALL.with_adapter("none")).enumerate())
    always = set(space(SMALL.with_adapter("lora")).enumerate())
    assert never and always and allowed == never | always and not never & always
    assert all(k.adapter == "none" for k in never) and all(k.adapter == "lora" for k in always)
    assert {k.lora_rank for k in never} == {16}  # without an adapter its knobs stay at their defaults


def test_a_profile_without_lora_fits_searches_no_adapters():
    plain = make_profile(hidden=64, layers=4, vocab=1000)
    assert adapted_keys(plain) == frozenset()
    assert set(space(SMALL, profile=plain).enumerate()) == set(space(SMALL.with_adapter("none")).enumerate())
    assert "adapter" not in space(SMALL, profile=plain).dims
    with pytest.raises(PolicyError, match="no LoRA fits.*adapters=True") as info:
        space("adapters", profile=plain)
    assert "\n" not in str(info.value)


def test_only_the_measured_targets_and_bases_are_searched():
    keys = {activation_key("all-linear", base, p) for base in ("plain", "nf4") for p in ("bf16", "fp32")}
    knobs = [k for k in space(SMALL, adapted=keys).enumerate() if k.adapter == "lora"]
    assert knobs and {k.lora_targets for k in knobs} == {"all-linear"}
    no_nf4 = {key for key in keys if "nf4" not in key}
    assert {k.base_dtype for k in space(SMALL, adapted=no_nf4).enumerate()} == {"fp32", "bf16"}


def test_starting_points_are_points_of_the_space():
    for policy in (SMALL, "adapters", "balanced"):
        s = space(policy)
        points = s.starting_points()
        assert any(p.get("adapter") == "lora" and p["lora_base"] == "nf4" for p in points)  # QLoRA
        for point in points:
            assert set(point) == set(s.dims)
            assert all(point[name] in choices or name in ("freeze_depth", "checkpoint")
                       for name, choices in s.dims.items())
            s.knobs({**point, "checkpoint": 0}).validate_for(PROFILE.num_layers)


# --- stages ---------------------------------------------------------------------------------------------------


def test_stages_follow_the_adapter_mode():
    def modes(policy, **kw):
        return [(suffix, stage.adapters.mode) for suffix, stage in load_policy(policy).stages(**kw)]

    assert modes("quality-first") == [("", "never"), (".fallback", "never"), (".adapters", "always")]
    assert modes("quality-first", adapters=False) == [("", "never"), (".fallback", "never")]
    assert modes("minimal-memory") == [("", "never"), (".adapters", "always")]
    assert modes("balanced") == [("", "allowed")]
    assert modes("adapters") == [("", "always")]
    assert modes(load_policy("quality-first").with_adapter("none")) == [("", "never"), (".fallback", "never")]
    assert modes(load_policy("quality-first").with_adapter("lora")) == [("", "always"), (".fallback", "always")]
    # the adapters stage is the most relaxed one: the fallback's 8-bit states and fp16 apply there too
    last = load_policy("quality-first").stages()[-1][1]
    assert 8 in last.optimizer_bits and Precision.fp16 in last.precisions


# --- the study ------------------------------------------------------------------------------------------------


def brute_force(budget_mb, policy):
    return exhaustive_best(PROFILE, WORKLOAD, A100, budget_mb * MB, policy, **MODELS)


@pytest.mark.parametrize("policy,budget_mb", [(SMALL, 640), (SMALL, 700), (SMALL, 2000),
                                              (SMALL.with_adapter("lora"), 650), ("quality-first", 680),
                                              ("quality-first", 760)])
def test_the_study_finds_the_brute_force_optimum_with_adapters(policy, budget_mb):
    result = search(PROFILE, WORKLOAD, A100, budget_mb * MB, policy, **MODELS)
    best = brute_force(budget_mb, policy)
    tolerance = load_policy(policy).tie_tolerance
    assert result.best.score <= best.score * (1 + tolerance)
    assert min(c.score for c in [result.best, *result.ranked]) >= best.score / (1 + tolerance)
    assert result.best.peak_bytes <= result.budget_bytes - result.headroom_bytes


def test_quality_first_trains_adapters_only_when_nothing_else_fits():
    loose = search(PROFILE, WORKLOAD, A100, 900 * MB, "quality-first", **MODELS)  # strict full FT fits
    assert not loose.relaxed and loose.best.knobs.adapter == "none" and loose.best.knobs.optimizer_bits == 32
    assert all(c.knobs.adapter == "none" for c in [loose.best, *loose.ranked])
    middle = search(PROFILE, WORKLOAD, A100, 760 * MB, "quality-first", **MODELS)  # only with 8-bit states
    assert middle.relaxed and middle.best.knobs.adapter == "none" and middle.best.knobs.optimizer_bits == 8
    tight = search(PROFILE, WORKLOAD, A100, 680 * MB, "quality-first", **MODELS)  # only LoRA fits
    assert tight.relaxed and tight.best.knobs.adapter == "lora"
    assert tight.best.knobs.lora_targets == "all-linear" and tight.best.knobs.lora_rank >= 16  # its rule
    no_adapters = load_policy("quality-first").with_adapter("none")
    assert brute_force(680, no_adapters) is None  # and full fine-tuning really does not fit there
    with pytest.raises(NoPlanFitsError):
        search(PROFILE, WORKLOAD, A100, 680 * MB, no_adapters, **MODELS)


def priced(lora_risk: float) -> Policy:
    return SMALL.model_copy(update={"risk_weights": SMALL.risk_weights.model_copy(update={"lora": lora_risk})})


def test_balanced_moves_to_adapters_when_they_pay_for_their_risk():
    roomy = search(PROFILE, WORKLOAD, A100, 2000 * MB, SMALL, **MODELS)
    full = brute_force(2000, SMALL.with_adapter("none"))
    lora = brute_force(2000, SMALL.with_adapter("lora"))
    assert roomy.best.knobs.adapter == ("lora" if lora.score < full.score else "none")
    # the stand-in adapters are ~1.5x faster: priced low they win where full fine-tuning fits, priced high not
    assert search(PROFILE, WORKLOAD, A100, 2000 * MB, priced(0.05), **MODELS).best.knobs.adapter == "lora"
    assert search(PROFILE, WORKLOAD, A100, 2000 * MB, priced(5.0), **MODELS).best.knobs.adapter == "none"
    # ... and where nothing else fits they win whatever their price
    assert search(PROFILE, WORKLOAD, A100, 650 * MB, priced(5.0), **MODELS).best.knobs.adapter == "lora"


def test_what_changed_names_the_adapter_once():
    from autofit.search import changed_techniques

    full = Knobs(precision=Precision.bf16)
    lora = Knobs(adapter="lora", base_dtype="bf16", precision=Precision.bf16)
    assert changed_techniques(full, lora, 4) == ["adapter"]
    # a plain base follows the precision: changing the precision is not another adapter
    fp32 = lora.model_copy(update=dict(base_dtype="fp32", precision=Precision.fp32))
    assert changed_techniques(lora, fp32, 4) == ["precision"]
    assert changed_techniques(lora, lora.model_copy(update=dict(base_dtype="nf4")), 4) == ["adapter"]
    assert changed_techniques(lora, lora.model_copy(update=dict(lora_rank=64)), 4) == ["adapter"]


def test_a_4_bit_base_is_not_offered_where_the_model_cannot_run_it_under_half_precision():
    deberta = PROFILE.model_copy(update={"model_type": "deberta-v2"})
    keys = adapted_keys(deberta)
    assert activation_key("attention", "nf4", "fp32") in keys and activation_key("attention", "plain", "bf16") in keys
    assert not {activation_key(t, "nf4", p) for t in ("attention", "all-linear") for p in ("bf16", "fp16")} & keys
    assert adapted_keys(PROFILE) > keys
