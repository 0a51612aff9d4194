"""Data files: CSV, JSON, JSON lines and saved datasets read into rows; one-line errors naming the place."""

from __future__ import annotations

import json

import pytest

from autofit.data import DataError
from autofit.data_files import load_data_file



def test_reads_csv_jsonl_and_json_array(tmp_path):
    rows = [{"text": "a cat", "label": "pos"}, {"text": "a dog", "label": "neg"}]
    (tmp_path / "d.csv").write_text("text,label\na cat,pos\na dog,neg\n")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    for name in ("d.csv", "d.jsonl", "d.json"):
        assert load_data_file(tmp_path / name) == rows


def test_reads_a_saved_dataset_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["x", "y"], "label": [0, 1]}).save_to_disk(str(tmp_path / "ds"))
    data = load_data_file(tmp_path / "ds")
    assert data.column_names == ["text", "label"] and len(data) == 2
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": ["x"]})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="no 'train' split"):
        load_data_file(tmp_path / "dd")


@pytest.mark.parametrize("name, content, message", [
    ("missing.csv", None, "not found"),
    ("data.parquet", "x", "unknown data format"),
    ("empty.jsonl", "\n", "holds no examples"),
    ("empty.csv", "text,label\n", "holds no examples"),
    ("bad.jsonl", '{"text": "a"}\n{oops\n', "line 2 is not valid JSON"),
    ("list.jsonl", '["a", 1]\n', "must be a JSON object"),
])
def test_file_errors_are_one_line_data_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        load_data_file(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["latin1.csv", "latin1.jsonl", "latin1.json"])
def test_a_file_that_is_not_utf8_is_named_with_the_offset(tmp_path, name):
    path = tmp_path / name
    text = '[{"text": "caf\u00e9", "label": 0}]' if name.endswith(".json") else \
        "text,label\ncaf\u00e9,0\n" if name.endswith(".csv") else '{"text": "caf\u00e9", "label": 0}\n'
    path.write_bytes(text.encode("latin-1"))
    offset = text.index("\u00e9")
    with pytest.raises(DataError) as info:
        load_data_file(path)
    assert str(info.value) == f"{path}: not UTF-8 text (byte 0xe9 at offset {offset}); save the file as UTF-8"


def test_a_utf8_byte_order_mark_is_dropped(tmp_path):
    (tmp_path / "bom.csv").write_bytes("text,label\ncaf\u00e9,0\n".encode("utf-8-sig"))
    assert load_data_file(tmp_path / "bom.csv") == [{"text": "caf\u00e9", "label": "0"}]
    (tmp_path / "bad.csv").write_bytes(b"\xef\xbb\xbftext\n\xff\n")
    with pytest.raises(DataError, match="byte 0xff at offset 8"):  # offsets count the mark
        load_data_file(tmp_path / "bad.csv")


def test_a_plain_directory_is_not_a_dataset(tmp_path):
    pytest.importorskip("datasets")
    with pytest.raises(DataError, match="not one saved by datasets.save_to_disk"):
        load_data_file(tmp_path)


def test_a_csv_header_naming_a_column_twice_is_refused(tmp_path):
    """csv.DictReader would keep the last copy's values without a word."""
    path = tmp_path / "twice.csv"
    path.write_text("text,label,label\na cat,pos,neg\n")
    with pytest.raises(DataError) as info:
        load_data_file(path)
    assert str(info.value) == f"{path}: the header names column 'label' more than once; rename or drop the copies"


def test_a_csv_row_with_more_values_than_the_header_is_named_by_line(tmp_path):
    path = tmp_path / "commas.csv"
    path.write_text('text,label\n"a, quoted cat",pos\na cat, unquoted,neg\n')
    with pytest.raises(DataError, match=r"commas.csv: line 3 has more values than the header has columns \(2\)"):
        load_data_file(path)
    path.write_text('text,label\n"a, quoted cat",pos\n')
    assert load_data_file(path) == [{"text": "a, quoted cat", "label": "pos"}]


def test_a_json_object_of_columns_is_read_as_columns_not_one_example(tmp_path):
    path = tmp_path / "cols.json"
    path.write_text(json.dumps({"text": ["a b", "c d", "e"], "label": [0, 1, 0]}))
    assert load_data_file(path) == {"text": ["a b", "c d", "e"], "label": [0, 1, 0]}
    one = tmp_path / "one.jsonl"  # one pre-tokenized token-classification example: lists of numbers
    one.write_text(json.dumps({"input_ids": [5, 6, 7], "labels": [0, 1, 0]}) + "\n")
    assert load_data_file(one) == [{"input_ids": [5, 6, 7], "labels": [0, 1, 0]}]


def test_a_json_example_naming_a_key_twice_is_refused(tmp_path):
    """json.loads would keep the last value without a word: the text or label trained on would be a guess."""
    lines = tmp_path / "twice.jsonl"
    lines.write_text('{"text": "a cat", "label": 0}\n{"text": "a dog", "label": 1, "label": 0}\n')
    with pytest.raises(DataError) as info:
        load_data_file(lines)
    assert str(info.value) == f"{lines}: line 2 names the key 'label' more than once; keep one"
    array = tmp_path / "twice.json"
    array.write_text('[{"text": "a cat", "label": 0}, {"text": "a dog", "text": "a cow", "label": 1}]')
    with pytest.raises(DataError, match="names the key 'text' more than once"):
        load_data_file(array)
    nested = tmp_path / "nested.jsonl"  # keys of a nested object are that object's own
    nested.write_text('{"text": "a cat", "label": 0, "meta": {"label": 1}}\n')
    assert load_data_file(nested) == [{"text": "a cat", "label": 0, "meta": {"label": 1}}]
