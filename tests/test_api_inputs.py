"""The Python API with what a Python user hands it: notes shown (and kept on the result), in-memory inputs
autofit cannot read refused in one line, and the inputs that trained wrongly or failed deep inside before
(a headless or meta-device model, a decoder object padded with a real token, token labels)."""

import logging
import random

import numpy as np
import pytest
import torch
from _tiny import short_model as tiny_model
from test_api import make_rows, make_tokenizer

import autofit
from autofit.notes import noting


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _train(model, rows, tok=None, **kwargs):
    options = dict(budget="1GB", device="cpu", batch_size=8, measure_memory=False, tokenizer=tok)
    return autofit.train(model, rows, **{**options, **kwargs})


# ---- notes ------------------------------------------------------------------------------------------------


def test_train_shows_its_notes_once_and_keeps_them_on_the_result(tok, capsys):
    """Python drops INFO records by default: a note saying examples were cut or left out never reached an API
    user. Now `note:` lines on stderr, and result.notes."""
    rows = make_rows(24, seed=3, max_words=30) + [{"text": " ".join(["w1"] * 200), "label": 1}]
    result = _train(tiny_model("bert"), rows, tok, max_length=32)
    err = capsys.readouterr().err
    truncated = [n for n in result.notes if "truncated" in n]
    assert len(truncated) == 1 and "longer than 32 tokens" in truncated[0]
    assert err.count(f"note: {truncated[0]}") == 1


def test_evaluation_examples_cut_at_the_length_are_noted(tok):
    rows = make_rows(24, seed=3, max_words=8)
    long_eval = make_rows(6, seed=4, max_words=8) + [{"text": " ".join(["w1"] * 60), "label": 0}]
    result = _train(tiny_model("bert"), rows, tok, eval_data=long_eval, max_length=16, quiet=True, max_steps=1)
    assert "1 of 7 evaluation examples were longer than 16 tokens and were truncated" in result.notes


def test_quiet_train_says_nothing_but_keeps_its_notes(tok, capsys, tmp_path):
    rows = make_rows(24, seed=3, max_words=30)
    result = _train(tiny_model("bert"), rows, tok, max_length=16, quiet=True)
    assert "note:" not in capsys.readouterr().err
    assert any("truncated" in n for n in result.notes)
    tiny_model("bert").save_pretrained(tmp_path / "bert")  # loaded from a folder: transformers' bars stay off too
    capsys.readouterr()
    _train(str(tmp_path / "bert"), rows, tok, max_length=16, quiet=True, max_steps=1)
    assert capsys.readouterr().err == ""


def test_notes_are_not_repeated_where_the_callers_logging_shows_them(caplog, capsys):
    caplog.set_level(logging.INFO, logger="autofit")
    with noting() as notes:
        logging.getLogger("autofit").info("inferred something")
    assert notes == ["inferred something"] and "inferred something" in caplog.text
    assert "note:" not in capsys.readouterr().err


def test_nested_noting_shows_once_and_collects_at_every_level():
    shown = []
    with noting(lambda message, warning: shown.append((message, warning))) as outer:
        with noting() as inner:  # the API inside the CLI
            logging.getLogger("autofit").info("a")
            logging.getLogger("autofit").info("a")
            logging.getLogger("autofit").warning("b")
    assert shown == [("a", False), ("b", True)] and outer == inner == ["a", "b"]
    assert not [h for h in logging.getLogger("autofit").handlers if type(h).__name__ == "_Notes"]


# ---- inputs refused in one line ---------------------------------------------------------------------------


def test_a_streamed_dataset_is_refused_in_one_line(tok):
    datasets = pytest.importorskip("datasets")
    rows = make_rows(16)
    streamed = datasets.IterableDataset.from_generator(lambda: iter(rows))
    with pytest.raises(ValueError, match="cannot read a streamed IterableDataset: load the data set without "):
        autofit.plan(tiny_model("bert"), "1GB", data=streamed, tokenizer=tok, device="cpu", batch_size=8)


def test_a_model_without_a_task_head_or_without_weights_is_refused_in_one_line(tok):
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=100, max_position_embeddings=64)
    with pytest.raises(ValueError, match="BertModel has no task head"):
        autofit.plan(BertModel(config), "1GB", device="cpu")
    with torch.device("meta"):
        meta = tiny_model("bert")
    with pytest.raises(ValueError, match="weights are on the meta device"):
        _train(meta, make_rows(16), tok)


@pytest.mark.parametrize("seed", [None, 1.5])
def test_a_seed_that_is_no_whole_number_is_refused(tok, seed):
    with pytest.raises(ValueError, match="seed must be a whole number"):
        _train(tiny_model("bert"), make_rows(16), tok, seed=seed)


def test_a_numpy_seed_trains_as_the_same_int(tok):
    rows = make_rows(16)
    losses = [[h.loss for h in _train(tiny_model("bert"), rows, tok, seed=s, quiet=True).history]
              for s in (np.int64(3), 3)]
    assert losses[0] == losses[1]


# ---- inputs that trained wrongly or failed deep inside -----------------------------------------------------


def _decoder_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"input_ids": [rng.randrange(2, 90) for _ in range(rng.randint(3, 20))], "label": i % 2}
            for i in range(n)]


def test_a_decoder_classifier_object_pads_with_its_end_token_as_one_built_from_its_config():
    """GPT2ForSequenceClassification pools each row's last token that is not the pad id: padded with 0 (a
    real token) a row ending in token 0 was classified from an earlier one."""
    model = tiny_model("gpt2", eos_token_id=1, bos_token_id=1)
    assert model.config.pad_token_id is None or model.config.pad_token_id == 0
    model.config.pad_token_id = None
    result = _train(model, _decoder_rows(24), quiet=True)
    assert result.optimizer_steps == 3 and model.config.pad_token_id == 1


def test_a_padding_id_past_the_vocabulary_is_refused_in_one_line():
    """A small gpt2 config keeps gpt2's end-of-text id 50256: padding with it failed inside the embedding."""
    model = tiny_model("gpt2", eos_token_id=50256, bos_token_id=50256)
    model.config.pad_token_id = None
    with pytest.raises(ValueError, match="padding id 50256 .* not in the model's vocabulary of 100"):
        _train(model, _decoder_rows(16), quiet=True)


def test_token_classification_from_a_config_counts_its_classes_from_the_token_labels():
    """The head was built with 2 classes whatever the labels held (IndexError: Target 2 is out of bounds)."""
    rng = random.Random(0)
    lengths = [rng.randint(3, 20) for _ in range(24)]
    rows = [{"input_ids": [rng.randrange(5, 90) for _ in range(n)],
             "labels": [-100] + [rng.randrange(4) for _ in range(n - 1)]} for n in lengths]
    config = tiny_model("bert").config
    result = _train(config, rows, task="token-classification", quiet=True)
    assert result.model.config.num_labels == 4 and result.optimizer_steps == 3


def test_causal_lm_examples_without_a_scored_token_are_left_out_with_a_note():
    """All -100 labels: nothing to predict. A run of only such rows trained steps of loss 0 and changed
    nothing; now they are left out, and a run with nothing left is refused."""
    rng = random.Random(0)
    rows = [{"input_ids": (ids := [rng.randrange(2, 90) for _ in range(rng.randint(3, 20))]),
             "labels": ids if i % 3 else [-100] * len(ids)} for i in range(24)]
    model = tiny_model("gpt2", "causal-lm", eos_token_id=1, bos_token_id=1)
    result = _train(model, rows, task="causal-lm", quiet=True)
    assert any("8 training examples" in n and "-100" in n for n in result.notes)
    assert sum(h.samples for h in result.history) == 16
    with pytest.raises(ValueError, match="nothing to train on"):
        _train(tiny_model("gpt2", "causal-lm", eos_token_id=1, bos_token_id=1),
               [dict(r, labels=[-100] * len(r["input_ids"])) for r in rows], task="causal-lm", quiet=True)


def test_an_evaluation_class_id_the_head_lacks_is_named(tok):
    rows = make_rows(16)
    unseen = [dict(r, label=7) for r in make_rows(4, seed=1)]
    with pytest.raises(ValueError, match=r"evaluation data has class id 7 but the model's head has 2 classes "
                                         r"\(ids 0 to 1\)"):
        _train(tiny_model("bert"), rows, tok, eval_data=unseen, quiet=True)


def test_data_and_eval_data_may_be_paths_read_as_the_cli_reads_them(tok, tmp_path):
    import json

    rows, held_out = make_rows(24, seed=1), make_rows(8, seed=2)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "val.csv").write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in held_out))
    from_files = _train(tiny_model("bert"), str(tmp_path / "train.jsonl"), tok, eval_data=tmp_path / "val.csv",
                        quiet=True)
    in_memory = _train(tiny_model("bert"), rows, tok, eval_data=held_out, quiet=True)
    assert [h.loss for h in from_files.history] == [h.loss for h in in_memory.history]
    assert from_files.eval[0].samples == 8 and from_files.eval[0].loss == in_memory.eval[0].loss
    plan = autofit.plan(tiny_model("bert"), "1GB", data=tmp_path / "train.jsonl", tokenizer=tok, device="cpu",
                        batch_size=8, quiet=True)
    assert plan.workload.lengths.num_samples == 24
    with pytest.raises(ValueError, match="data file not found"):
        _train(tiny_model("bert"), str(tmp_path / "missing.jsonl"), tok)


def test_a_logger_silenced_by_the_caller_shows_no_notes_but_keeps_them(capsys):
    logger = logging.getLogger("autofit")
    logger.setLevel(logging.WARNING)
    try:
        with noting() as notes:
            logger.info("inferred something")
    finally:
        logger.setLevel(logging.NOTSET)
    assert notes == ["inferred something"] and "note:" not in capsys.readouterr().err
    assert logger.level == logging.NOTSET


def test_a_plan_from_data_profiles_the_head_the_data_needs_and_train_reuses_it(tok, tmp_path, monkeypatch):
    """A model folder whose config has 2 labels, data with 3 classes: plan() profiled the 2-class head, so
    train(plan=...) profiled the model again (tens of seconds on a real model) and its figures moved."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("AUTOFIT_CACHE", str(cache))
    tiny_model("bert").save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    rows = [dict(r, label=i % 3) for i, r in enumerate(make_rows(24, seed=4))]
    plan = autofit.plan(str(tmp_path / "model"), "1GB", data=rows, device="cpu", batch_size=8, quiet=True)
    profiles = sorted(p.name for p in cache.rglob("*.json"))
    result = _train(str(tmp_path / "model"), rows, plan=plan, budget=None, batch_size=None, device=None,
                    quiet=True)
    assert sorted(p.name for p in cache.rglob("*.json")) == profiles and len(profiles) >= 1
    assert not any("timing every block" in n for n in result.notes)
    trained = sum(p.numel() for p in result.model.parameters())
    assert result.model.config.num_labels == 3 and plan.num_params == trained


def test_lora_plans_train_at_the_adapters_learning_rate_unless_one_is_given(tok):
    """At full fine-tuning's 2e-5 a LoRA plan the search chose barely learnt (MiniLM: 53% -> 68% eval accuracy
    in two epochs, where 1e-3 reached 100%), and nothing said so."""
    rows = make_rows(16)
    lora = _train(tiny_model("bert"), rows, tok, adapter="lora", quiet=True)
    assert lora.plan.knobs.adapter == "lora" and {h.lr for h in lora.history} == {2e-4}
    assert any("learning rate 0.0002" in n for n in lora.notes)
    given = _train(tiny_model("bert"), rows, tok, adapter="lora", lr=5e-4, quiet=True)
    assert {h.lr for h in given.history} == {5e-4} and not any("learning rate" in n for n in given.notes)
    full = _train(tiny_model("bert"), rows, tok, adapter="none", quiet=True)
    assert {h.lr for h in full.history} == {2e-5}
    args = lora.plan.to_training_arguments("out", use_cpu=True)
    assert args.learning_rate == 2e-4


def test_a_plan_takes_prepared_data_and_its_class_count(tok):
    from autofit.data import prepare_examples

    rows = [dict(r, label=i % 3) for i, r in enumerate(make_rows(24, seed=4))]
    prepared = prepare_examples(rows, tok, task="classification", max_length=64)
    plan = autofit.plan(tiny_model("bert").config, "1GB", data=prepared, device="cpu", batch_size=8, quiet=True)
    with_rows = autofit.plan(tiny_model("bert").config, "1GB", data=rows, tokenizer=tok, device="cpu",
                             batch_size=8, quiet=True)
    assert plan.num_params == with_rows.num_params == tiny_model("bert", num_labels=3).num_parameters()
