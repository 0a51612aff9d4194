"""Pre-tokenized columns: each value a list of integers in range, or a one-line error naming the column
and the example."""

from __future__ import annotations

import numpy as np
import pytest

from autofit.data import DataError, prepare_examples, text_lengths


def tokens(column: str, bad_row, task: str = "classification") -> dict:
    """Two examples of three tokens, the second's `column` replaced by `bad_row`."""
    good = {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "token_type_ids": [0, 0, 1],
            "labels": [1, 2, 3]}
    data = {name: [good[name], bad_row if name == column else good[name]] for name in good}
    if task == "classification":
        data.pop("labels")
        data["label"] = [0, 1]
    return data


@pytest.mark.parametrize("column, bad_row, message", [
    ("input_ids", ["2563", 6, 7], "example 1 has '2563' (str) in input_ids: input_ids must be a list of integers"),
    ("input_ids", [5, 3.0, 7], "example 1 has 3.0 (float) in input_ids: input_ids must be a list of integers"),
    ("input_ids", [5, True, 7], "example 1 has True (bool) in input_ids: input_ids must be a list of integers"),
    ("input_ids", [5, [6], 7], "example 1 has [6] (list) in input_ids: input_ids must be a list of integers"),
    ("input_ids", [5, None, 7], "example 1 has None (NoneType) in input_ids: input_ids must be a list"),
    ("input_ids", None, "example 1 has no input_ids: input_ids must be a list of integers"),
    ("input_ids", "5 6 7", "example 1 has input_ids '5 6 7': input_ids must be a list of integers"),
    ("input_ids", [5, -1, 7], "example 1 has -1 in input_ids: token ids must be >= 0 (-100 is for labels)"),
    ("attention_mask", ["1", "1", "0"], "example 1 has '1' (str) in attention_mask: attention_mask must be"),
    ("attention_mask", [1, 2, 1], "example 1 has 2 in attention_mask: a mask holds only 0s and 1s"),
    ("attention_mask", [1, 1, -1], "example 1 has -1 in attention_mask: a mask holds only 0s and 1s"),
    ("attention_mask", [True, True, False], "example 1 has True (bool) in attention_mask"),
    ("token_type_ids", [0, -1, 0], "example 1 has -1 in token_type_ids: segment ids must be >= 0"),
    ("token_type_ids", [0, 0.0, 1], "example 1 has 0.0 (float) in token_type_ids"),
])
def test_bad_token_columns_are_one_line_errors_naming_column_and_example(column, bad_row, message):
    with pytest.raises(DataError) as info:
        prepare_examples(tokens(column, bad_row), task="classification", max_length=8)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_the_planners_lengths_check_the_token_columns_too():
    with pytest.raises(DataError, match="example 1 has '2563' \\(str\\) in input_ids"):
        text_lengths(tokens("input_ids", ["2563", 6, 7]), None)


def test_token_labels_must_be_integers_and_may_be_minus_100():
    with pytest.raises(DataError, match="example 1 has 2.5 \\(float\\) in labels: labels must be a list"):
        prepare_examples(tokens("labels", [1, 2.5, 3], "token-classification"), task="token-classification",
                         max_length=8)
    out = prepare_examples(tokens("labels", [-100, 2, -100], "token-classification"), task="token-classification",
                           max_length=8)
    assert out.labels == [[1, 2, 3], [-100, 2, -100]]


def test_long_rows_are_cut_in_the_error():
    with pytest.raises(DataError) as info:
        prepare_examples(tokens("input_ids", "x" * 500), task="classification", max_length=8)
    assert len(str(info.value)) < 120


def test_numpy_and_tuple_rows_become_python_int_lists():
    data = {"input_ids": [np.array([5, 6, 7]), (8, 9)], "attention_mask": [np.ones(3, dtype=np.int64), [1, 1]],
            "token_type_ids": [[np.int64(0)] * 3, [0, 1]], "label": [0, 1]}
    out = prepare_examples(data, task="classification", max_length=8)
    assert out.input_ids == [[5, 6, 7], [8, 9]] and out.token_type_ids == [[0, 0, 0], [0, 1]]
    assert all(type(v) is int for row in out.input_ids + out.token_type_ids for v in row)
    with pytest.raises(DataError, match=r"example 0 has 5.0 \(float\) in input_ids"):
        prepare_examples({"input_ids": [np.array([5.0, 6.0])], "label": [0]}, task="classification",
                         max_length=8, min_classes=1)
