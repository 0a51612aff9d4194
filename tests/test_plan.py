"""The Plan (autofit/plan.py) and the Knobs it carries: JSON round trip, TrainingArguments, validation."""

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from autofit.devices import get_device
from autofit.knobs import MAX_MICRO_BATCH, Knobs, Precision
from autofit.plan import Plan, PlanFileError

from _profiles import searched_plan

A100 = get_device("a100")


@pytest.fixture(scope="module")
def plan() -> Plan:
    """A real plan: a quality-first search on a hand-built profile, with its alternatives."""
    return searched_plan()


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
    with pytest.raises(TypeError, match="^Plan.load takes a plan file's path, not NoneType$"):
        Plan.load(None)


def test_a_plan_file_from_before_alternatives_named_their_changes_still_loads(plan, tmp_path):
    data = json.loads(plan.to_json())
    data["alternatives"] = [{"knobs": a["knobs"], "peak_bytes": a["peak_bytes"], "epoch_seconds": a["epoch_seconds"],
                             "note": "with 8-bit AdamW: 1.2x slower"} for a in data["alternatives"]]
    (tmp_path / "old.json").write_text(json.dumps(data))
    loaded = Plan.load(tmp_path / "old.json")
    assert loaded.alternatives == [] and loaded.knobs == plan.knobs and loaded.predicted == plan.predicted


def test_the_json_holds_what_the_design_promises(plan, tmp_path):
    data = json.loads(plan.save(tmp_path / "plan.json").read_text())
    assert data["model_id"] == "tiny-bert" and data["budget_bytes"] == plan.budget_bytes
    assert data["device"]["name"] == "a100" and data["policy"] == "quality-first"
    assert set(data["knobs"]) >= {"freeze_embeddings", "freeze_layers", "checkpoint_layers", "precision",
                                  "optimizer_bits", "micro_batch_size", "tokens_per_micro_batch",
                                  "bucket_boundaries"}
    assert set(data["predicted"]) >= {"weights", "gradients", "optimizer_state", "activations", "temporaries",
                                      "overhead", "peak_phase"}
    # the headline numbers, so a script that reads the plan need not re-add the breakdown
    assert data["predicted"]["peak_bytes"] == plan.predicted.peak_bytes
    assert data["predicted"]["allocated_bytes"] == plan.predicted.allocated_bytes
    # the step as it runs: the effective batch and each bucket's micro-batches per step
    assert data["step"]["batch_size"] == plan.workload.batch_size == 16
    assert data["step"]["steps_per_epoch"] == 19  # ceil(300 / 16)
    assert sum(b["examples"] for b in data["step"]["buckets"]) == 300
    fewest, most = data["step"]["micro_batches_per_step"]
    assert 1 <= fewest <= data["step"]["mean_micro_batches_per_step"] <= most
    assert set(data["time"]) >= {"step_seconds", "epoch_seconds"}
    assert data["versions"]["autofit"] == "0.1.0"
    assert all(a["changed"] for a in data["alternatives"])


def mutated(plan: Plan, tmp_path, change) -> Path:
    data = json.loads(plan.to_json())
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("change, field", [
    (lambda d: d["knobs"].update(freeze_embeddings=False, freeze_layers=2), "knobs: .*freeze_embeddings"),
    (lambda d: d["knobs"].update(learning_rate=1e-3), "knobs.learning_rate: Extra inputs"),
    (lambda d: d.update(budget_bytes=-5), "budget_bytes: Input should be greater than or equal to 1048576"),
    (lambda d: d.update(budget_bytes=1), "budget_bytes"),
    (lambda d: d.update(budget_bytes=10**27), "budget_bytes: Input should be less than or equal"),
    (lambda d: d["device"].update(kind="tpu"), "device.kind: Input should be 'cuda' or 'cpu'"),
    (lambda d: d["knobs"].update(bucket_boundaries=[-5, 0]), "knobs.bucket_boundaries.0"),
    (lambda d: d["knobs"].update(pad_to_multiple_of=0), "knobs.pad_to_multiple_of"),
    (lambda d: d["knobs"].update(pad_to_multiple_of=-8), "knobs.pad_to_multiple_of"),
    (lambda d: d["knobs"].update(micro_batch_size=MAX_MICRO_BATCH + 1), "knobs.micro_batch_size"),
    (lambda d: d["knobs"].update(checkpoint_layers=[0, 9]), r"checkpoint_layers \[9\] out of range"),
    (lambda d: d["time"].update(step_seconds=float("nan")), "time.step_seconds"),
    (lambda d: d["time"].update(epoch_seconds=-1.0), "time.epoch_seconds"),
    (lambda d: d.update(task="causal-lm"), "workload.task 'classification' differs from task 'causal-lm'"),
    (lambda d: d.update(task="translation"), "task: Input should be"),
    (lambda d: d["workload"].update(batch_size=0), "workload.batch_size"),
    (lambda d: d["predicted"].update(weights=-1), "predicted.weights"),
    (lambda d: d["predicted"].update(peak_bytes=1), "peak_bytes is not the sum of the breakdown"),
    (lambda d: d.update(headroom_bytes=d["budget_bytes"]), "headroom_bytes"),
    (lambda d: d.pop("knobs"), "knobs: Field required"),
])
def test_a_tampered_plan_does_not_load_and_the_error_names_the_field(plan, tmp_path, change, field):
    with pytest.raises(PlanFileError, match=field) as info:
        Plan.load(mutated(plan, tmp_path, change))
    assert "\n" not in str(info.value) and "bad.json" in str(info.value)


def test_unreadable_plan_files_are_one_line_errors(tmp_path):
    for text, words in (("{", "is not JSON"), ("", "is not JSON"), ("[1, 2]", "not a valid plan")):
        path = tmp_path / "p.json"
        path.write_text(text)
        with pytest.raises(PlanFileError, match=words):
            Plan.load(path)
    (tmp_path / "latin1.json").write_bytes(b'{"model_id": "\xe9"}')
    with pytest.raises(PlanFileError, match="cannot read plan file"):
        Plan.load(tmp_path / "latin1.json")


def test_a_searched_plan_leaves_at_least_the_policys_headroom(plan):
    assert plan.headroom_left_bytes >= plan.headroom_bytes > 0


# --- TrainingArguments -----------------------------------------------------------------------------------


def test_training_arguments_map_the_knobs(plan, tmp_path):
    knobs = Knobs(freeze_embeddings=True, checkpoint_layers=(2, 3), precision=Precision.fp16, optimizer_bits=8,
                  micro_batch_size=4, bucket_boundaries=(64, 512))
    args = with_knobs(plan, **knobs.model_dump()).to_training_arguments(str(tmp_path), use_cpu=True)
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
    assert args.seed == 0  # autofit.train's default, not HF's 42


def test_training_arguments_for_plain_training(plan, tmp_path):
    args = with_knobs(plan, micro_batch_size=16).to_training_arguments(str(tmp_path), use_cpu=True)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (16, 1)
    # a cap that does not divide the batch: the largest size under it that does, so HF's step is the batch
    args = with_knobs(plan, micro_batch_size=6).to_training_arguments(str(tmp_path), use_cpu=True)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (4, 4)
    assert not args.fp16 and not args.bf16 and not args.activation_checkpointing
    assert str(args.optim.value) == "adamw_torch"
    if hasattr(args, "train_sampling_strategy"):
        assert args.train_sampling_strategy == "random"
    else:
        assert not args.group_by_length


def test_training_arguments_bf16_and_overrides(plan, tmp_path):
    bf16 = with_knobs(plan, precision=Precision.bf16, micro_batch_size=8)
    # on a machine without a bf16 GPU, TrainingArguments wants use_cpu=True; overrides pass straight through
    args = bf16.to_training_arguments(str(tmp_path), use_cpu=True, learning_rate=3e-5,
                                      gradient_accumulation_steps=5)
    assert args.bf16 and not args.fp16
    assert args.learning_rate == 3e-5 and args.gradient_accumulation_steps == 5
    # a plan for the CPU says so itself
    on_cpu = bf16.model_copy(update={"device": get_device("cpu")}).to_training_arguments(str(tmp_path))
    assert on_cpu.use_cpu and on_cpu.bf16
    # a CUDA plan on a machine without one: autofit's one-line reason, not transformers' own error
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="plan is for a CUDA device .a100. and none is visible"):
            bf16.to_training_arguments(str(tmp_path))


# --- Knobs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,words", [
    (dict(freeze_layers=2), "requires freeze_embeddings"),
    (dict(optimizer_bits=16), "optimizer_bits must be 8 or 32"),
    (dict(checkpoint_layers=(3, 1)), "sorted and unique"),
    (dict(checkpoint_layers=(1, 1)), "sorted and unique"),
    (dict(checkpoint_layers=(-1, 0)), "greater than or equal to 0"),
    (dict(bucket_boundaries=(0, 8)), "greater than or equal to 1"),
    (dict(pad_to_multiple_of=0), "pad_to_multiple_of"),
    (dict(bucket_boundaries=(512, 64)), "sorted and unique"),
    (dict(micro_batch_size=0), "micro_batch_size"),
    (dict(accumulation_steps=2), "accumulation_steps"),  # no longer a knob: the batch and caps decide
    (dict(tokens_per_micro_batch=0), "tokens_per_micro_batch"),
    (dict(freeze_layers=-1, freeze_embeddings=True), "freeze_layers"),
    (dict(precision="fp8"), "precision"),
    (dict(lr=1e-3), "lr"),
])
def test_knobs_validation_errors(kwargs, words):
    with pytest.raises(ValidationError, match=words):
        Knobs(**kwargs)


def test_knobs_are_immutable_and_hashable():
    knobs = Knobs(micro_batch_size=4, tokens_per_micro_batch=512)
    with pytest.raises(ValidationError):
        knobs.micro_batch_size = 2
    assert knobs == Knobs(micro_batch_size=4, tokens_per_micro_batch=512)
    assert len({knobs, Knobs(micro_batch_size=4, tokens_per_micro_batch=512), Knobs()}) == 2


def test_knobs_against_a_model_depth():
    knobs = Knobs(freeze_embeddings=True, freeze_layers=2, checkpoint_layers=(2, 5))
    knobs.validate_for(6)
    with pytest.raises(ValueError, match=r"checkpoint_layers \[5\] out of range"):
        knobs.validate_for(5)
    with pytest.raises(ValueError, match="freeze_layers=2 but the model has 1 layers"):
        Knobs(freeze_embeddings=True, freeze_layers=2).validate_for(1)


def test_training_arguments_keep_a_token_budgets_cap_at_the_longest_length(plan, tmp_path):
    """HF Trainer pads every micro-batch of a fixed size to its longest example, and may meet the data's
    longest in any: the size is the token budget's cap there, so Trainer never runs a micro-batch larger than
    the plan's peak allows (8 x 512 tokens would be 8 times this budget)."""
    budgeted = with_knobs(plan, micro_batch_size=8, tokens_per_micro_batch=1024, bucket_boundaries=(64, 512))
    longest = budgeted.workload.lengths.max_length
    args = budgeted.to_training_arguments(str(tmp_path), use_cpu=True)
    assert args.per_device_train_batch_size <= max(1, 1024 // longest) < 8
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == plan.workload.batch_size
    assert (args.learning_rate, args.weight_decay, args.max_grad_norm) == (2e-5, 0.01, 1.0)
    assert str(args.lr_scheduler_type.value) == "constant"


def test_training_arguments_give_each_process_its_share_of_the_batch(plan, tmp_path):
    """HF's step is per_device x accumulation x processes examples: a 2-process plan's arguments are one
    process's share, or HF trains twice the batch. An FSDP plan's sharding is not theirs to express."""
    from autofit.cluster import make_cluster

    two = with_knobs(plan, micro_batch_size=4).model_copy(update={"cluster": make_cluster(2, 1, device_kind="cuda")})
    args = two.to_training_arguments(str(tmp_path), use_cpu=True)
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * 2 == plan.workload.batch_size
    fsdp = two.model_copy(update={"knobs": Knobs(micro_batch_size=4, strategy="fsdp")})
    with pytest.raises(ValueError, match="FSDP plan's sharding is not expressible"):
        fsdp.to_training_arguments(str(tmp_path), use_cpu=True)
