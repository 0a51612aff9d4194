"""autofit.plan and autofit.train: arguments no run can have are refused in one line before any work, what a
given plan fixes may not be changed, `label_column` names the labels, and a given plan is checked again against
its budget less its headroom."""

import pytest

import autofit
import autofit.api
import autofit.training
from autofit.profiler import profile_model
from autofit.training import PlanNoLongerFitsError, replan_for_data

from test_api import BERT, make_rows, make_tokenizer, tiny_model

ROWS = make_rows(16, max_words=20)
TARGET_ROWS = [{"text": r["text"], "target": r["label"]} for r in ROWS]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("bert", "classification", **BERT)


@pytest.fixture(scope="module")
def plan(model, tok):
    return autofit.plan(model, "1GB", data=ROWS, tokenizer=tok, batch_size=8, device="cpu")


def _never(*args, **kwargs):
    raise AssertionError("the work started before the bad argument was refused")


def _plan(**kwargs):
    return lambda m, t, p: autofit.plan(m, "1GB", **{"device": "cpu", **kwargs})


def _train(data=ROWS, **kwargs):
    return lambda m, t, p: autofit.train(m, data, **{"budget": "1GB", "tokenizer": t, "device": "cpu", "quiet": True,
                                                     **kwargs})


def _train_plan(**kwargs):
    return lambda m, t, p: autofit.train(m, ROWS, plan=p, tokenizer=t, quiet=True, **kwargs)


BAD = {
    "device 0 (plan)": (_plan(device=0), TypeError, r"^device must be a device name .*, not 0$"),
    "device 0 (train)": (_train(device=0), TypeError, r"^device must be a device name .*, not 0$"),
    "tokenizer 1 (plan)": (_plan(data=ROWS, tokenizer=1), TypeError, r"^tokenizer must be a tokenizer .*, not 1$"),
    "tokenizer 1 (train)": (_train(tokenizer=1), TypeError, r"^tokenizer must be a tokenizer .*, not 1$"),
    "text_column 1 (plan)": (_plan(data=ROWS, text_column=1), TypeError, r"^text_column .* must be a column name"),
    "text_column 1 (train)": (_train(text_column=1), TypeError, r"^text_column .* or a pair of them, not 1$"),
    "three text columns": (_train(text_column=["a", "b", "c"]), TypeError, r"not \['a', 'b', 'c'\]$"),
    "label_column 5": (_plan(data=ROWS, label_column=5), TypeError, r"^label_column .* must be a column name, not 5"),
    "text_column without data": (_plan(text_column="text"), ValueError, r"^text_column .* names a column of the da"),
    "plan a dict": (lambda m, t, p: autofit.train(m, ROWS, plan={"knobs": {}}, tokenizer=t), TypeError,
                    r"^plan must be a Plan or a saved plan's file, not \{'knobs': \{\}\} \(Plan.model_validate"),
    "num_labels '2'": (_train(num_labels="2"), ValueError, r"^num_labels must be a whole number, not '2'$"),
    "num_labels -1": (_train(num_labels=-1), ValueError, r"^num_labels must be at least 1, not -1$"),
    "num_labels 0": (_train(num_labels=0), ValueError, r"^num_labels must be at least 1, not 0$"),
    "gpus 0": (_train(gpus=0), ValueError, r"^gpus must be at least 1, not 0$"),
    "a dict of scalars (plan)": (_plan(data={"text": "a", "label": 1}, tokenizer=None), ValueError,
                                 r"^data is a dict of columns, but column 'text' holds 'a', not a list"),
    "a dict of scalars (train)": (_train(data={"text": "w1 w2", "label": 1}), ValueError,
                                  r"^data is a dict of columns, but column 'text' holds 'w1 w2'"),
    "eval_data a dict of scalars": (_train(eval_data={"text": "w1", "label": 1}), ValueError,
                                    r"^eval_data is a dict of columns"),
    "measure_memory 'no'": (_train(measure_memory="no"), TypeError, r"^measure_memory must be True or False, not 'no'"),
    "resume 1": (_train(resume=1), TypeError, r"^resume must be True or False, not 1$"),
    "output_dir ''": (_train(output_dir=""), ValueError, r"^output_dir \(--output-dir\) is '': name a folder"),
    "output_dir 3": (_train(output_dir=3), TypeError, r"^output_dir must be a folder's path, not 3$"),
    "another batch than the plan's": (_train_plan(batch_size=16), ValueError,
                                      r"^the plan fixes batch_size \(--batch-size\) at 8, not 16"),
    "another policy than the plan's": (_train_plan(policy="fastest"), ValueError,
                                       r"^the plan fixes policy \(--policy\) at balanced, not fastest"),
    "another task than the plan's": (_train_plan(task="causal-lm"), ValueError,
                                     r"^the plan fixes task \(--task\) at classification, not causal-lm"),
    "other gpus than the plan's": (_train_plan(gpus=2), ValueError, r"^the plan fixes gpus \(--gpus\) at 1, not 2"),
    "another device than the plan's": (_train_plan(device="a100"), ValueError,
                                       r"^the plan is for its device \(cpu\): leave device out"),
    "a causal LM with a label column": (_train(task="causal-lm", label_column="label"), ValueError,
                                        r"^the task is causal-lm, but label_column"),
}


@pytest.mark.parametrize("case", BAD, ids=BAD.keys())
def test_a_bad_argument_is_one_line_before_any_work(model, tok, plan, monkeypatch, case):
    call, error, words = BAD[case]
    for where in (autofit.api, autofit.training):  # no profile, no search: the argument is refused first
        monkeypatch.setattr(where, "_profile", _never)
    monkeypatch.setattr(autofit.training, "load_model", _never)
    with pytest.raises(error, match=words) as info:
        call(model, tok, plan)
    assert "\n" not in str(info.value)


def test_what_a_plan_chose_may_be_repeated(model, tok, plan):
    result = autofit.train(model, ROWS, plan=plan, tokenizer=tok, batch_size=8, policy="balanced",
                           task="classification", device="cpu", max_steps=1, quiet=True)
    assert result.optimizer_steps == 1 and result.plan.batch_size == 8


def test_label_column_names_the_labels(tok, tmp_path):
    model = tiny_model("bert", "classification", **BERT)
    result = autofit.train(model, TARGET_ROWS, budget="1GB", tokenizer=tok, label_column="target", batch_size=8,
                           max_steps=1, device="cpu", quiet=True)
    assert result.optimizer_steps == 1
    with pytest.raises(ValueError, match=r"no label column .* \['target', 'text'\]"):
        autofit.train(model, TARGET_ROWS, budget="1GB", tokenizer=tok, device="cpu", quiet=True)
    # a saved language model given labels in a column of another name is fine-tuned as a classifier
    tiny_model("gpt2", "causal-lm", n_positions=128).save_pretrained(tmp_path / "lm")
    args = dict(data=TARGET_ROWS, tokenizer=tok, batch_size=8, device="cpu", seq_len=64)
    assert autofit.plan(str(tmp_path / "lm"), "1GB", label_column="target", **args).task == "classification"
    assert autofit.plan(str(tmp_path / "lm"), "1GB", **args).task == "causal-lm"


def test_a_given_plan_must_fit_its_budget_less_its_headroom(model, tok, plan):
    """The search kept the peak under budget - headroom; a plan whose peak on this data is in the headroom
    would train without the margin that covers the memory model's errors."""
    profile = profile_model(model, task="classification")
    lengths = [len(tok(r["text"])["input_ids"]) for r in ROWS]
    peak = replan_for_data(plan, profile, lengths, plan.workload.max_length).predicted.peak_bytes
    exact = plan.model_copy(update={"budget_bytes": peak, "headroom_bytes": 0})
    assert replan_for_data(exact, profile, lengths, plan.workload.max_length).predicted.peak_bytes == peak
    tight = plan.model_copy(update={"budget_bytes": peak + 1024, "headroom_bytes": 2048})
    with pytest.raises(PlanNoLongerFitsError, match=r"over its .* budget less its 2.0 KB headroom") as info:
        replan_for_data(tight, profile, lengths, plan.workload.max_length)
    assert "\n" not in str(info.value)
