"""The reliability benchmark's own logic (benchmarks/reliability.py): the case list, the plan mutations, the
outcome classification and the CLI -> API translation. Pure: no model, no subprocess."""

import json
import math

import pytest

from benchmarks import _reliability_cases as rc
from benchmarks.reliability import api_call_for, classify_api, classify_cli

# A plan as `autofit plan --out` writes it (one alternative kept).
PLAN = {
    "model_id": "/tmp/model", "model_type": "bert", "num_layers": 2, "num_params": 36770, "task": "classification",
    "budget_bytes": 1073741824,
    "device": {"name": "cpu", "kind": "cpu", "memory_bytes": None, "supports_bf16": True, "tflops_fp32": 0.2,
               "tflops_half": 0.1, "memory_bandwidth_gbs": 20.0, "context_bytes": 0,
               "allocator_reserve_fraction": 0.0, "matmul_efficiency": 0.5},
    "policy": "balanced", "headroom_bytes": 53687091,
    "knobs": {"freeze_embeddings": True, "freeze_layers": 0, "checkpoint_layers": [], "precision": "fp32",
              "optimizer_bits": 32, "micro_batch_size": 8, "tokens_per_micro_batch": None,
              "bucket_boundaries": [8, 16, 32, 128], "pad_to_multiple_of": 8},
    "predicted": {"weights": 147080, "gradients": 4488, "optimizer_state": 145680, "activations": 12226608,
                  "temporaries": 558168, "overhead": 0, "peak_phase": "backward", "peak_shape": [6, 128],
                  "peak_bytes": 13082024, "allocated_bytes": 13082024},
    "time": {"step_seconds": 0.0069, "epoch_seconds": 0.055, "samples_per_second": 1155.7,
             "padding_efficiency": 0.68, "measured": True},
    "workload": {"task": "classification", "lengths": {"lengths": [6, 7, 122], "counts": [17, 7, 2]},
                 "batch_size": 8, "from_data": True},
    "alternatives": [{"knobs": {"freeze_embeddings": False, "freeze_layers": 0, "checkpoint_layers": [],
                                "precision": "fp32", "optimizer_bits": 32, "micro_batch_size": 8,
                                "tokens_per_micro_batch": None,
                                "bucket_boundaries": [8, 16, 32, 128], "pad_to_multiple_of": 8},
                      "peak_bytes": 13444520, "epoch_seconds": 0.06, "changed": ["freezing"]}],
    "search": {"trials": 250, "seconds": 1.07, "space_size": 648, "storage": None},
    "profile_device": "cpu", "versions": {"autofit": "0.1.0", "torch": "2.13.0+cpu"},
    "step": {"batch_size": 8, "steps_per_epoch": 4,
             "buckets": [{"upper_length": 8, "examples": 24, "micro_batch_size": 8, "padded": True,
                          "grads_held": False}], "micro_batches_per_step": [1, 1], "mean_micro_batches_per_step": 1.0},
    "created": "2026-12-01T23:13:52+00:00",
}

# The wrong successes the project knows about today: the quick subset must keep measuring every one.
KNOWN = ["plan/budget_bytes=negative", "plan/budget_bytes=one", "plan/device.kind=tpu",
         "plan/knobs.bucket_boundaries=negative_zero", "plan/knobs.pad_to_multiple_of=zero",
         "plan/time.step_seconds=nan", "plan/knobs.micro_batch_size=huge", "plan/task=causal_lm",
         "data/all-labels-zero", "data/label-float", "budget/1e30", "policy/risk-price-inf",
         "options/seq-len-4096-on-512-positions", "options/lr-1e308", "options/output-dir-is-a-file",
         "options/resume-with-different-data"]


@pytest.fixture(scope="module")
def cases():
    return rc.all_cases(PLAN)


def test_case_list_is_large_unique_and_well_formed(cases):
    assert len(cases) >= 200
    assert len({c.name for c in cases}) == len(cases)
    assert {c.family for c in cases} == {"control", "budget", "model", "data", "options", "policy", "plan"}
    assert sum(1 for c in cases if c.argv is not None and c.cli) >= 200  # through the real CLI
    for c in cases:
        assert c.expect in rc.EXPECTATIONS
        assert c.argv is not None or isinstance(c.api, dict), c.name
        assert c.name.startswith(c.family + "/")
    assert all(c.expect == rc.OK for c in cases if c.family == "control")
    quick = {c.name for c in cases if c.quick}
    assert set(KNOWN) <= quick
    assert 30 <= len(quick) <= 45


def test_every_plan_field_is_mutated_recursively(cases):
    names = {c.name for c in cases if c.family == "plan"}
    for path, _ in rc._leaves(PLAN):
        assert any(n.startswith(f"plan/{path}=") for n in names), path
    for leaf in ("knobs.micro_batch_size", "device.kind", "workload.lengths.counts", "alternatives.0.knobs.precision",
                 "versions.torch", "predicted.peak_shape"):
        assert f"plan/{leaf}=type" in names


def test_mutations_change_exactly_one_field(cases):
    by_name = {c.name: c for c in cases}
    doc = json.loads(by_name["plan/knobs.micro_batch_size=huge"].files["plan.json"])
    assert doc["knobs"]["micro_batch_size"] == 10**9
    assert {**doc, "knobs": PLAN["knobs"]} == PLAN
    doc = json.loads(by_name["plan/workload.lengths=missing"].files["plan.json"])
    assert "lengths" not in doc["workload"]
    doc = json.loads(by_name["plan/time.step_seconds=nan"].files["plan.json"])
    assert math.isnan(doc["time"]["step_seconds"])
    assert by_name["plan/alternatives.0.knobs.micro_batch_size=huge"].expect == rc.EITHER  # a report
    assert by_name["plan/knobs.micro_batch_size=huge"].expect == rc.REFUSE  # what runs


def _run(code, stderr="", stdout="", timed_out=False):
    return {"exit_code": code, "stderr": stderr, "stdout": stdout, "timed_out": timed_out, "seconds": 1.0}


@pytest.mark.parametrize("expect, run, outcome", [
    (rc.REFUSE, _run(1, "error: bad budget\n"), "clean_error"),
    (rc.REFUSE, _run(2, "error: no plan fits; the smallest budget that fits is 2 GB\n"), "clean_error"),
    (rc.NO_FIT, _run(2, "error: no plan fits\n"), "unclean_error"),  # exit 2 must name the budget
    (rc.REFUSE, _run(1, "Loading weights: 100%\nerror: bad\n"), "unclean_error"),
    (rc.REFUSE, _run(1, "error: two\nlines\n"), "unclean_error"),
    (rc.REFUSE, _run(1, "Traceback (most recent call last):\n  ...\nValueError: x\n"), "traceback"),
    (rc.REFUSE, _run(0, "", "2 optimizer steps"), "wrong_success"),
    (rc.WARN, _run(0, "warning: float labels read as classes\n"), "ok"),
    (rc.WARN, _run(0, "/x.py:3: FutureWarning: deprecated\n"), "wrong_success"),
    (rc.EITHER, _run(0), "ok"),
    (rc.EITHER, _run(1, "error: no\n"), "clean_error"),
    (rc.OK, _run(1, "error: no\n"), "wrong_refusal"),
    (rc.REFUSE, _run(-9), "crash"),
    (rc.REFUSE, _run(-9, timed_out=True), "hang"),
])
def test_classify_cli(expect, run, outcome):
    assert classify_cli(expect, run)[0] == outcome


@pytest.mark.parametrize("expect, result, outcome", [
    (rc.REFUSE, {"status": "raised", "type": "ValueError", "message": "bad budget"}, "clean_error"),
    (rc.REFUSE, {"status": "raised", "type": "ValidationError", "message": "1 validation error\nx\n  y"},
     "unclean_error"),
    (rc.REFUSE, {"status": "raised", "type": "RuntimeError", "message": ""}, "unclean_error"),
    (rc.REFUSE, {"status": "returned", "final_loss": float("nan")}, "wrong_success"),
    (rc.WARN, {"status": "returned", "warnings": ["UserWarning: float labels"]}, "ok"),
    (rc.WARN, {"status": "returned", "warnings": []}, "wrong_success"),
    (rc.OK, {"status": "raised", "type": "ValueError", "message": "x"}, "wrong_refusal"),
    (rc.REFUSE, {"status": "hang"}, "hang"),
    (rc.REFUSE, {"status": "n/a"}, "n/a"),
])
def test_classify_api(expect, result, outcome):
    assert classify_api(expect, result)[0] == outcome


def test_command_lines_translate_to_api_calls():
    case = rc.Case("x/plan", "x", rc.plan_argv(vram="-1GB", seq_len=64, data="{data}"))
    call = api_call_for(case)
    assert call["fn"] == "plan"
    assert call["kwargs"] == {"model": "{model}", "budget": "-1GB", "device": "cpu", "seq_len": 64, "batch_size": 8,
                              "data": {"$rows": "{data}"}}
    call = api_call_for(rc.Case("x/train", "x", rc.train_argv(lr="nan", resume=True, output_dir="{tmp}/o")))
    assert call["fn"] == "train" and math.isnan(call["kwargs"]["lr"]) and call["kwargs"]["resume"] is True
    assert call["kwargs"]["plan"] == {"$plan": "{plan}"} and call["kwargs"]["quiet"] is True
    assert api_call_for(rc.Case("x/e", "x", ("explain", "{plan}"))) == {"fn": "load", "kwargs": {"path": "{plan}"}}
    # Only the CLI can make these mistakes.
    assert api_call_for(rc.Case("x/u", "x", rc.plan_argv(frobnicate=1))) is None
    assert api_call_for(rc.Case("x/s", "x", rc.plan_argv(seq_len="abc"))) is None
    assert api_call_for(rc.Case("x/n", "x", rc.train_argv(plan=None))) is None
    assert api_call_for(rc.Case("x/p", "x", rc.cli("profile", model="{model}"))) is None
    assert api_call_for(rc.Case("x/no", "x", rc.plan_argv(), api=False)) is None


def test_cli_builder():
    assert rc.cli("train", data="d", plan=None, resume=True, quiet=False, max_steps=2) == (
        "train", "--data", "d", "--resume", "--max-steps", "2")


def test_every_field_of_todays_plans_has_a_kind():
    """A plan as the planner writes it now (adapters, several processes): every field gets its mutations."""
    from _profiles import searched_plan

    from autofit.cluster import Cluster
    from autofit.knobs import Knobs

    plan = searched_plan().model_copy(update={"cluster": Cluster(processes=2),
                                              "knobs": Knobs(strategy="fsdp", micro_batch_size=2)})
    cases = rc.all_cases(json.loads(plan.to_json()))
    names = {c.name for c in cases}
    for path in ("cluster.processes", "knobs.strategy", "predicted.gathered", "knobs.lora_rank"):
        assert any(n.startswith(f"plan/{path}=") for n in names), path
