"""The pure helpers of benchmarks/accuracy.py and benchmarks/accuracy_e2e.py (no model is built or trained)."""

import pytest

from autofit.knobs import Knobs
from benchmarks import accuracy, accuracy_e2e as e2e


def test_accumulating_knob_sets_make_steps_of_several_micro_batches():
    assert accuracy.micro_batches("plain") == 1 and accuracy.step_batch("plain", 6) == 6
    assert accuracy.micro_batches("accum4") == 4 and accuracy.step_batch("accum4", 3) == 12
    assert accuracy.step_batch("freeze+ckpt-some+bf16+accum2", 6) == 12
    knobs = accuracy.make_knobs("freeze+ckpt-some+bf16+accum2", 3, 6)
    assert knobs.micro_batch_size == 6 and knobs.checkpoint_layers == (0, 2) and knobs.freeze_layers == 1


def test_skewed_lengths_are_mostly_short_with_one_at_the_cap():
    lengths = e2e.skewed_lengths(300, cap=256, seed=1)
    assert len(lengths) == 300 and lengths == e2e.skewed_lengths(300, cap=256, seed=1)
    assert min(lengths) >= 8 and max(lengths) == 256 and lengths[-1] == 256
    assert sorted(lengths)[150] < 64  # the median is short
    assert e2e.skewed_lengths(0) == []


def test_budget_at_runs_from_the_smallest_budget_to_the_reference_on_a_log_scale():
    assert e2e.budget_at(0.0, 10, 1000) == 10
    assert e2e.budget_at(0.5, 10, 1000) == 100
    assert e2e.budget_at(1.0, 10, 1000) == pytest.approx(1000, abs=1)
    assert e2e.budget_at(0.5, 1000, 10) == 1000  # a reference below the smallest budget: the smallest


def test_knobs_summary_names_every_knob_turned():
    assert e2e.knobs_summary(Knobs(micro_batch_size=16), 3) == "mb16"
    knobs = Knobs(micro_batch_size=2, tokens_per_micro_batch=256, bucket_boundaries=(16, 64, 256),
                  checkpoint_layers=(1, 2), freeze_embeddings=True, freeze_layers=1, precision="bf16",
                  optimizer_bits=8)
    assert e2e.knobs_summary(knobs, 3) == "mb2 tok256 b3 ckpt2/3 frz1+emb bf16 8bit"
    assert e2e.knobs_summary(Knobs(micro_batch_size=4, freeze_embeddings=True), 3) == "mb4 frz-emb"
    lora = Knobs(adapter="lora", lora_rank=8, lora_targets="attention", base_dtype="nf4", micro_batch_size=4)
    assert e2e.knobs_summary(lora, 3) == "lora8-att/nf4 mb4"


@pytest.mark.parametrize("samples, wrong", [
    ([16] * 18 + [12], 0),  # 300 examples: 18 full steps and the remainder
    ([16] * 17 + [12, 16], 2),  # the short step is not last
    ([16] * 18, 1),  # a step missing
    ([16] * 18 + [12, 1], 1),  # a step too many
    ([15] + [16] * 17 + [13], 2),
])
def test_wrong_sample_steps(samples, wrong):
    assert e2e.wrong_sample_steps(samples, 16, 300) == wrong


def test_wrong_sample_steps_without_a_remainder():
    assert e2e.wrong_sample_steps([16, 16], 16, 32) == 0
    assert e2e.wrong_sample_steps([16, 16, 0], 16, 32) == 1


def test_summarize_counts_cells_without_a_plan_apart():
    cells = [
        {"family": "a", "budget": "p0", "measured_bytes": 100, "error": 0.01, "run_error": 0.0, "over_budget": False,
         "memory_warning": None, "wrong_sample_steps": 0},
        {"family": "b", "budget": "p0", "measured_bytes": 100, "error": -0.05, "run_error": -0.02, "over_budget": True,
         "memory_warning": "over", "wrong_sample_steps": 1},
        {"family": "c", "budget": "p0", "measured_bytes": None},
    ]
    s = e2e.summarize(cells)
    assert (s["cells"], s["trained"], s["no_plan"]) == (3, 2, 1)
    assert s["median_abs_error_pct"] == 3.0 and s["max_abs_error_pct"] == 5.0 and s["mean_signed_error_pct"] == -2.0
    assert (s["over_budget"], s["memory_warnings"], s["steps_with_wrong_sample_count"]) == (1, 1, 1)
    assert s["over_3pct"] == ["b@p0"]
    assert (s["run_median_abs_error_pct"], s["run_max_abs_error_pct"]) == (1.0, 2.0)
    assert e2e.summarize([])["median_abs_error_pct"] is None
