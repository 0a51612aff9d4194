"""Sequence-level labels: which kind a column holds (CSV strings included), and evaluation data of the
training data's kind."""

from __future__ import annotations

import pytest

from autofit.data import DataError, prepare_examples
from autofit.data_files import load_data_file
from autofit.labels import ALL_DISTINCT_MIN, IDS, NAMES, REGRESSION, class_labels, label_kind


def csv_labels(tmp_path, labels: list[str]) -> list:
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"w{i},{label}\n" for i, label in enumerate(labels)))
    return [row["label"] for row in load_data_file(path)]


def test_csv_number_strings_are_regression_targets_as_json_floats_are(tmp_path):
    out = class_labels(csv_labels(tmp_path, ["2.43", "0.0", "-1.5", "1e3"]))
    assert out["num_labels"] == 1 and out["labels"] == [2.43, 0.0, -1.5, 1000.0]
    assert out["label_note"].startswith("labels are floats (-1.5, 0.0, 2.43, 1000.0): regression")
    assert class_labels(csv_labels(tmp_path, ["1", "2.5"]))["labels"] == [1.0, 2.5]  # as JSON [1, 2.5]
    ids = class_labels(csv_labels(tmp_path, ["0", "1", " 2 "]))
    assert ids["labels"] == [0, 1, 2] and ids["num_labels"] == 3 and "label_names" not in ids


def test_a_non_finite_number_string_is_named_not_turned_into_a_class(tmp_path):
    with pytest.raises(DataError, match="example 1 has label nan: regression labels must be finite numbers"):
        class_labels(csv_labels(tmp_path, ["0.5", "nan"]))


@pytest.mark.parametrize("labels, names", [
    (["1", "cat", "1"], ["1", "cat"]),  # one name makes the whole column names
    (["--1", "1", "0"], ["--1", "0", "1"]),  # not numbers to int(), though "--1".lstrip("-").isdigit()
    (["²", "1"], ["1", "²"]),  # "²".isdigit() is True
    (["1_000", "2"], ["1_000", "2"]),  # float() and int() read underscores: a CSV does not mean them
    (["nan", "cat"], ["cat", "nan"]),
])
def test_strings_that_are_not_all_numbers_are_class_names(labels, names):
    out = class_labels(labels)
    assert out["label_names"] == names and out["labels"] == [names.index(v) for v in labels]


def test_labels_of_mixed_types_name_the_examples():
    with pytest.raises(DataError) as info:
        class_labels(["cat", "dog", 1])
    assert str(info.value) == ("labels must be all strings, all integers or all numbers: example 0 has 'cat'; "
                               "example 2 has 1")


def rows(labels) -> list[dict]:
    return [{"input_ids": [5, 6], "label": label} for label in labels]


def prepared(labels, train=None):
    if train is None:
        return prepare_examples(rows(labels), task="classification", max_length=8)
    return prepare_examples(rows(labels), task="classification", max_length=8, min_classes=1,
                            label_names=train.label_names, train_kind=label_kind(train))


def test_label_kind_of_prepared_data():
    assert [label_kind(prepared(v)) for v in (["a", "b"], [0, 1], [0.5, 1])] == [NAMES, IDS, REGRESSION]
    assert label_kind(prepare_examples({"input_ids": [[1, 2]]}, task="causal-lm", max_length=8)) is None


@pytest.mark.parametrize("train, held_out, message", [
    (["neg", "pos"], [1, 0], (r"the training data's labels are class names \(neg, pos\) but the evaluation "
                              r"data's are class ids \(example 0 has label 1\): give both the same kind of labels")),
    (["neg", "pos"], ["5", "1"], r"the evaluation data's are class ids \(example 0 has label '5'\)"),  # CSV
    (["neg", "pos"], ["pos", "1"], r"example 1 has label '1', which is not one of the training data's classes"),
    ([0, 1], ["pos", "neg"], r"are class ids but the evaluation data's are class names \(example 0 has label 'pos'\)"),
    ([0, 1], [0.5, 1.0], r"labels are class ids but the evaluation data's are regression targets"),
    ([0.5, 1.5], ["a"], r"labels are regression targets but the evaluation data's are class names"),
])
def test_evaluation_labels_of_another_kind_are_refused(train, held_out, message):
    with pytest.raises(DataError, match=message) as info:
        prepared(held_out, prepared(train))
    assert "\n" not in str(info.value)


def test_evaluation_labels_of_the_training_kind_are_taken():
    names = prepared(["1", "cat"])  # "1" is a name here, as in the training data
    assert prepared(["1", "1"], names).labels == [0, 0]
    assert prepared(["1", "0"], prepared([0, 1, 2])).labels == [1, 0]  # CSV ids
    scores = prepared([2, 0], prepared([0.5, 1.5]))  # integers are numbers to regress too
    assert scores.labels == [2.0, 0.0] and scores.num_labels == 1


def test_string_labels_all_different_are_no_classes():
    """A text column taken for the labels built a head with one class per example."""
    texts = [f"sentence number {i}" for i in range(ALL_DISTINCT_MIN)]
    with pytest.raises(DataError, match=f"each of the {ALL_DISTINCT_MIN} examples has a label of its own "
                                        r"\(sentence number 0, sentence number 1, sentence number 2, \.\.\."):
        class_labels(texts)
    with pytest.raises(DataError, match="'name' holds no classes; name the column that does with label_column"):
        prepare_examples({"input_ids": [[5, 6]] * ALL_DISTINCT_MIN, "name": texts}, task="classification",
                         max_length=8, label_column="name")
    assert class_labels(texts[:-1])["num_labels"] == ALL_DISTINCT_MIN - 1  # a small set may be all classes
    assert class_labels(texts + texts[:1])["num_labels"] == ALL_DISTINCT_MIN  # one repeat: classes
    assert class_labels(texts, label_names=texts, min_classes=1)["labels"] == list(range(ALL_DISTINCT_MIN))
    ids = list(range(ALL_DISTINCT_MIN))  # an id column named as the labels built an 80-class head silently
    with pytest.raises(DataError, match=f"each of the {ALL_DISTINCT_MIN} examples has a label of its own "
                                        r"\(0, 1, 2, \.\.\."):
        class_labels(ids)
    assert class_labels(ids[:-1])["num_labels"] == ALL_DISTINCT_MIN - 1
    assert class_labels(ids, min_classes=1)["num_labels"] == ALL_DISTINCT_MIN  # evaluation data may


def test_default_columns_are_found_whatever_their_case(caplog):
    from autofit.columns import find_label_column as _label_column, find_text_columns as _text_columns

    columns = {"Text": ["a"], "Label": ["x"]}
    assert _text_columns(columns, None) == ("Text",) and _label_column(columns, None, "classification") == "Label"
    assert _text_columns({"Sentence1": ["a"], "sentence2": ["b"]}, None) == ("Sentence1", "sentence2")
    assert _text_columns({"text": ["a"], "TEXT": ["b"]}, None) == ("text",)  # the exact name first
    with caplog.at_level("INFO", logger="autofit"):
        assert _label_column({"text": ["a"], "label": [0], "labels": [1]}, None, "classification") == "label"
    assert "the labels are column 'label' (the data has 'labels' too" in caplog.text
