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
    uneven = tmp_path / "uneven.json"  # read as one example before, with the label list as its label
    uneven.write_text(json.dumps({"text": ["a b", "c d", "e", "f"], "label": [1, 0]}))
    with pytest.raises(DataError, match=r"its columns hold different numbers of examples \(text 4, label 2\)$"):
        load_data_file(uneven)
    words = tmp_path / "words.jsonl"  # one token-classification example: its words and its ids differ in length
    row = {"tokens": ["Hello", "world"], "input_ids": [101, 7592, 2088, 102], "labels": [-100, 0, 0, -100]}
    words.write_text(json.dumps(row) + "\n")
    assert load_data_file(words) == [row]


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


def test_a_saved_dataset_dict_gives_evaluation_its_validation_split_never_train(tmp_path, caplog):
    """Scores on the training split reported as evaluation would be no evaluation at all."""
    datasets = pytest.importorskip("datasets")
    split = lambda texts: datasets.Dataset.from_dict({"text": texts, "label": [0] * len(texts)})  # noqa: E731
    datasets.DatasetDict({"train": split(["a", "b", "c"]), "validation": split(["v"]),
                          "test": split(["t", "u"])}).save_to_disk(str(tmp_path / "dd"))
    with caplog.at_level("INFO", logger="autofit"):
        assert load_data_file(tmp_path / "dd", evaluation=True)["text"] == ["v"]
    assert f"evaluating on the 'validation' split of {tmp_path / 'dd'}" in caplog.text
    assert load_data_file(tmp_path / "dd")["text"] == ["a", "b", "c"]
    datasets.DatasetDict({"train": split(["a"]), "test": split(["t"])}).save_to_disk(str(tmp_path / "tt"))
    assert load_data_file(tmp_path / "tt", evaluation=True)["text"] == ["t"]
    datasets.DatasetDict({"train": split(["a"]), "extra": split(["t"])}).save_to_disk(str(tmp_path / "te"))
    with pytest.raises(DataError, match=r"holds splits \['extra', 'train'\] and none to evaluate on \(validation"):
        load_data_file(tmp_path / "te", evaluation=True)


def test_json_lines_split_at_newlines_only(tmp_path):
    """json.dumps(ensure_ascii=False) writes U+2028 and U+0085 raw; str.splitlines would cut a line there."""
    rows = [{"text": "one\u2028two", "label": 0}, {"text": "three\x85four\x0cfive", "label": 1},
            {"text": "six", "label": 0}]
    path = tmp_path / "raw.jsonl"
    path.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n", encoding="utf-8")
    assert load_data_file(path) == rows
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n{bad\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 4 is not valid JSON"):  # numbered as an editor numbers lines
        load_data_file(path)


def test_a_pretty_printed_json_object_and_pandas_default_to_json_are_read(tmp_path):
    columns = {"text": ["a cat", "a dog"], "label": [1, 0]}
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps(columns, indent=2))
    assert load_data_file(pretty) == columns
    indexed = tmp_path / "indexed.json"  # pandas' DataFrame.to_json() default: columns keyed by row index
    indexed.write_text(json.dumps({"text": {"0": "a cat", "1": "a dog"}, "label": {"0": 1, "1": 0}}, indent=1))
    assert load_data_file(indexed) == columns
    one = tmp_path / "one.json"  # one example, pretty-printed
    one.write_text(json.dumps({"text": "a cat", "label": 1}, indent=2))
    assert load_data_file(one) == [{"text": "a cat", "label": 1}]
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "text": ["a cat"],\n  "label": [1\n}\n')
    with pytest.raises(DataError, match=r"broken.json: invalid JSON \(Expecting ',' delimiter at line 4\)"):
        load_data_file(broken)


def test_tsv_is_read_and_a_csv_of_other_separators_is_named(tmp_path):
    tsv = tmp_path / "d.tsv"
    tsv.write_text("text\tlabel\na cat, sat\tpos\na dog\tneg\n")
    assert load_data_file(tsv) == [{"text": "a cat, sat", "label": "pos"}, {"text": "a dog", "label": "neg"}]
    for mark, name in ((";", "';'"), ("\t", "tabs")):
        path = tmp_path / "semi.csv"
        path.write_text(f"text{mark}label\na cat{mark}pos\n")
        with pytest.raises(DataError) as info:
            load_data_file(path)
        assert (f"the header {'text' + mark + 'label'!r} is one column: its values look separated by {name}; "
                "save it separated by commas") in str(info.value)
    (tmp_path / "one.csv").write_text("text\na cat\n")  # one column, no other separator: fine
    assert load_data_file(tmp_path / "one.csv") == [{"text": "a cat"}]
