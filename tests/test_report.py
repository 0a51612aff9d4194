"""report.py: the one place a plan's knobs and alternatives are put into words."""

from rich.console import Console

from autofit.budget import format_bytes
from autofit.knobs import Knobs, Precision
from autofit.report import describe_alternative, describe_knobs, knobs_line, plan_report

from _profiles import searched_plan


def test_describe_knobs_words_every_technique():
    k = Knobs(freeze_embeddings=True, freeze_layers=2, checkpoint_layers=(2, 3, 4, 5), precision=Precision.fp16,
              optimizer_bits=8, micro_batch_size=2, bucket_boundaries=(64, 512), tokens_per_micro_batch=512)
    assert describe_knobs(k, 6) == {
        "freezing": "freeze embeddings + bottom 2/6 layers",
        "checkpointing": "checkpoint 4/6 layers (2-5)",
        "precision": "fp16 + grad scaler",
        "optimizer": "8-bit AdamW (bitsandbytes)",
        "micro-batch": "micro-batches of up to 2",
        "padding": "2 length buckets (64, 512), 512-token budget",
    }
    assert knobs_line(Knobs(checkpoint_layers=(0, 2), micro_batch_size=16), 6) == (
        "no freezing, checkpoint 2/6 layers (0,2), fp32, 32-bit AdamW, micro-batches of up to 16, dynamic padding")


def test_an_alternative_reads_as_its_changes_its_speed_and_its_peak():
    plan = searched_plan()
    assert plan.alternatives
    for alternative in plan.alternatives:
        line = describe_alternative(alternative, plan)
        assert "\n" not in line and line.startswith("with ")
        words = describe_knobs(alternative.knobs, plan.num_layers)
        assert all(words[t] in line for t in alternative.changed)
        assert line.endswith(format_bytes(alternative.peak_bytes))
        assert any(w in line for w in ("slower", "faster", "same speed"))
    faster = plan.alternatives[0].model_copy(update=dict(epoch_seconds=plan.time.epoch_seconds / 2))
    assert "2.00x faster" in describe_alternative(faster, plan)


def test_the_plan_report_shows_knobs_step_and_alternatives():
    plan = searched_plan()
    console = Console(width=200, record=True)
    console.print(plan_report(plan))
    text = console.export_text()
    words = describe_knobs(plan.knobs, plan.num_layers)
    assert all(words[t] in text for t in words if t != "micro-batch")  # the step row says more than the cap
    assert "effective batch 16" in text
    assert describe_alternative(plan.alternatives[0], plan) in text
