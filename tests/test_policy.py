"""Policies (autofit/policy.py): the shipped presets, validation errors, headroom math, risk."""

import pytest
import yaml

from autofit.knobs import Knobs, Precision
from autofit.policy import (
    FreezeRule,
    Headroom,
    Policy,
    PolicyError,
    load_policy,
    parse_policy,
    shipped_policies,
)

SHIPPED = ["adapters", "balanced", "fastest", "minimal-memory", "quality-first"]


def test_shipped_policies_are_listed():
    assert shipped_policies() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_policy_loads_and_validates(name):
    policy = load_policy(name)
    assert policy.name == name and policy.description
    assert Policy.model_validate(policy.model_dump()) == policy  # a dump validates back unchanged
    assert policy.precisions and policy.optimizer_bits
    assert 0 < policy.headroom.fraction < 0.2
    relaxed = policy.relaxed()
    if relaxed is not None:
        assert relaxed.fallback is None and relaxed.name == name


@pytest.mark.parametrize("spelling", ["Quality_First", " quality-first ", "QUALITY-FIRST"])
def test_names_are_forgiving(spelling):
    assert load_policy(spelling) == load_policy("quality-first")


def test_a_policy_object_passes_through():
    policy = Policy(name="mine")
    assert load_policy(policy) is policy


def test_quality_first_never_freezes_layers_and_uses_8bit_only_as_fallback():
    policy = load_policy("quality-first")
    assert policy.freeze.max_frozen_layers(48) == 0
    assert policy.optimizer_bits == [32] and Precision.fp16 not in policy.precisions
    relaxed = policy.relaxed()
    assert 8 in relaxed.optimizer_bits and Precision.fp16 in relaxed.precisions
    assert relaxed.freeze.max_frozen_layers(48) == 0  # not even the fallback freezes layers
    # everything else stays as it was
    assert relaxed.model_dump(exclude={"precisions", "optimizer_bits", "fallback"}) == \
        policy.model_dump(exclude={"precisions", "optimizer_bits", "fallback"})


@pytest.mark.parametrize("name,layers,expected", [
    ("balanced", 12, 3), ("balanced", 6, 1), ("balanced", 3, 0), ("fastest", 12, 6), ("fastest", 7, 3),
    ("minimal-memory", 24, 12), ("quality-first", 24, 0),
])
def test_freeze_caps(name, layers, expected):
    assert load_policy(name).freeze.max_frozen_layers(layers) == expected


def test_freeze_rule_caps_combine():
    assert FreezeRule(embeddings=True, max_layers=2, max_fraction=0.5).max_frozen_layers(12) == 2
    assert FreezeRule(embeddings=True, max_layers=8, max_fraction=0.25).max_frozen_layers(12) == 3
    assert FreezeRule(embeddings=True, max_layers=30).max_frozen_layers(12) == 12
    assert FreezeRule(embeddings=True).max_frozen_layers(12) == 0  # neither cap: no layer
    assert FreezeRule().max_frozen_layers(12) == 0


# --- errors ------------------------------------------------------------------------------------------------


def write(tmp_path, text, name="mine.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(source) -> str:
    with pytest.raises(PolicyError) as info:
        load_policy(source)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_bad_yaml(tmp_path):
    message = error_of(write(tmp_path, "name: [unclosed\nobjective: time\n"))
    assert "not YAML" in message and "mine.yaml" in message


@pytest.mark.parametrize("text,field", [
    ("nme: x\n", "nme"),
    ("freeze:\n  embedings: true\n", "freeze.embedings"),
    ("headroom:\n  percent: 5\n", "headroom.percent"),
    ("risk_weights:\n  fp8: 0.1\n", "risk_weights.fp8"),
])
def test_unknown_fields_are_named(tmp_path, text, field):
    message = error_of(write(tmp_path, text))
    assert f": {field}: " in message and "xtra" in message  # pydantic: "Extra inputs are not permitted"


@pytest.mark.parametrize("text,field", [
    ("risk_price: lots\n", "risk_price"),
    ("objective: speed\n", "objective"),
    ("precisions: [fp8]\n", "precisions.0"),
    ("optimizer_bits: [16]\n", "optimizer_bits.0"),
    ("optimizer_bits: []\n", "optimizer_bits"),
    ("max_micro_batch: 0\n", "max_micro_batch"),
    ("headroom:\n  fraction: 1.5\n", "headroom.fraction"),
    ("headroom:\n  bytes: lots\n", "headroom.bytes"),
    ("bucketing:\n  counts: [-1, 4]\n", "bucketing.counts"),
    ("freeze:\n  max_fraction: 0.5\n", "freeze"),
    ("freeze: yes\n", "freeze"),
    ("tie_tolerance: 1\n", "tie_tolerance"),
    ("adapters:\n  mode: sometimes\n", "adapters.mode"),
    ("adapters: lora\n", "adapters"),
    ("adapters:\n  ranks: []\n", "adapters.ranks"),
    ("adapters:\n  ranks: [0, 8]\n", "adapters.ranks"),
    ("adapters:\n  ranks: [8, 9999]\n", "adapters.ranks"),
    ("adapters:\n  targets: [mlp]\n", "adapters.targets.0"),
    ("adapters:\n  targets: []\n", "adapters.targets"),
    ("adapters:\n  bases: [int8]\n", "adapters.bases.0"),
    ("adapters:\n  double_quant: maybe\n", "adapters.double_quant"),
    ("adapters:\n  rank: [8]\n", "adapters.rank"),
    ("risk_weights:\n  lora_all_linear: 2\n", "risk_weights.lora_all_linear"),
    ("risk_weights:\n  lora: -1\n", "risk_weights.lora"),
])
def test_wrong_values_are_named(tmp_path, text, field):
    assert f": {field}: " in error_of(write(tmp_path, text))


@pytest.mark.parametrize("text,field", [
    ("risk_price: .inf\n", "risk_price"),
    ("risk_price: .nan\n", "risk_price"),
    ("tie_tolerance: .nan\n", "tie_tolerance"),
    ("headroom:\n  fraction: .nan\n", "headroom.fraction"),
    ("headroom:\n  bytes: .inf\n", "headroom.bytes"),
    ("risk_weights:\n  fp16: .inf\n", "risk_weights.fp16"),
    ("risk_weights:\n  frozen_layers: .nan\n", "risk_weights.frozen_layers"),
    ("freeze:\n  embeddings: true\n  max_fraction: .nan\n", "freeze.max_fraction"),
    ("fallback:\n  freeze:\n    embeddings: true\n    max_fraction: .nan\n", "fallback.freeze.max_fraction"),
])
def test_infinite_and_nan_numbers_are_named(tmp_path, text, field):
    assert f": {field}: " in error_of(write(tmp_path, text))


@pytest.mark.parametrize("text,message", [
    ("headroom:\n  bytes: 2048TB\n", "headroom '2048TB' is larger than 1 PB"),
    ("headroom:\n  bytes: 1e30\n", "headroom 1e+30 is larger than 1 PB"),  # a number, as YAML 1.2 reads it
    ("headroom:\n  bytes: '1e30'\n", "headroom '1e30' is larger than 1 PB"),
    ("headroom:\n  bytes: 1267650600228229401496703205376\n", "less than or equal to 1125899906842624"),
])
def test_headroom_bytes_are_capped_like_budgets(tmp_path, text, message):
    assert message in error_of(write(tmp_path, text))


def test_a_small_headroom_is_allowed():
    assert Headroom(bytes="64KB").bytes == 64 * 2**10  # budgets have a 1 MB floor; headroom does not


def test_freezing_layers_needs_frozen_embeddings(tmp_path):
    assert "needs embeddings" in error_of(write(tmp_path, "freeze:\n  max_layers: 2\n"))


@pytest.mark.parametrize("text", ["- a\n- b\n", "just words\n", ""])
def test_not_a_mapping(tmp_path, text):
    assert "expected a mapping" in error_of(write(tmp_path, text))


def test_unknown_policy_name_lists_the_shipped_ones():
    message = error_of("speedy")
    assert "unknown policy 'speedy'" in message and ", ".join(SHIPPED) in message


def test_missing_policy_file(tmp_path):
    assert "not found" in error_of(tmp_path / "nope.yaml")
    assert "is a directory" in error_of(tmp_path)  # a folder is not a policy file


def test_a_policy_file_takes_its_name_from_the_file(tmp_path):
    path = write(tmp_path, "objective: memory\nheadroom:\n  bytes: 1GB\n", name="tight.yml")
    policy = load_policy(path)
    assert policy.name == "tight" and policy.objective == "memory"
    assert policy.headroom.bytes == 2**30
    assert load_policy(str(write(tmp_path, "name: other\n"))).name == "other"


def test_a_shipped_policy_round_trips_through_yaml(tmp_path):
    original = load_policy("balanced")
    path = write(tmp_path, yaml.safe_dump(original.model_dump(mode="json")))
    assert load_policy(path) == original


def test_parse_policy_reports_the_source():
    with pytest.raises(PolicyError, match=r"^invalid policy <mine>: precisions: "):
        parse_policy({"name": "x", "precisions": []}, "<mine>")


# --- headroom ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction,floor,budget,expected", [
    (0.05, 0, 16 * 2**30, int(0.05 * 16 * 2**30)),
    (0.05, 2**30, 16 * 2**30, 2**30),  # the byte floor wins on a small card
    (0.05, 2**30, 40 * 2**30, 2 * 2**30),  # the fraction wins on a large one
    (0.0, 0, 10**9, 0),
    (0.08, 0, 999, 79),  # rounded down
])
def test_headroom_for_budget(fraction, floor, budget, expected):
    assert Headroom(fraction=fraction, bytes=floor).for_budget(budget) == expected


@pytest.mark.parametrize("fraction,floor", [(0.05, 0), (0.08, 0), (0.03, 500 * 2**20), (0.0, 0), (0.5, 7)])
@pytest.mark.parametrize("peak", [0, 1, 999, 1000, 12_345_678, 7 * 2**30 + 3, 80 * 2**30])
def test_smallest_budget_is_the_smallest_that_fits(fraction, floor, peak):
    headroom = Headroom(fraction=fraction, bytes=floor)
    budget = headroom.smallest_budget_for(peak)
    assert budget - headroom.for_budget(budget) >= peak
    if budget > 0:
        assert budget - 1 - headroom.for_budget(budget - 1) < peak
    # and every larger budget fits too (what the search relies on)
    for more in (1, 2, 1000):
        assert budget + more - headroom.for_budget(budget + more) >= peak


def test_headroom_bytes_accept_sizes():
    assert Headroom(bytes="512MB").bytes == 512 * 2**20
    assert Headroom(bytes="0").bytes == 0
    with pytest.raises(ValueError):
        Headroom(bytes="lots")


# --- risk --------------------------------------------------------------------------------------------------


def test_plain_training_has_no_risk():
    for name in SHIPPED:
        assert load_policy(name).risk(Knobs(), 12) == 0.0


def test_risk_ordering():
    policy = load_policy("balanced")

    def risk(**kw):
        return policy.risk(Knobs(**kw), 12)

    assert risk() < risk(precision=Precision.bf16) < risk(precision=Precision.fp16)
    assert risk() < risk(freeze_embeddings=True) < risk(freeze_embeddings=True, freeze_layers=1) \
        < risk(freeze_embeddings=True, freeze_layers=3)
    assert risk() < risk(optimizer_bits=8)
    # steps are random examples whatever the buckets (they only cap micro-batches): bucketing risks nothing
    assert risk() == risk(bucket_boundaries=(64, 128))
    # checkpointing, accumulation and token budgets change no numbers: no risk
    assert risk(checkpoint_layers=tuple(range(12)), micro_batch_size=2, tokens_per_micro_batch=256) == 0.0
    # risks add up
    both = risk(precision=Precision.fp16, optimizer_bits=8)
    assert both == pytest.approx(risk(precision=Precision.fp16) + risk(optimizer_bits=8))


def test_frozen_layer_risk_is_a_fraction_of_depth():
    policy = load_policy("balanced")
    knobs = Knobs(freeze_embeddings=True, freeze_layers=3)
    w = policy.risk_weights
    assert policy.risk(knobs, 12) == pytest.approx(w.freeze_embeddings + w.frozen_layers * 3 / 12)
    assert policy.risk(knobs, 6) > policy.risk(knobs, 12)  # 3 of 6 layers is more of the model than 3 of 12


def test_quality_first_prices_risk_highest():
    prices = {name: load_policy(name).risk_price for name in SHIPPED}
    assert prices["quality-first"] > prices["balanced"] > prices["fastest"] == 0.0


# --- adapters ----------------------------------------------------------------------------------------------


def test_policy_files_without_adapters_never_train_them():
    assert Policy(name="old").adapters.mode == "never"
    assert [suffix for suffix, _ in Policy(name="old").stages()] == [""]


def test_shipped_adapter_modes():
    modes = {name: load_policy(name).adapters.mode for name in SHIPPED}
    assert modes == {"adapters": "always", "balanced": "allowed", "fastest": "allowed",
                     "minimal-memory": "fallback", "quality-first": "fallback"}
    assert all(load_policy(name).searches_adapters for name in SHIPPED)


@pytest.mark.parametrize("choice,mode", [("auto", "fallback"), ("none", "never"), ("lora", "always")])
def test_a_users_adapter_choice_overrides_the_mode(choice, mode):
    policy = load_policy("quality-first").with_adapter(choice)
    assert policy.adapters.mode == mode and policy.searches_adapters == (mode != "never")
    assert policy.adapters.ranks == load_policy("quality-first").adapters.ranks


def test_a_bad_adapter_choice_is_one_line():
    with pytest.raises(ValueError, match="adapter must be one of auto, none, lora, not 'qlora'") as info:
        load_policy("balanced").with_adapter("qlora")
    assert "\n" not in str(info.value)


def test_adapter_risk():
    policy = load_policy("balanced")
    w = policy.risk_weights

    def risk(**kw):
        return policy.risk(Knobs(adapter="lora", **kw), 12)

    assert risk() == pytest.approx(w.lora) and w.lora > 0  # rank 16 on attention, fp32 base
    assert risk(lora_rank=8) > risk() > risk(lora_rank=64)  # a higher rank is less risky
    assert risk(lora_targets="all-linear") == pytest.approx(w.lora_all_linear * risk())
    assert risk(lora_targets="all-linear") < risk()
    assert risk(base_dtype="nf4") == pytest.approx(risk() + w.nf4_base)
    both = risk(precision=Precision.bf16, base_dtype="bf16")
    assert both == pytest.approx(risk() + w.bf16)  # the precision's risk adds to the adapter's
    assert w.adapter(Knobs()) == 0.0


@pytest.mark.parametrize("field, value", [("checkpointing", 1), ("checkpointing", "yes"), ("max_micro_batch", 4.0),
                                          ("max_micro_batch", "4"), ("max_micro_batch", True),
                                          ("risk_price", "0.5"), ("risk_price", True)])
def test_a_policy_field_of_the_wrong_kind_is_refused_not_coerced(tmp_path, field, value):
    """YAML already reads `yes`, `4` and `0.5` as a bool, an int and a float: a quoted number, a float where a
    count goes or a boolean where a number goes is a typo to name, not a value to guess."""
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "mine", field: value}))
    with pytest.raises(PolicyError, match=field):
        load_policy(str(path))
    path.write_text(yaml.safe_dump({"name": "mine", "risk_price": 1, "max_micro_batch": 4, "checkpointing": False}))
    assert load_policy(str(path)).risk_price == 1.0


def test_numbers_with_an_exponent_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML) reads 5e-2 as a string; YAML 1.2, and people, read a number. A quoted one is a string."""
    path = tmp_path / "p.yaml"
    path.write_text("name: mine\nheadroom:\n  fraction: 5e-2\nrisk_price: 1E-3\n")
    policy = load_policy(str(path))
    assert policy.headroom.fraction == 0.05 and policy.risk_price == 0.001
    path.write_text('name: mine\nrisk_price: "1e-3"\n')
    with pytest.raises(PolicyError, match="risk_price"):
        load_policy(str(path))
