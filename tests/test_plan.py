"""The Plan (autofit/plan.py) and the Knobs it carries: JSON round trip, TrainingArguments, validation."""

import json

import pytest
from pydantic import ValidationError

from autofit.devices import get_device
from autofit.knobs import Knobs, Precision
from autofit.plan import MemoryBreakdown, Plan
from autofit.search import alternatives, search

from _profiles import make_profile, skewed_workload

A100 = get_device("a100")


@pytest.fixture(scope="module")
def plan() -> Plan:
    """A real plan: a quality-first search on a hand-built profile, with its alternatives."""
    profile = make_profile(hidden=128, layers=4, vocab=4000)
    workload = skewed_workload(n=300, batch_size=16)
    budget = 700 * 2**20
    result = search(profile, workload, A100, budget, "quality-first")
    return Plan(model_id=profile.model_id, model_type=profile.model_type, num_layers=profile.num_layers,
                num_params=profile.num_params, task=profile.task, budget_bytes=budget, device=A100,
                policy=result.policy, headroom_bytes=result.headroom_bytes, knobs=result.knobs,
                predicted=result.memory, time=result.time, workload=workload, alternatives=alternatives(result),
                search=result.info(), profile_device=profile.device,
                versions={"autofit": "0.1.0", "torch": "2.13.0"}, created="2026-01-01T00:00:00Z")


def with_knobs(plan: Plan, **changes) -> Plan:
    return plan.model_copy(update={"knobs": Knobs(**changes)})


# --- JSON ----------------------------------------------------------------------------------------------------


def test_save_and_load_give_the_same_plan(plan, tmp_path):
    assert plan.alternatives and plan.search is not None and plan.search.trials > 0
    path = plan.save(tmp_path / "plan.json")
    loaded = Plan.load(path)
    assert loaded == plan
    assert loaded.to_json() == plan.to_json()
    # types survive the trip, not just values
    assert isinstance(loaded.knobs.checkpoint_layers, tuple) and isinstance(loaded.knobs.bucket_boundaries, tuple)
    assert isinstance(loaded.knobs.precision, Precision)
    assert isinstance(loaded.predicted.peak_shape, tuple)
    assert loaded.predicted.peak_bytes == plan.predicted.peak_bytes
    assert hash(loaded.knobs) == hash(plan.knobs)


def test_the_json_holds_what_the_design_promises(plan, tmp_path):
    data = json.loads(plan.save(tmp_path / "plan.json").read_text())
    assert data["model_id"] == "tiny-bert" and data["budget_bytes"] == plan.budget_bytes
    assert data["device"]["name"] == "a100" and data["policy"] == "quality-first"
    assert set(data["knobs"]) >= {"freeze_embeddings", "freeze_layers", "checkpoint_layers", "precision",
                                  "optimizer_bits", "micro_batch_size", "tokens_per_micro_batch",
                                  "accumulation_steps", "bucket_boundaries"}
    assert set(data["predicted"]) >= {"weights", "gradients", "optimizer_state", "activations", "temporaries",
                                      "overhead", "peak_phase"}
    assert set(data["time"]) >= {"step_seconds", "epoch_seconds"}
    assert data["versions"]["autofit"] == "0.1.0"
    assert all(a["note"] for a in data["alternatives"])


def test_a_tampered_plan_does_not_load(plan, tmp_path):
    data = json.loads(plan.to_json())
    data["knobs"].update(freeze_embeddings=False, freeze_layers=2)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValidationError, match="freeze_embeddings"):
        Plan.load(path)
    data = json.loads(plan.to_json())
    data["knobs"]["learning_rate"] = 1e-3  # knobs are strict: an unknown knob is an error, not ignored
    path.write_text(json.dumps(data))
    with pytest.raises(ValidationError, match="learning_rate"):
        Plan.load(path)


def test_headroom_left_and_breakdown_sums(plan):
    m = plan.predicted
    assert m.peak_bytes == (m.weights + m.gradients + m.optimizer_state + m.activations + m.temporaries
                            + m.overhead)
    assert m.allocated_bytes == m.peak_bytes - m.overhead
    assert plan.headroom_left_bytes == plan.budget_bytes - m.peak_bytes >= plan.headroom_bytes


# --- TrainingArguments -----------------------------------------------------------------------------------


def test_training_arguments_map_the_knobs(plan, tmp_path):
    knobs = Knobs(freeze_embeddings=True, checkpoint_layers=(2, 3), precision=Precision.fp16, optimizer_bits=8,
                  micro_batch_size=4, accumulation_steps=4, bucket_boundaries=(64, 512))
    args = with_knobs(plan, **knobs.model_dump()).to_training_arguments(str(tmp_path))
    assert args.output_dir == str(tmp_path)
    assert args.per_device_train_batch_size == 4 and args.gradient_accumulation_steps == 4
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == plan.workload.batch_size
    assert args.fp16 and not args.bf16
    assert str(args.optim.value) == "adamw_bnb_8bit"
    assert args.gradient_checkpointing  # HF checkpoints all layers when any is checkpointed
    assert args.gradient_checkpointing_kwargs == {"use_reentrant": False}  # frozen layers need non-reentrant
    if hasattr(args, "train_sampling_strategy"):  # transformers >= 5 (group_by_length before)
        assert args.train_sampling_strategy == "group_by_length"
    else:
        assert args.group_by_length
    assert args.report_to in ([], "none", ["none"])


def test_training_arguments_for_plain_training(plan, tmp_path):
    args = with_knobs(plan, micro_batch_size=16).to_training_arguments(str(tmp_path))
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (16, 1)
    assert not args.fp16 and not args.bf16 and not args.gradient_checkpointing
    assert str(args.optim.value) == "adamw_torch"
    if hasattr(args, "train_sampling_strategy"):
        assert args.train_sampling_strategy == "random"
    else:
        assert not args.group_by_length


def test_training_arguments_bf16_and_overrides(plan, tmp_path):
    bf16 = with_knobs(plan, precision=Precision.bf16, micro_batch_size=8, accumulation_steps=2)
    # on a machine without a bf16 GPU, TrainingArguments wants use_cpu=True; overrides pass straight through
    args = bf16.to_training_arguments(str(tmp_path), use_cpu=True, learning_rate=3e-5,
                                      gradient_accumulation_steps=5)
    assert args.bf16 and not args.fp16
    assert args.learning_rate == 3e-5 and args.gradient_accumulation_steps == 5
    # a plan for the CPU says so itself
    on_cpu = bf16.model_copy(update={"device": get_device("cpu")}).to_training_arguments(str(tmp_path))
    assert on_cpu.use_cpu and on_cpu.bf16


# --- Knobs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,words", [
    (dict(freeze_layers=2), "requires freeze_embeddings"),
    (dict(optimizer_bits=16), "optimizer_bits must be 8 or 32"),
    (dict(checkpoint_layers=(3, 1)), "sorted and unique"),
    (dict(checkpoint_layers=(1, 1)), "sorted and unique"),
    (dict(checkpoint_layers=(-1, 0)), "non-negative"),
    (dict(bucket_boundaries=(512, 64)), "sorted and unique"),
    (dict(micro_batch_size=0), "micro_batch_size"),
    (dict(accumulation_steps=0), "accumulation_steps"),
    (dict(tokens_per_micro_batch=0), "tokens_per_micro_batch"),
    (dict(freeze_layers=-1, freeze_embeddings=True), "freeze_layers"),
    (dict(precision="fp8"), "precision"),
    (dict(lr=1e-3), "lr"),
])
def test_knobs_validation_errors(kwargs, words):
    with pytest.raises(ValidationError, match=words):
        Knobs(**kwargs)


def test_knobs_are_immutable_and_hashable():
    knobs = Knobs(micro_batch_size=4, accumulation_steps=8)
    with pytest.raises(ValidationError):
        knobs.micro_batch_size = 2
    assert knobs == Knobs(micro_batch_size=4, accumulation_steps=8)
    assert len({knobs, Knobs(micro_batch_size=4, accumulation_steps=8), Knobs()}) == 2
    assert knobs.effective_batch_size == 32


def test_knobs_against_a_model_depth():
    knobs = Knobs(freeze_embeddings=True, freeze_layers=2, checkpoint_layers=(2, 5))
    assert list(knobs.trainable_layers(6)) == [2, 3, 4, 5]
    knobs.validate_for(6)
    with pytest.raises(ValueError, match=r"checkpoint_layers \[5\] out of range"):
        knobs.validate_for(5)
    with pytest.raises(ValueError, match="freeze_layers=2 but the model has 1 layers"):
        Knobs(freeze_embeddings=True, freeze_layers=2).validate_for(1)
    assert list(Knobs(freeze_embeddings=True, freeze_layers=8).trainable_layers(6)) == []


def test_memory_breakdown_phase_is_checked():
    with pytest.raises(ValidationError):
        MemoryBreakdown(weights=1, gradients=0, optimizer_state=0, activations=0, temporaries=0, overhead=0,
                        peak_phase="warmup")
