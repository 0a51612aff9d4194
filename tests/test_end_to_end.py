"""What a user sees, end to end: a plan the search chose on skewed-length data, trained for a full epoch, keeps
its promises (the batch, the peak, the budget); the same seed gives the same run; what a plan file claims is
checked against its knobs; padding never passes a model's positions; no library noise."""

from __future__ import annotations

import copy
import importlib
import math
import random
import warnings

import pytest
import torch
from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

import autofit
from autofit.training import PlanNoLongerFitsError
from autofit.profiler import cache

from test_api import BERT, WORDS, make_tokenizer, tiny_model


def skewed_rows(n: int, *, seed: int = 0, longest: int = 120) -> list[dict]:
    """Real-text-shaped lengths: most rows short, a long tail up to `longest` words; three classes."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(min(longest, 2 + int(rng.expovariate(1 / 14))))]
        rows.append({"text": " ".join(words), "label": ("w7" in words) + ("w9" in words)})
    return rows


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def unconstrained_peak(model, rows, tok) -> int:
    free = autofit.plan(model, "64GB", data=rows, tokenizer=tok, batch_size=16, device="cpu", policy="fastest")
    return free.predicted.peak_bytes


def test_a_searched_plan_on_skewed_data_keeps_every_promise(tok):
    model = tiny_model("bert", "classification", num_labels=3, **BERT)
    rows = skewed_rows(300)
    budget = int(0.6 * unconstrained_peak(model, rows, tok))
    plan = autofit.plan(model, budget, data=rows, tokenizer=tok, batch_size=16, device="cpu")
    assert plan.predicted.peak_bytes <= budget - plan.headroom_bytes
    assert plan.step.micro_batches_per_step[1] > 1  # the tight budget made steps accumulate

    result = autofit.train(model, rows, plan=plan, tokenizer=tok, epochs=1, quiet=True)
    samples = [r.samples for r in result.history]
    assert samples == [16] * (300 // 16) + [300 % 16]  # every step the asked batch; only the last short
    assert result.optimizer_steps == plan.step.steps_per_epoch == math.ceil(300 / 16)
    measured, predicted = result.measured_peak_bytes, result.predicted_allocated_bytes
    print(f"budget {budget:,} predicted {predicted:,} measured {measured:,} ({measured / predicted - 1:+.1%})")
    assert measured <= budget
    assert abs(measured - predicted) <= 0.05 * predicted
    assert result.memory_warning is None
    # the prediction for the micro-batches this run's steps cut (known from the seed before training): no
    # more than the plan's bound over any step, and closer to what was measured
    run = result.run_predicted_allocated_bytes
    assert run <= predicted and abs(measured - run) <= 0.02 * run, (run, measured)


def test_evaluation_stays_within_the_plan_and_counts_in_the_measured_peak(tok):
    model = tiny_model("bert", "classification", num_labels=3, **BERT)
    rows, held_out = skewed_rows(200, seed=1), skewed_rows(120, seed=2)
    budget = int(0.6 * unconstrained_peak(model, rows, tok))
    result = autofit.train(model, rows, budget=budget, tokenizer=tok, batch_size=16, epochs=1, quiet=True,
                           eval_data=held_out, device="cpu")
    assert len(result.eval) == 1 and result.eval[0].samples == 120
    assert result.measured_peak_bytes <= budget and result.memory_warning is None
    from autofit.report import train_summary

    steps = result.optimizer_steps
    first = result.eval[0]
    summary = train_summary(result)
    assert (f"eval of {first.samples} examples after step {steps} (epoch 1): loss {first.loss:.4f}, accuracy"
            in summary)
    # the time promise beside what the run took (the median step: the first pays set-up, an epoch's last is short)
    median = sorted(r.seconds for r in result.history)[steps // 2]
    assert (f"step time {median:.3g} s measured (median of {steps}), {result.plan.time.step_seconds:.3g} s "
            "predicted (measuring memory on the CPU slows steps: --no-measure)") in summary


def test_evaluations_own_peak_is_predicted_closely_from_above(tok, monkeypatch):
    # a layer evaluates saving nothing, as it runs when checkpointed: bounding it by what it would save put
    # the evaluation's prediction 46% over its measured peak in the tightest LoRA cells, above the training's
    import autofit.executor.run as executor_run
    from autofit import measure
    from autofit.profiler.cache import cached_profile
    from autofit.profiler.profile import PRECISIONS
    from autofit.training import predict_evaluation

    meters, peaks = [], []

    class Meter(measure.PeakMemoryMeter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            meters.append(self)

    def evaluate(ctx, batches, run=executor_run.evaluate):
        meters[-1].reset_peak()
        try:
            return run(ctx, batches)
        finally:
            peaks.append(meters[-1].peak_bytes)

    monkeypatch.setattr(executor_run, "PeakMemoryMeter", Meter)
    monkeypatch.setattr(executor_run, "evaluate", evaluate)
    model = tiny_model("bert", "classification", num_labels=3, **BERT)
    rows, held_out = skewed_rows(120, seed=1), skewed_rows(60, seed=2)
    for knobs in ({}, {"checkpoint_layers": (0, 1, 2), "precision": "bf16"}):
        plan = autofit.plan(model, "1GB", data=rows, tokenizer=tok, batch_size=16, device="cpu")
        plan = plan.model_copy(update={"knobs": type(plan.knobs).model_validate(
            {**plan.knobs.model_dump(), "micro_batch_size": 4, **knobs})})
        result = autofit.train(model, rows, plan=plan, tokenizer=tok, eval_data=held_out, quiet=True)
        profile = cached_profile(model, task="classification", timing=PRECISIONS)
        lengths = [len(tok(r["text"])["input_ids"]) for r in held_out]
        predicted = predict_evaluation(profile, result.plan, lengths).allocated_bytes
        assert peaks[-1] <= predicted <= 1.1 * peaks[-1], (knobs, predicted, peaks[-1])


def test_the_same_seed_gives_bit_identical_losses(tok, tmp_path):
    """The model is given as a directory: its 3-class head is new, so its weights must follow the seed too."""
    tiny_model("bert", "classification", **BERT).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    rows = skewed_rows(64, seed=3)
    runs = [autofit.train(str(tmp_path / "model"), rows, budget="1GB", batch_size=8, max_steps=4, seed=7,
                          quiet=True, device="cpu") for _ in range(2)]
    assert [r.loss for r in runs[0].history] == [r.loss for r in runs[1].history]
    other = autofit.train(str(tmp_path / "model"), rows, budget="1GB", batch_size=8, max_steps=4, seed=8,
                          quiet=True, device="cpu")
    assert [r.loss for r in other.history] != [r.loss for r in runs[0].history]


def test_a_plan_whose_knobs_no_longer_fit_its_budget_is_refused(tok):
    model = tiny_model("bert", "classification", num_labels=3, **BERT)
    rows = skewed_rows(100)
    plan = autofit.plan(model, "8MB", data=rows, tokenizer=tok, batch_size=16, device="cpu")
    edited = plan.model_copy(update={"knobs": plan.knobs.model_copy(update={"micro_batch_size": 4096,
                                                                             "tokens_per_micro_batch": None})})
    edited = edited.model_copy(update={"workload": edited.workload.model_copy(update={"batch_size": 4096})})
    with pytest.raises(PlanNoLongerFitsError, match="over its 8.0 MB budget") as info:
        autofit.train(model, rows * 41, plan=edited, tokenizer=tok, quiet=True)
    assert "\n" not in str(info.value)


def test_string_labels_name_the_trained_models_classes(tok, monkeypatch):
    """A saved model must answer in the data's class names, not LABEL_0..2; and a model whose config already
    names them keeps its numbering (its head's rows mean those classes)."""
    names = ["neg", "neu", "pos"]
    rows = [{**r, "label": names[r["label"]]} for r in skewed_rows(40)]
    model = tiny_model("bert", "classification", num_labels=3, **BERT)
    result = autofit.train(model, rows, budget="1GB", tokenizer=tok, batch_size=8, max_steps=1, quiet=True,
                           device="cpu")
    assert result.model.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    assert result.model.config.label2id == {"neg": 0, "neu": 1, "pos": 2}

    named = tiny_model("bert", "classification", num_labels=3, **BERT)
    named.config.id2label, named.config.label2id = {0: "pos", 1: "neu", 2: "neg"}, {"pos": 0, "neu": 1, "neg": 2}
    seen = []
    executor = importlib.import_module("autofit.executor")
    original = executor.run_plan

    def run_plan(model, plan, train, **kwargs):
        seen.append(train.labels)
        return original(model, plan, train, **kwargs)

    monkeypatch.setattr(executor, "run_plan", run_plan)
    again = autofit.train(named, rows, budget="1GB", tokenizer=tok, batch_size=8, max_steps=1, quiet=True,
                          device="cpu")
    assert again.model.config.id2label == {0: "pos", 1: "neu", 2: "neg"}
    assert seen[0] == [{"pos": 0, "neu": 1, "neg": 2}[r["label"]] for r in rows]


def test_a_decoder_is_planned_and_trained_as_the_classifier_its_head_or_labels_ask_for(tok, tmp_path):
    """A live GPT2ForSequenceClassification without a pad id (as from_pretrained("gpt2") gives it): planned as
    a classifier, not as gpt2's default causal LM, and trained without HF's "no padding token" refusal; a
    saved gpt2 LM given labelled data is fine-tuned as a classifier, saying so."""
    rows = skewed_rows(32)
    model = tiny_model("gpt2", "classification", n_positions=128, num_labels=3)
    model.config.pad_token_id = None
    plan = autofit.plan(model, "1GB", data=rows, tokenizer=tok, batch_size=8, device="cpu", seq_len=96)
    assert plan.task == "classification"
    result = autofit.train(model, rows, plan=plan, tokenizer=tok, max_steps=2, quiet=True)
    assert result.optimizer_steps == 2 and model.config.pad_token_id == tok.pad_token_id

    tiny_model("gpt2", "causal-lm", n_positions=128).save_pretrained(tmp_path / "lm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the new classification head's "newly initialized" warning
        planned = autofit.plan(str(tmp_path / "lm"), "1GB", data=rows, tokenizer=tok, batch_size=8, device="cpu",
                               seq_len=96)
    assert planned.task == "classification"
    assert autofit.plan(str(tmp_path / "lm"), "1GB", batch_size=8, device="cpu", seq_len=96).task == "causal-lm"


def test_a_cpu_plan_edited_to_offload_to_the_cpu_is_refused(tok):
    """Its peak would be predicted without the shards it claims to move off the device (27% low)."""
    model = tiny_model("bert", "classification", num_labels=3, **BERT)
    rows = skewed_rows(40)
    plan = autofit.plan(model, "1GB", data=rows, tokenizer=tok, batch_size=8, device="cpu", gpus=2)
    edited = plan.model_copy(update={"knobs": plan.knobs.model_copy(update={"strategy": "fsdp",
                                                                             "cpu_offload": True})})
    with pytest.raises(ValueError, match="a plan for the CPU: there is nowhere to offload to") as info:
        autofit.train(model, rows, plan=edited, tokenizer=tok, quiet=True)
    assert "\n" not in str(info.value)


def test_a_plan_edited_to_causal_lm_does_not_train_a_classifier_as_a_language_model(tok):
    model = tiny_model("bert", "classification", num_labels=3, **BERT)
    rows = skewed_rows(40)
    plan = autofit.plan(model, "1GB", data=rows, tokenizer=tok, batch_size=8, device="cpu")
    lm = plan.model_copy(update={"task": "causal-lm",
                                 "workload": plan.workload.model_copy(update={"task": "causal-lm"})})
    with pytest.raises(ValueError, match=r"the task is causal-lm, but this model \(BertForSequenceClassification\) "
                                         "has a classification head"):
        autofit.train(model, rows, plan=lm, tokenizer=tok, quiet=True)


@pytest.mark.parametrize("positions, usable", [(520, 512), (131, 128), (70, 64)])
def test_padding_never_passes_a_models_positions(tok, positions, usable):
    """XLM-R counts positions after its pad id: 520 position embeddings take 518 tokens, and 518 pads to 520
    at a multiple of 8. autofit keeps examples at what padding keeps within the limit."""
    config = XLMRobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=positions, pad_token_id=1)
    model = XLMRobertaForSequenceClassification(config)
    rows = [{"text": " ".join(WORDS * 20), "label": i % 2} for i in range(8)]
    result = autofit.train(model, rows, budget="1GB", tokenizer=tok, batch_size=4, max_steps=1, quiet=True,
                           device="cpu")
    assert result.optimizer_steps == 1
    assert result.plan.workload.lengths.max_length == usable


def test_a_second_train_of_the_same_model_reuses_the_profile(tok, monkeypatch):
    calls = []
    real = cache.profile_model
    monkeypatch.setattr(cache, "profile_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    rows = skewed_rows(32)
    for _ in range(2):
        model = tiny_model("bert", "classification", num_labels=7, seed=11, **BERT)  # a config no other test uses
        autofit.train(model, rows, budget="1GB", tokenizer=tok, batch_size=8, max_steps=1, quiet=True, device="cpu")
    # the trained model again: its first forward set config.problem_type, which changes nothing measured
    autofit.train(model, rows, budget="1GB", tokenizer=tok, batch_size=8, max_steps=1, quiet=True, device="cpu")
    assert len(calls) == 1


def test_a_normal_run_prints_no_library_warnings(tok):
    model = tiny_model("bert", "classification", num_labels=3, **BERT)
    rows = skewed_rows(24)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = autofit.plan(model, "1GB", data=rows, tokenizer=tok, batch_size=8, device="cpu")
        autofit.train(model, rows, plan=plan, tokenizer=tok, max_steps=1, quiet=True)
    assert torch.is_grad_enabled()


# ---- arguments refused in one line (found by python -m benchmarks.reliability) ------------------------------


def test_arguments_no_run_can_have_are_refused_in_one_line(tok, tmp_path):
    model = tiny_model("bert", "classification", num_labels=3, **BERT)
    rows = skewed_rows(16)
    plan = autofit.plan(model, "1GB", data=rows, tokenizer=tok, batch_size=8, device="cpu")
    cases = [
        (lambda: autofit.train(model, rows, budget="1GB", plan=plan, tokenizer=tok), "not both"),
        (lambda: autofit.train(model, rows, budget="1GB", tokenizer=tok, max_length=0, device="cpu"),
         "max_length must be at least 1"),
        (lambda: autofit.train(model, rows, budget="1GB", tokenizer=tok, batch_size=0, device="cpu"),
         "batch_size must be from 1"),
        (lambda: autofit.plan(model, "1GB", batch_size=10**12, device="cpu"), "batch_size must be from 1"),
        (lambda: autofit.plan(model, "1GB", n_trials=0, device="cpu"), "n_trials must be at least 1"),
        (lambda: autofit.plan(model, "1GB", device="cpu", storage=f"sqlite:///{tmp_path}/no/such/dir/s.db"),
         "cannot open the study storage"),
        (lambda: autofit.plan("bert-base-uncased", "16GB", task="causal-lm"), "bert is an encoder"),
        (lambda: autofit.train(model, rows, tokenizer=tok), "give a memory budget .* or a plan$"),
        (lambda: autofit.plan(torch.nn.Linear(2, 2), "1GB", device="cpu"), "not a plain Linear"),
        (lambda: autofit.plan(copy.deepcopy(model).half(), "1GB", device="cpu"), "weights are float16"),
        (lambda: autofit.plan(model.config, "1GB", data=rows, device="cpu"), "text data needs a tokenizer"),
        (lambda: autofit.train(model, [{"text": r["text"]} for r in rows], budget="1GB", tokenizer=tok,
                               task="causal-lm", device="cpu"), "has a classification head"),
        (lambda: autofit.train(model, [{**r, "label": r["label"] / 2} for r in rows], budget="1GB", tokenizer=tok,
                               device="cpu", quiet=True), "numbers to regress .* head has 3"),
        (lambda: autofit.train(model, rows, budget="1GB", tokenizer=tok, epochs=1.5, device="cpu", quiet=True),
         "whole numbers >= 1"),
        # wrong types: they failed deep inside (or True passed as 1)
        (lambda: autofit.plan(model, "1GB", batch_size="4", device="cpu"), "batch_size must be a whole number"),
        (lambda: autofit.plan(model, "1GB", batch_size=True, device="cpu"), "batch_size must be a whole number"),
        (lambda: autofit.plan(model, "1GB", seq_len=16.5, device="cpu"), "seq_len must be a whole number"),
        (lambda: autofit.plan(model, "1GB", num_samples=-5, device="cpu"), "num_samples must be at least 1"),
        (lambda: autofit.train(model, rows, budget="1GB", tokenizer=tok, lr="1e-3"), "positive number, not '1e-3'"),
        (lambda: autofit.train(model, rows, budget="1GB", tokenizer=tok, seed="x"), "seed must be a whole number"),
        (lambda: autofit.train(model, rows, budget="1GB", tokenizer=tok, max_length=8.5), "max_length must be a whole"),
    ]
    for call, words in cases:
        with pytest.raises(ValueError, match=words) as info:
            call()
        assert "\n" not in str(info.value), str(info.value)


def test_less_data_than_one_step_plans_and_trains_that_one_short_step(tok, caplog):
    # the default batch of 32 on 5 examples: the plan's simulated epoch counted 5/32 of a step and failed
    # its own validation (padding efficiency 6.2)
    model = tiny_model("bert", "classification", num_labels=3, **BERT)
    rows = skewed_rows(5)
    plan = autofit.plan(model, "1GB", data=rows, tokenizer=tok, device="cpu")
    assert plan.batch_size == 32 and plan.step.steps_per_epoch == 1 and 0 < plan.time.padding_efficiency <= 1
    with caplog.at_level("WARNING", logger="autofit"):
        result = autofit.train(model, rows, plan=plan, tokenizer=tok, epochs=2, quiet=True)
    assert [r.samples for r in result.history] == [5, 5]
    assert "the training data has 5 examples, fewer than the plan's batch of 32: each step trains all 5" in caplog.text


def test_the_model_plan_and_tokenizer_forms_the_readme_lists(tok, tmp_path):
    # a config trains a model with random weights, a plan can be its file, a tokenizer the `tokenizers` one;
    # max_steps bounds the run instead of epochs (3 steps an epoch here)
    model = tiny_model("bert", "classification", num_labels=3, **BERT)
    rows = skewed_rows(24)
    autofit.plan(model, "1GB", data=rows, tokenizer=tok, batch_size=8, device="cpu").save(tmp_path / "plan.json")
    result = autofit.train(model.config, rows, plan=str(tmp_path / "plan.json"), tokenizer=tok.backend_tokenizer,
                           max_steps=5, eval_data=rows[:6], quiet=True)
    assert [r.samples for r in result.history] == [8] * 5
    assert [r.step for r in result.eval] == [3, 5]
    assert result.model is not model and result.model.config.num_labels == 3


def test_causal_lm_examples_with_nothing_to_predict_are_left_out_and_said(caplog):
    # a one-token example has no next token: a step of only such examples logged a loss of 0 and updated
    # nothing; as evaluation data, one with no tokens divided by zero
    rng = random.Random(0)
    rows = [{"input_ids": [rng.randrange(5, 90) for _ in range(rng.choice([1, 1, 3, 9, 30]))]} for _ in range(40)]
    kept = sum(len(r["input_ids"]) > 1 for r in rows)
    plan = autofit.plan(tiny_model("gpt2", "causal-lm"), "1GB", data=rows, batch_size=8, device="cpu")
    assert plan.workload.lengths.num_samples == kept == 24
    with caplog.at_level("INFO", logger="autofit"):
        result = autofit.train(tiny_model("gpt2", "causal-lm"), rows, plan=plan, quiet=True, eval_data=rows)
    assert [r.samples for r in result.history] == [8, 8, 8] and result.eval[0].samples == kept
    assert all(r.loss > 0 for r in result.history)
    assert "16 training examples had fewer than two tokens and were left out" in caplog.text


def test_a_causal_lm_leaves_text_labels_unused_saying_so_and_trains_on_token_labels(tok, caplog):
    """Labelled text asked to train a causal LM (task="causal-lm"): the labels go unused, with a note, in plan
    and train, for training and evaluation data alike. Pre-tokenized `labels` are token labels: used."""
    rows = skewed_rows(24)
    lm = tiny_model("gpt2", "causal-lm", n_positions=128)
    with caplog.at_level("INFO", logger="autofit"):
        plan = autofit.plan(lm, "1GB", data=rows, tokenizer=tok, batch_size=8, device="cpu", seq_len=96)
        result = autofit.train(lm, rows, plan=plan, tokenizer=tok, max_steps=1, quiet=True, eval_data=rows)
    assert plan.task == "causal-lm" and result.optimizer_steps == 1 and result.eval[0].samples == 24
    assert caplog.text.count("the task is causal-lm: the data's labels (column 'label') are not used") == 2
    assert "the evaluation data's labels (column 'label') are not used" in caplog.text
    with pytest.raises(ValueError, match="label_column \\(--label-column\\) names labels \\('label'\\)"):
        autofit.train(lm, rows, plan=plan, tokenizer=tok, max_steps=1, quiet=True, label_column="label")
    ids = [[5 + (i * 7 + j) % 80 for j in range(3 + i % 9)] for i in range(16)]
    masked = [{"input_ids": row, "labels": [-100] + row[1:]} for row in ids]  # the first token is not learned
    token_plan = autofit.plan(lm, "1GB", data=masked, batch_size=8, device="cpu", seq_len=96)
    trained = autofit.train(lm, masked, plan=token_plan, max_steps=1, quiet=True)
    assert trained.optimizer_steps == 1 and trained.history[0].samples == 8


def test_a_damaged_checkpoint_is_named_not_a_traceback(tok, tmp_path, monkeypatch):
    model = tiny_model("bert", "classification", num_labels=3, **BERT)
    rows = skewed_rows(32)
    autofit.train(model, rows, budget="1GB", tokenizer=tok, batch_size=8, max_steps=2, output_dir=str(tmp_path),
                  quiet=True, device="cpu")
    checkpoint = next(tmp_path.glob("checkpoint-*"))
    monkeypatch.setattr(autofit.training, "_search_plan", None)  # a resume trains the plan in force, not a new one
    (checkpoint / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match=f"{checkpoint.name} is damaged: SafetensorError") as info:
        autofit.train(model, rows, budget="1GB", tokenizer=tok, batch_size=8, output_dir=str(tmp_path),
                      resume=True, quiet=True, device="cpu")
    assert "\n" not in str(info.value)


def test_a_checkpoint_with_another_head_size_is_loaded_with_a_new_head_and_said(tok, tmp_path, caplog):
    tiny_model("bert", "classification", **BERT).save_pretrained(tmp_path / "model")  # 2 labels
    tok.save_pretrained(tmp_path / "model")
    with caplog.at_level("WARNING", logger="autofit"):
        result = autofit.train(str(tmp_path / "model"), skewed_rows(16), budget="1GB", batch_size=8, max_steps=1,
                               quiet=True, device="cpu")
    assert result.optimizer_steps == 1
    assert "saved with a 2-label head and the data has 3 classes: a new head is trained" in caplog.text


def test_a_saved_plan_trains_its_data_cut_where_the_plan_cut_it(tok, tmp_path, caplog):
    """A plan made with seq_len=24 on data whose tail runs to 120 words trains that data cut at 24 tokens, as
    planned: not at the model's 64 positions, which the plan's budget never allowed for."""
    model = tiny_model("bert", "classification", num_labels=3, **BERT)
    rows = skewed_rows(120, seed=3)
    assert max(len(r["text"].split()) for r in rows) > 24
    free = autofit.plan(model, "64GB", data=rows, tokenizer=tok, batch_size=16, device="cpu", seq_len=24,
                        policy="fastest")
    with caplog.at_level("INFO", logger="autofit"):
        plan = autofit.plan(model, int(1.1 * free.predicted.peak_bytes), data=rows, tokenizer=tok, batch_size=16,
                            device="cpu", seq_len=24)
    assert plan.workload.max_length == 24 and plan.workload.lengths.max_length <= 24
    longer = sum(len(tok(r["text"])["input_ids"]) > 24 for r in rows)
    assert f"{longer} of 120 examples are longer than 24 tokens: planned cut at 24" in caplog.text
    plan.save(tmp_path / "plan.json")
    result = autofit.train(model, rows, plan=tmp_path / "plan.json", tokenizer=tok, max_steps=2, quiet=True)
    assert result.plan.workload.max_length == 24
    assert result.plan.workload.lengths.max_length <= 24
    assert result.measured_peak_bytes <= plan.budget_bytes and result.memory_warning is None
    roomy = autofit.plan(model, "1GB", data=rows, tokenizer=tok, batch_size=16, device="cpu", seq_len=24)
    longer = autofit.train(model, rows, plan=roomy, tokenizer=tok, max_steps=1, quiet=True, max_length=32)
    assert longer.plan.workload.lengths.max_length > 24  # told otherwise: cut where told


def test_training_a_model_from_its_folder_reuses_the_profile_its_plan_made(tok, tmp_path, monkeypatch):
    """`autofit plan --model DIR` then `autofit train --plan plan.json --model DIR`: one profile, so the run's
    time and peak are predicted from the same block times the plan was chosen by."""
    folder = tmp_path / "model"
    tiny_model("bert", "classification", num_labels=2, seed=12, **BERT).save_pretrained(folder)
    tok.save_pretrained(folder)
    rows = [{"text": r["text"], "label": r["label"] % 2} for r in skewed_rows(40, seed=4)]
    calls = []
    real = cache.profile_model
    monkeypatch.setattr(cache, "profile_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    plan = autofit.plan(str(folder), "1GB", data=rows, batch_size=8, device="cpu")
    planned = len(calls)  # 1, or 0 when an earlier test profiled the same config
    result = autofit.train(str(folder), rows, plan=plan, max_steps=1, quiet=True)
    assert len(calls) == planned and result.optimizer_steps == 1


def test_train_says_what_it_tidied_after_a_killed_save(tok, tmp_path, caplog):
    model = tiny_model("bert", "classification", num_labels=3, **BERT)
    rows = skewed_rows(48, seed=5)
    settings = dict(budget="1GB", tokenizer=tok, batch_size=8, quiet=True, device="cpu", output_dir=str(tmp_path))
    autofit.train(model, rows, max_steps=2, **settings)
    # killed between moving a same-step checkpoint aside and putting its replacement in place
    (tmp_path / "checkpoint-00000002").rename(tmp_path / ".old-checkpoint-00000002-999")
    with caplog.at_level("INFO", logger="autofit"):  # a note: it says what was done, nothing to check
        result = autofit.train(tiny_model("bert", "classification", num_labels=3, **BERT), rows, max_steps=3,
                               resume=True, **settings)
    assert "restored checkpoint-00000002, whose replacement an interrupted save never finished" in caplog.text
    assert [r.step for r in result.history][-1] == 3


def test_a_trained_adapter_reloads_with_its_head_size_and_class_names(tok, tmp_path):
    """peft saves neither the head's size nor the class names: onto a base loaded with the default 2 labels a
    3-class head did not load. load_adapter rebuilds the base as trained, from the folder the adapter names."""
    from autofit.techniques.lora import load_adapter

    names = ["neg", "neu", "pos"]
    rows = [{**r, "label": names[r["label"] % 3]} for r in skewed_rows(40)]
    tiny_model("bert", "classification", **BERT).save_pretrained(tmp_path / "base")
    base = autofit.models.load_model(tmp_path / "base", "classification", num_labels=3)
    result = autofit.train(base, rows, budget="1GB", tokenizer=tok, batch_size=8, max_steps=2, quiet=True,
                           device="cpu", adapter="lora", output_dir=str(tmp_path / "out"), lr=1e-2)
    reloaded = load_adapter(result.adapter_dir).eval()
    assert reloaded.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    batch = {"input_ids": torch.tensor([[2, 5, 9, 11, 3]])}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, result.model.eval()(**batch).logits)
    with pytest.raises(ValueError, match="is not an adapter folder"):
        load_adapter(tmp_path / "base")
    config = tmp_path / "out" / "adapter" / "adapter_config.json"
    config.write_text(config.read_text().replace('"SEQ_CLS"', '"QUESTION_ANS"'))
    with pytest.raises(ValueError, match="holds a QUESTION_ANS adapter"):
        load_adapter(result.adapter_dir)
