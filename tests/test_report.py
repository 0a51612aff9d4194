"""report.py: the one place a plan's knobs and alternatives are put into words."""

from rich.console import Console

from autofit.budget import format_bytes
from autofit.knobs import Knobs, Precision
from autofit.report import describe_alternative, describe_knobs, describe_weights, knobs_line, plan_report
from autofit.techniques import lora, quantization

from _profiles import adapted_profile, searched_plan


def test_describe_knobs_words_every_technique():
    k = Knobs(freeze_embeddings=True, freeze_layers=2, checkpoint_layers=(2, 3, 4, 5), precision=Precision.fp16,
              optimizer_bits=8, micro_batch_size=2, bucket_boundaries=(64, 512), tokens_per_micro_batch=512)
    assert describe_knobs(k, 6) == {
        "adapter": "full fine-tuning",
        "freezing": "freeze embeddings + bottom 2/6 layers",
        "checkpointing": "checkpoint 4/6 layers (2-5)",
        "precision": "fp16 + grad scaler",
        "optimizer": "8-bit AdamW (bitsandbytes)",
        "micro-batch": "micro-batches of up to 2",
        "padding": "2 length buckets (64, 512), 512-token budget",
        "sharding": "one process",
    }
    assert describe_knobs(Knobs(strategy="fsdp", cpu_offload=True), 6, processes=4)["sharding"] == (
        "FSDP2: weights, gradients and AdamW state sharded over 4 processes, 1 layer per unit, "
        "shards offloaded to CPU RAM")
    assert describe_knobs(Knobs(), 6, processes=2)["sharding"] == "DDP: a full replica on each of 2 processes"
    assert knobs_line(Knobs(checkpoint_layers=(0, 2), micro_batch_size=16), 6) == (
        "no freezing, checkpoint 2/6 layers (0,2), fp32, 32-bit AdamW, micro-batches of up to 16, dynamic padding")
    # two processes share a step of 16: each runs at most 8 examples, whatever the cap (the train summary's line)
    assert "micro-batches of up to 8," in knobs_line(Knobs(micro_batch_size=16, strategy="fsdp"), 6, 2, share=8)


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
    assert all(words[t] in text for t in words if t not in ("micro-batch", "sharding"))  # one process: no sharding row
    assert "effective batch 16" in text
    assert describe_alternative(plan.alternatives[0], plan) in text


# --- adapters ------------------------------------------------------------------------------------------------


def test_a_plan_edited_over_its_budget_is_flagged_when_shown():
    plan = searched_plan()
    console = Console(width=200, record=True)
    console.print(plan_report(plan))
    assert "does not fit" not in console.export_text()
    edited = plan.model_copy(update={"budget_bytes": plan.predicted.peak_bytes})  # no room for its headroom
    console = Console(width=200, record=True)
    console.print(plan_report(edited))
    text = console.export_text()
    assert "is over the budget less its" in text and "this plan does not fit" in text


def test_an_adapter_plan_names_its_adapter_and_leaves_out_the_frozen_base():
    k = Knobs(adapter="lora", base_dtype="nf4", lora_rank=32, lora_targets="all-linear", precision=Precision.bf16,
              checkpoint_layers=(0, 1))
    words = describe_knobs(k, 4)
    assert words["adapter"] == "LoRA rank 32 on all linear layers, 4-bit NF4 base (double quantization)"
    assert words["freezing"] == "base frozen (adapters train)"
    line = knobs_line(k, 4)
    assert line.startswith(words["adapter"] + ", checkpoint 2/4") and "frozen" not in line
    plain = Knobs(adapter="lora", base_dtype="bf16", precision=Precision.bf16)
    assert describe_knobs(plain, 4)["adapter"] == "LoRA rank 16 on the attention projections, bf16 base"
    assert "full fine-tuning" not in knobs_line(Knobs(), 4)  # a full fine-tuning line reads as before


def test_weights_summary_splits_the_base_as_stored():
    profile = adapted_profile(hidden=256, layers=4, vocab=1000)
    nf4 = Knobs(adapter="lora", base_dtype="nf4", lora_targets="all-linear", precision=Precision.bf16)
    w = lora.weights_summary(profile, nf4)
    linears = 4 * 12 * 256 * 256
    assert w.base_linear_params == linears
    assert w.base_linear_bytes == sum(quantization.nf4_bytes(n, double_quant=True) for n in [256 * 256] * 16
                                      + [4 * 256 * 256] * 8)
    assert 0 < w.quantization_constant_bytes == w.base_linear_bytes - linears // 2
    assert w.base_linear_bytes + w.other_frozen_bytes == quantization.base_weight_bytes(profile, "nf4")
    assert w.trainable_params == sum(lora.trainable_numels(profile, 16, "all-linear"))
    assert w.trainable_bytes == 4 * w.trainable_params
    half = lora.weights_summary(profile, nf4.model_copy(update=dict(base_dtype="bf16")))
    assert half.quantization_constant_bytes == 0 and half.base_linear_bytes == 2 * linears
    assert half.other_frozen_bytes == 2 * (profile.num_params - linears)
    assert lora.weights_summary(profile, Knobs()) is None


def test_the_plan_report_shows_the_adapter_and_the_4_bit_base():
    plan = searched_plan()
    profile = adapted_profile(hidden=128, layers=4, vocab=4000)
    knobs = Knobs(adapter="lora", base_dtype="nf4", lora_targets="all-linear", precision=Precision.bf16)
    weights = lora.weights_summary(profile, knobs)
    plan = plan.model_copy(update=dict(knobs=knobs, adapter=weights, alternatives=[]))
    console = Console(width=250, record=True)
    console.print(plan_report(plan))
    text = console.export_text()
    assert "LoRA rank 16 on all linear layers, 4-bit NF4 base (double quantization): " in text
    assert "trainable parameters" in text
    assert describe_weights(weights, "nf4") in text
    assert f"at 4 bits ({format_bytes(weights.base_linear_bytes)} incl. " \
           f"{format_bytes(weights.quantization_constant_bytes)} of scales)" in text
    assert type(plan).model_validate_json(plan.to_json()) == plan  # the plan JSON carries it


def test_a_faster_runner_up_says_what_it_lost_by():
    """A balanced search can pass over a faster plan for its quality risk: explain says so, with both risks."""

    plan = searched_plan(policy="balanced")
    faster = [a for a in plan.alternatives if a.epoch_seconds < plan.time.epoch_seconds]
    assert plan.search.risk is not None and all(a.risk is not None for a in plan.alternatives)
    for alternative in plan.alternatives:
        line = describe_alternative(alternative, plan)
        assert ("not chosen: quality risk" in line) == (alternative in faster), line


def test_checkpointed_layers_read_as_a_span_a_list_or_one_layer():
    words = lambda layers: describe_knobs(Knobs(checkpoint_layers=layers), 6)["checkpointing"]  # noqa: E731
    assert words((0, 1, 2, 3)) == "checkpoint 4/6 layers (0-3)"
    assert words((1, 4)) == "checkpoint 2/6 layers (1,4)"
    assert words((2,)) == "checkpoint 1/6 layers (2)"
