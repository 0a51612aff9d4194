"""Data files: read a CSV or TSV, JSON or JSON-lines file, or a `datasets.save_to_disk` directory, into rows.

Errors name the file and the place in it (a line number, a byte offset), in one line.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import sys
from pathlib import Path

from autofit.labels import DataError

log = logging.getLogger("autofit")


EVAL_SPLITS = ("validation", "valid", "val", "eval", "evaluation", "dev", "test")
"""A DatasetDict's splits that evaluation data may be, in the order they are looked for."""


def read_data(data, *, evaluation: bool = False):
    """`data` as the API takes it: a path (str or os.PathLike) is read as the CLI reads --data (--eval-data
    with `evaluation`); anything else is returned as it is."""
    return load_data_file(data, evaluation=evaluation) if isinstance(data, str | os.PathLike) else data


def load_data_file(path: str | Path, *, evaluation: bool = False):
    """Rows of a CSV/TSV or JSON-lines/JSON file as a list of dicts (a JSON object of columns as that dict),
    or a `datasets.save_to_disk` directory as a `datasets.Dataset`: for training its "train" split when it
    holds several, for `evaluation` its validation (or test) split."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if path.is_dir():
        rows = _load_saved_dataset(path, evaluation)
    elif suffix in (".csv", ".tsv"):
        rows = _load_csv(path, "\t" if suffix == ".tsv" else ",")
    elif suffix in (".jsonl", ".json"):
        rows = _load_json(path)
    else:
        raise DataError(f"unknown data format {path.suffix or path.name!r}: use .csv, .tsv, .jsonl, .json "
                        "or a directory saved by datasets.save_to_disk")
    if len(rows) == 0:
        raise DataError(f"{path} holds no examples")
    return rows


def _read_text(path: Path) -> str:
    """The file as UTF-8 text (a leading byte-order mark dropped, as spreadsheets write one); decoded whole
    so that an error can give the byte offset in the file."""
    data = path.read_bytes()
    start = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = start + e.start
        raise DataError(f"{path}: not UTF-8 text (byte 0x{data[offset]:02x} at offset {offset}); "
                        "save the file as UTF-8") from None


def _load_csv(path: Path, delimiter: str) -> list[dict]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter)
    header = reader.fieldnames or []
    other = next((mark for mark in (";", "\t", "|", ",") if mark != delimiter and len(header) == 1
                  and mark in header[0]), None)
    if other is not None:  # one column named "text;label": the file is separated by something else
        shown = {"\t": "tabs", ",": "commas"}.get(other, f"{other!r}")
        raise DataError(f"{path}: the header {header[0]!r} is one column: its values look separated by {shown}; "
                        "save it separated by commas (.csv) or tabs (.tsv)")
    twice = next((name for i, name in enumerate(header) if name in header[:i]), None)
    if twice is not None:  # DictReader would keep the last copy's values without a word
        raise DataError(f"{path}: the header names column {twice!r} more than once; rename or drop the copies")
    rows = []
    for row in reader:
        if None in row:  # DictReader files the extra values under the key None
            quote = "commas" if delimiter == "," else "tabs"
            raise DataError(f"{path}: line {reader.line_num} has more values than the header has columns "
                            f"({len(header)}); quote values that hold {quote}")
        rows.append(row)
    return rows


class _DuplicateKey(ValueError):
    """A JSON object that names a key twice: json.loads would keep the last value without a word."""


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    twice = next((key for i, key in enumerate(keys) if key in keys[:i]), None)
    if twice is not None:
        raise _DuplicateKey(twice)
    return dict(pairs)


def _parse_json(text: str):
    return json.loads(text, object_pairs_hook=_no_duplicate_keys)


def _load_json(path: Path) -> list[dict]:
    text = _read_text(path)
    rows = None
    try:
        if text.lstrip()[:1] in ("[", "{"):  # one JSON document, or JSON lines (the first line an array/object)
            try:
                rows = _parse_json(text)
            except json.JSONDecodeError as e:
                if e.msg != "Extra data":  # JSON lines fail with "Extra data" at the second line
                    raise DataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
        if rows is None:  # JSON lines: split at newlines only (str.splitlines also splits at U+2028, U+0085 ...)
            rows = [_json_line(path, number, line) for number, line in enumerate(text.split("\n"), start=1)
                    if line.strip()]
    except _DuplicateKey as e:
        raise DataError(f"{path}: an example names the key {e.args[0]!r} more than once; keep one") from None
    if isinstance(rows, dict):
        rows = [rows]  # one object: one example, or columns
    if len(rows) == 1 and _indexed_columns(rows[0]):
        return {name: list(values.values()) for name, values in rows[0].items()}
    if len(rows) == 1 and _holds_columns(rows[0]):
        return rows[0]  # {"text": [...], "label": [...]}, as pandas' to_json(orient="list") writes
    if len(rows) == 1 and _uneven_columns(rows[0]):
        sizes = ", ".join(f"{name} {len(values)}" for name, values in rows[0].items())
        raise DataError(f"{path}: its columns hold different numbers of examples ({sizes})")
    bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None) if isinstance(rows, list) else 0
    if bad is not None:
        raise DataError(f"{path}: every example must be a JSON object such as {{\"text\": ..., \"label\": ...}}; "
                        f"example {bad} is not")
    return rows


def _indexed_columns(row: object) -> bool:
    """{"text": {"0": ..., "1": ...}, "label": {"0": ..., ...}}, as pandas' DataFrame.to_json writes by default:
    columns keyed by the same row index."""
    if not isinstance(row, dict) or not row or not all(isinstance(v, dict) and v for v in row.values()):
        return False
    index = [list(v) for v in row.values()]
    return all(keys == index[0] for keys in index)


def _json_line(path: Path, number: int, line: str):
    try:
        return _parse_json(line)
    except _DuplicateKey as e:
        raise DataError(f"{path}: line {number} names the key {e.args[0]!r} more than once; keep one") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {number} is not valid JSON ({e.msg})") from None


def _holds_columns(row: object) -> bool:
    """A lone JSON object of equally long lists, one of them of strings or of lists: columns, not one example
    (an example's text is a string, its token ids are numbers)."""
    if not isinstance(row, dict) or not row or not all(isinstance(v, list) for v in row.values()):
        return False
    return len({len(v) for v in row.values()}) == 1 and any(v and isinstance(v[0], str | list) for v in row.values())


def _uneven_columns(row: object) -> bool:
    """A lone object of lists of different lengths, one of them of several strings: columns that do not line
    up (an example would hold one text, not a list of them)."""
    if not isinstance(row, dict) or len(row) < 2 or not all(isinstance(v, list) for v in row.values()):
        return False
    if "input_ids" in row:  # one pre-tokenized example: its words and its token ids differ in length
        return False
    return any(len(v) > 1 and all(isinstance(x, str) for x in v) for v in row.values())


def _load_saved_dataset(path: Path, evaluation: bool):
    try:
        import datasets
    except ImportError:
        raise DataError("reading a saved dataset directory needs the `datasets` package "
                        "(pip install 'autofit[data]')") from None
    try:
        data = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(f"{path} is a directory but not one saved by datasets.save_to_disk") from None
    return eval_split(data, str(path)) if evaluation else train_split(data, str(path))


def is_dataset_dict(data) -> bool:
    """A `datasets.DatasetDict`: splits, not columns."""
    datasets = sys.modules.get("datasets")  # not imported: data is no DatasetDict
    return datasets is not None and isinstance(data, datasets.DatasetDict)


def train_split(data, where: str = "the DatasetDict"):
    """A `datasets.DatasetDict`'s "train" split (other data as it is): its splits are not columns."""
    if not is_dataset_dict(data):
        return data
    if "train" not in data:
        raise DataError(f"{where} holds splits {sorted(data)} and no 'train' split: pass a single split")
    return data["train"]


def eval_split(data, where: str = "the DatasetDict"):
    """A `datasets.DatasetDict`'s split to evaluate on (the first of EVAL_SPLITS it holds, with a note), other
    data as it is. Never its "train" split: scores on the training data are no evaluation."""
    if not is_dataset_dict(data):
        return data
    name = next((name for name in EVAL_SPLITS if name in data), None)
    if name is None:
        raise DataError(f"{where} holds splits {sorted(data)} and none to evaluate on ({', '.join(EVAL_SPLITS)}): "
                        "pass a single split")
    log.info(f"evaluating on the {name!r} split of {where}")
    return data[name]
