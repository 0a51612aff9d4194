"""Columns: where the text and the labels are in data given as a `datasets.Dataset` (or a DatasetDict's
"train" split), a dict of columns or a list of dicts. Default names match whatever their case ("Text")."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from autofit.data_files import train_split
from autofit.labels import DataError
from autofit.workload import TOKEN_LEVEL_TASKS

TEXT_PAIRS = (("text", "text_pair"), ("sentence1", "sentence2"), ("premise", "hypothesis"),
              ("question1", "question2"))
TEXT_COLUMNS = ("text", "sentence", "content")
LABEL_COLUMNS = ("label", "labels")
log = logging.getLogger("autofit")


def columns_of(data) -> dict[str, list]:
    """Column name -> values, from a datasets.Dataset, a dict of columns or a list of dicts."""
    data = _not_streamed(train_split(data))
    if hasattr(data, "column_names") and hasattr(data, "to_dict"):  # datasets.Dataset
        columns = data.to_dict()
    elif isinstance(data, Mapping):
        columns = {name: list(values) for name, values in data.items()}
    elif isinstance(data, Sequence) and not isinstance(data, str):
        if data and not all(isinstance(row, Mapping) for row in data):
            raise DataError("each example must be a dict such as {'text': ..., 'label': ...}")
        names = list(dict.fromkeys(name for row in data for name in row))
        columns = {name: [row.get(name) for row in data] for name in names}
    else:
        raise DataError(f"cannot read data of type {type(data).__name__}: "
                        "pass a datasets.Dataset, a list of dicts or a dict of columns")
    if not columns or not len(next(iter(columns.values()))):
        raise DataError("the data holds no examples")
    return columns


def _not_streamed(data):
    """`data`, unless it is a streamed datasets.IterableDataset: planning reads every length and training
    shuffles and resumes by index."""
    if type(data).__name__ in ("IterableDataset", "IterableDatasetDict"):
        raise DataError(f"cannot read a streamed {type(data).__name__}: load the data set without "
                        "streaming=True (a datasets.Dataset), or pass a list of dicts")
    return data


def column_names(data) -> list[str]:
    """The column names of `data` (a datasets.Dataset, a dict of columns, or a list of dicts), without
    reading it whole; [] for anything else (the full check happens when it is tokenized)."""
    data = _not_streamed(train_split(data))
    if hasattr(data, "column_names"):
        return list(data.column_names)
    if isinstance(data, Mapping):
        return list(data)
    if isinstance(data, Sequence) and not isinstance(data, str):
        return list(dict.fromkeys(name for row in data[:1000] if isinstance(row, Mapping) for name in row))
    return []


def column_named(names: Sequence[str], name: str) -> str | None:
    """The column `name`, or the one column that is `name` but for case ("Text", "LABEL"); None if neither."""
    if name in names:
        return name
    alike = [n for n in names if isinstance(n, str) and n.lower() == name]
    return alike[0] if len(alike) == 1 else None


def default_label_column(names: Sequence[str], *, say: bool = False) -> str | None:
    """The first LABEL_COLUMNS column the data has (any case); with `say`, a second one is named in a note."""
    found = [column_named(names, name) for name in LABEL_COLUMNS if column_named(names, name)]
    if say and len(found) > 1:
        log.info(f"the labels are column {found[0]!r} (the data has {found[1]!r} too: name the one to use with "
                 "--label-column)")
    return found[0] if found else None


def reads_token_ids(columns: dict[str, list], text_column: str | Sequence[str] | None,
                    label_column: str | None = None) -> bool:
    """Whether examples are read as their `input_ids`. A named text column is tokenized instead; text left
    unread beside the ids is said, as the ids may come from another tokenizer."""
    if "input_ids" not in columns:
        return False
    if text_column is not None:
        if all(n in columns for n in _as_names(text_column)):  # else find_text_columns names what is missing
            log.info(f"the data's input_ids are not read: its text column {_names(text_column)} is tokenized")
        return False
    labels = (default_label_column(columns), label_column)
    texts = [n for n, values in columns.items()
             if n not in labels and values and all(isinstance(v, str) for v in values)]
    if texts:
        log.info(f"trained on the data's input_ids; its text {_names(texts)} is not read (name it with "
                 "text_column / --text-column to tokenize it instead)")
    return True


def _as_names(names: str | Sequence[str]) -> tuple[str, ...]:
    """A column name or several, as a tuple."""
    return (names,) if isinstance(names, str) else tuple(names)


def _names(names: str | Sequence[str]) -> str:
    """'text', or 'question' and 'passage'."""
    return " and ".join(repr(n) for n in _as_names(names))


def find_text_columns(columns: dict[str, list], text_column: str | Sequence[str] | None,
                      label_column: str | None = None, like: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The text column or pair: `text_column` if named, else the columns `like` names (what training read, for
    evaluation data) when the data has them, else found by name. Found ones must be as many as `like`'s."""
    if text_column is None and like:
        same = tuple(column_named(list(columns), name) for name in like)
        if None not in same:
            return same
        found = find_text_columns(columns, None, label_column)
        if len(found) != len(like):
            what = {1: "one text", 2: "a pair"}
            raise DataError(f"training read {what[len(like)]} ({_names(like)}) but this data has "
                            f"{what[len(found)]} ({_names(found)}): name its text with text_column / --text-column")
        return found
    if text_column is not None:
        names = _as_names(text_column)
        if not 1 <= len(names) <= 2:
            raise DataError(f"name one text column or a pair, not {len(names)} ({_names(names)})")
        missing = [n for n in names if n not in columns]
        if missing:
            raise DataError(f"text column {_names(missing)} not found; the data has columns {sorted(columns)}")
        return names
    for pair in TEXT_PAIRS:
        found = tuple(column_named(columns, name) for name in pair)
        if None not in found:
            return found
    found = next((column_named(columns, name) for name in TEXT_COLUMNS if column_named(columns, name)), None)
    if found is not None:
        return (found,)
    strings = [n for n, values in columns.items()
               if n not in (default_label_column(columns), label_column) and all(isinstance(v, str) for v in values)]
    if len(strings) == 1:
        log.warning(f"the text is column {strings[0]!r}, the only column of strings (name it with --text-column)")
        return (strings[0],)
    raise DataError(f"cannot tell which column holds the text (columns: {sorted(columns)}); "
                    "name it with text_column / --text-column")


def find_label_column(columns: dict[str, list], label_column: str | None, task: str) -> str | None:
    if label_column is not None:
        if label_column not in columns:
            raise DataError(f"label column {label_column!r} not found; the data has columns {sorted(columns)}")
        return label_column
    found = default_label_column(columns, say=True)
    if found is None and task not in TOKEN_LEVEL_TASKS:
        raise DataError(f"no label column ('label' or 'labels') for {task}; the data has columns "
                        f"{sorted(columns)} (name it with label_column / --label-column)")
    return found
