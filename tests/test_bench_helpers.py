"""The pure helpers of the timing benchmarks (benchmarks/padding.py, overhead.py, plan_quality.py,
planning.py, run.py): the steps they build, the knobs they label, the summary rows. No timing, no training."""

import pytest

from benchmarks import overhead, padding, plan_quality, planning
from benchmarks import run as bench_run
from autofit.knobs import Knobs
from autofit.search import micro_batch_sizes
from autofit.techniques.accumulation import micro_batch_size_for, padding_efficiency
from autofit.techniques.bucketing import padded_length
from autofit.workload import LengthHistogram


@pytest.fixture(scope="module")
def lengths():
    return padding.skewed_lengths(512)


@pytest.fixture(scope="module")
def tiny_model():
    return padding.small_bert(layers=1, hidden=16)


# ---- padding ---------------------------------------------------------------------------------------------

def test_padding_variants_only_differ_in_batching_knobs(lengths):
    knobs = padding.variants(lengths, 16)
    assert list(knobs) == ["fixed", "dynamic", "bucket4", "bucket8+tok"]
    assert {k.micro_batch_size for k in knobs.values()} == {16}
    assert knobs["fixed"].pad_to_multiple_of == padding.MAX_LEN
    b8 = knobs["bucket8+tok"].bucket_boundaries
    assert knobs["bucket8+tok"].tokens_per_micro_batch == max(16 * b8[0], b8[-1])


@pytest.mark.parametrize("batch", sorted(set(padding.SHAPES.values())))
def test_epoch_pieces_are_steps_of_the_batch_cut_under_the_caps(lengths, batch):
    for name, knobs in padding.variants(lengths, padding.MICRO_BATCH).items():
        steps = padding.epoch_pieces(lengths, knobs, batch)
        sizes = [sum(len(piece) for piece in step) for step in steps]
        assert all(size == batch for size in sizes[:-1]) and 0 < sizes[-1] <= batch, name
        assert sorted(i for step in steps for piece in step for i in piece) == list(range(len(lengths))), name
        for step in steps:
            for piece in step:
                width = padded_length(max(lengths[i] for i in piece), knobs.pad_to_multiple_of)
                assert len(piece) <= micro_batch_size_for(width, knobs), name


def test_counted_padding_efficiency_agrees_with_the_prediction(lengths):
    hist = LengthHistogram.from_lengths(lengths)
    for batch in padding.SHAPES.values():
        for name, knobs in padding.variants(lengths, padding.MICRO_BATCH).items():
            counted = padding.counted_padding_efficiency(lengths, knobs, batch)
            assert counted == pytest.approx(padding_efficiency(knobs, hist, batch), abs=0.03), (batch, name)


def test_sorting_a_step_before_the_cut_raises_dynamic_padding_efficiency(lengths):
    """The change the cut_variants table reports: dynamic padding over steps of 64 cut into micro-batches
    of 16 pads less than random micro-batches of 16; fixed-length padding is unchanged."""
    knobs = padding.variants(lengths, padding.MICRO_BATCH)
    random16 = padding.counted_padding_efficiency(lengths, knobs["dynamic"], 16)
    sorted64 = padding.counted_padding_efficiency(lengths, knobs["dynamic"], 64)
    assert sorted64 > random16 + 0.1
    assert padding.counted_padding_efficiency(lengths, knobs["fixed"], 64) == pytest.approx(
        padding.counted_padding_efficiency(lengths, knobs["fixed"], 16))


def test_hand_plan_trains_the_given_batch(lengths, tiny_model):
    data = padding.token_data(lengths[:40])
    plan = padding.hand_plan(tiny_model, Knobs(micro_batch_size=4), data, batch_size=16)
    assert plan.batch_size == 16
    assert plan.step.micro_batches_per_step == (4, 4)


# ---- overhead --------------------------------------------------------------------------------------------

def test_overhead_steps_are_the_trainers_batches(tiny_model):
    lengths = padding.skewed_lengths(160, hi=256)
    knobs = Knobs(micro_batch_size=overhead.MICRO_BATCH, pad_to_multiple_of=overhead.PAD_MULTIPLE)
    windows = padding.epoch_pieces(lengths, knobs, overhead.BATCH)
    overhead.check_trainer_alignment(windows, overhead.MICRO_BATCH, overhead.BATCH)
    assert len(windows) == 160 // overhead.BATCH
    for window in windows:  # each step's micro-batches are its examples sorted by length, longest first
        flat = [lengths[i] for piece in window for i in piece]
        assert flat == sorted(flat, reverse=True)
    plan = padding.hand_plan(tiny_model, knobs, padding.token_data(lengths), batch_size=overhead.BATCH)
    args = plan.to_training_arguments(output_dir="unused", use_cpu=True)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (len(windows[0][0]), len(windows[0]))


def test_overhead_refuses_steps_the_trainer_would_batch_otherwise():
    with pytest.raises(ValueError, match="micro-batches of"):
        overhead.check_trainer_alignment([[[0, 1, 2], [3]]], 2, 4)
    with pytest.raises(ValueError):
        overhead.check_trainer_alignment([[[0, 1], [2, 3]], [[4, 5]]], 2, 4)  # a short last step


def test_overhead_collate_pads_to_a_multiple_of_8():
    batch = overhead.collate([{"input_ids": [5, 6, 7], "labels": 1}, {"input_ids": list(range(3, 12)), "labels": 0}])
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"].sum().item() == 12


# ---- plan_quality ----------------------------------------------------------------------------------------

def test_plan_quality_grid_is_the_searchs_micro_batches():
    full = list(plan_quality.grid(quick=False))
    assert len(full) == 5 * 3 * 2 * 2
    assert sorted({k.micro_batch_size for k in full}) == micro_batch_sizes(plan_quality.EFFECTIVE_BATCH)
    assert len(list(plan_quality.grid(quick=True))) == 3 * 2 * 2 * 2


def test_plan_quality_labels_say_micro_batches_per_step():
    hist = LengthHistogram.fixed(plan_quality.SEQ, 48)
    safe = Knobs(**plan_quality.SAFE_DEFAULT)
    assert plan_quality.describe(safe, hist) == "mb1 (x16/step) ckpt4 fp32 32bit"
    k = Knobs(micro_batch_size=4, checkpoint_layers=(0, 1), precision="bf16", optimizer_bits=8)
    assert plan_quality.describe(k, hist) == "mb4 (x4/step) ckpt2 bf16 8bit"
    assert plan_quality.describe(Knobs(micro_batch_size=16), hist).startswith("mb16 (x1/step) ")
    mixed = LengthHistogram(lengths=[16, 128], counts=[40, 40])
    k = Knobs(micro_batch_size=16, tokens_per_micro_batch=512, bucket_boundaries=(16, 128))
    # random steps of half 16-token, half 128-token examples: 4 of the long ones a micro-batch, so 2 to 5
    low, high = map(int, __import__("re").match(r"mb16 \(x(\d+)-(\d+)/step\) ", plan_quality.describe(k, mixed)).groups())
    assert 2 <= low < high <= 6


def test_plan_quality_budgets_are_aligned_and_sorted():
    mib = plan_quality.MIB
    budgets = plan_quality.choose_budgets([10 * mib, 20 * mib, 100 * mib], quick=False)
    assert budgets == sorted(budgets) and len(budgets) == 4
    assert all(b % (mib // 4) == 0 for b in budgets)
    assert budgets[0] >= 10.8 * mib and budgets[-1] >= 110 * mib


# ---- planning --------------------------------------------------------------------------------------------

def test_planning_knobs_summary(lengths, tiny_model):
    data = padding.token_data(lengths[:64])
    k = Knobs(micro_batch_size=8, freeze_embeddings=True, optimizer_bits=8)
    summary = planning.knobs_summary(padding.hand_plan(tiny_model, k, data, batch_size=32))
    assert summary == "mb 8 (x4/step of 32), fp32, 8-bit, ckpt 0/1, freeze emb+0"


# ---- run ---------------------------------------------------------------------------------------------------

def test_run_lists_the_new_modules():
    for name in ("padding", "overhead", "plan_quality", "planning", "reliability", "convergence", "accuracy_e2e"):
        assert name in bench_run.MODULES


def test_run_skips_a_missing_module(tmp_path, monkeypatch):
    import benchmarks._common as common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    summary = bench_run.main(quick=True, only=["no_such_benchmark"])
    assert summary["modules"]["no_such_benchmark"] == {"status": "missing"}
    assert "no_such_benchmark" in summary["markdown"]
    assert (tmp_path / "summary_partial_quick.json").is_file()


def _padding_table(batch, fixed, dynamic, best):
    def row(eff, ratio):
        return {"batch_size": batch, "knobs": {"micro_batch_size": 16}, "padding_efficiency": eff,
                "throughput_ratio_vs_fixed": ratio}
    return {"fixed": row(fixed, 1.0), "dynamic": row(dynamic, 1.5), "bucket8+tok": row(best, 3.0)}


def test_run_padding_rows():
    rows = bench_run._padding({"variants": _padding_table(16, 0.24, 0.34, 0.93),
                               "cut_variants": _padding_table(64, 0.24, 0.61, 0.94)})
    assert [value for _, value, _ in rows] == ["0.24 / 0.34 / 0.93", "3.00x", "0.24 / 0.61 / 0.94", "3.00x"]
    assert "steps of 64 cut into micro-batches of ≤ 16" in rows[2][0]
    assert len(bench_run._padding({"variants": _padding_table(16, 0.24, 0.34, 0.93)})) == 2  # older results


def test_run_reliability_and_generic_rows():
    headline = {"cases": 40, "cli_ok": 2, "cli_clean_error": 18, "cli_unclean_error": 7, "cli_wrong_success": 13,
                "cli_traceback": 0, "cli_crash": 0, "cli_hang": 0, "api_ok": 2, "resume_bit_identical": "2/2"}
    rows = bench_run._reliability({"headline": headline})
    assert rows[0][1] == "2 / 18 / 7 / 13 / 0 / 0 / 0"
    assert rows[-1][1] == "2/2"
    generic = bench_run._headline("convergence")
    assert generic({"headline": {"final_loss_ratio": 1.01234}}) == [("convergence: final loss ratio", "1.01", "—")]
    assert generic({})[0][1] == "—"


def test_run_plan_quality_rows_skip_budgets_without_a_grid_point():
    policy = {"ratio_vs_grid_best": {"1MiB": None, "2MiB": 0.97}, "speedup_vs_safe_default": {"1MiB": 2.0, "2MiB": 3.0},
              "any_measured_peak_over_budget": False}
    rows = bench_run._plan_quality({"summary": {"balanced": policy}})
    assert rows[0][1] == "0.97"


def test_accuracy_ranks_summary_weighs_the_busier_process():
    from benchmarks import accuracy_ranks

    cells = [dict(family="bert", sharding="fsdp", budget="p0", measured_bytes=110, error=-0.1,
                  rank_errors=[-0.1, 0.05], over_budget=False, predicted_step_seconds=s, measured_step_seconds=2 * s)
             for s in (1.0, 2.0, 3.0)]
    summary = accuracy_ranks.summarize(cells)
    assert summary["median_abs_error_pct"] == 10.0 and summary["rank_median_abs_error_pct"] == 7.5
    assert summary["time_rank_correlation"] == 1.0 and summary["over_3pct"] == ["bert/fsdp@p0"] * 3
    rows = bench_run.EXTRACTORS["accuracy_ranks"]({"summary": summary})
    assert rows[0][1] == "10.0% / 10.0%"
