"""Sequence-level labels: read what the data's labels ask for (classification or regression), check it,
and say in one sentence what was inferred and why (`label_note`), since the choice changes the model's head.

- Strings are class names, numbered in sorted order; but a column of number strings (CSV gives numbers so)
  holds integers or floats, as it would in JSON ("1" and "cat" together are two names; "--1", "²" are names).
- Integers are class ids 0..K-1: K = largest + 1, and at least 2, because HF builds a 1-output REGRESSION
  head for num_labels=1. Ids far above the number of distinct labels are refused: label 10**6 would build a
  million-output head before anything else could complain.
- Floats (or a mix of floats and integers) are regression targets: 1 output, MSE loss.
- Evaluation data's labels must be of the training data's kind (class names, class ids, regression targets):
  else its ids would silently mean other classes. Integers may be regression targets.

DataError lives here, beside the label checks, and `autofit.data` re-exports it: data imports labels, so
labels cannot import data.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

MIN_MAX_CLASS_ID = 1000
"""Integer labels up to this many classes are taken as they come; above it, only when the classes are
not too sparse (at most 10 ids per distinct label)."""


NAMES, IDS, REGRESSION = "class names", "class ids", "regression targets"
"""The kinds of sequence-level labels (`label_kind`)."""
_INTEGER = re.compile(r"[+-]?\d+", re.ASCII)  # ASCII: "²" passes str.isdigit() but is no number to int()
_NUMBER = re.compile(r"[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?|inf(?:inity)?|nan)", re.ASCII | re.IGNORECASE)
"""What float() reads, less its underscores and non-ASCII digits; with nan and inf, so that the regression
check names them rather than their column turning into class names."""


ALL_DISTINCT_MIN = 20
"""Training data of at least this many examples whose string labels are all different is refused: those are
texts or ids, not classes (a head with one class per example)."""


class DataError(ValueError):
    """Data that cannot be read or trained on, with a one-line reason."""


def class_labels(values: list, *, min_classes: int = 2, label_names: Sequence[str] | None = None,
                 model_names: Sequence[str] | None = None, train_kind: str | None = None,
                 column: str | None = None) -> dict[str, Any]:
    """labels, num_labels, label_names (string classes) and label_note of sequence-level labels.

    `min_classes`: fewest distinct classes the data must hold (training: 2; evaluation data may hold 1).
    `label_names`: the training data's class names, so that string labels of evaluation data get the same ids.
    `model_names`: the class names the model's config gives its ids (`config_label_names`): training data's
    string labels that are all among them keep those ids, so the trained head answers in the model's names.
    `train_kind`: the training data's `label_kind`, which evaluation data's labels must share. `column`: the
    labels' column, named in errors about the column as a whole."""
    missing = next((i for i, v in enumerate(values) if v is None or v == ""), None)
    if missing is not None:
        raise DataError(f"example {missing} has no label")
    kind, taken = _kind(values, label_names)
    expected = NAMES if label_names is not None else train_kind
    if expected == REGRESSION and kind == IDS:
        kind, taken = REGRESSION, [float(v) for v in taken]  # integers are numbers to regress too
    if expected not in (None, kind):
        odd = next((i for i, v in enumerate(values) if label_names is None or v not in label_names), 0)
        names = f" ({_preview(label_names)})" if label_names is not None else ""
        raise DataError(f"the training data's labels are {expected}{names} but the evaluation data's are {kind} "
                        f"(example {odd} has label {short_repr(values[odd])}): give both the same kind of labels")
    if kind == NAMES:
        return _string_classes(taken, min_classes, label_names, model_names, column)
    return _integer_classes(taken, min_classes, column) if kind == IDS else _regression(taken)


def label_kind(prepared: Any) -> str | None:
    """NAMES, IDS or REGRESSION: the kind of labels prepared data (`data.TokenizedData`) holds; None when
    they are not sequence-level labels."""
    if prepared.num_labels is None:
        return None
    return NAMES if prepared.label_names is not None else REGRESSION if prepared.num_labels == 1 else IDS


def _kind(values: list, label_names: Sequence[str] | None) -> tuple[str, list]:
    """(NAMES, IDS or REGRESSION, the labels as that kind takes them)."""
    if all(isinstance(v, str) for v in values):
        if label_names is not None and set(values) <= set(label_names):
            return NAMES, values  # the training data's names, number strings or not
        if all(_INTEGER.fullmatch(v.strip()) for v in values):
            return IDS, [int(v) for v in values]
        if all(_NUMBER.fullmatch(v.strip()) for v in values):
            return REGRESSION, [float(v) for v in values]
        return NAMES, values
    if all(isinstance(v, bool | int) for v in values):
        return IDS, [int(v) for v in values]
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return REGRESSION, values
    odd = next((i for i, v in enumerate(values) if type(v) is not type(values[0])), None)
    where = f"; example {odd} has {short_repr(values[odd])}" if odd is not None else ""
    raise DataError(f"labels must be all strings, all integers or all numbers: example 0 has "
                    f"{short_repr(values[0])}{where}")


def _string_classes(values: list[str], min_classes: int, label_names: Sequence[str] | None,
                    model_names: Sequence[str] | None, column: str | None = None) -> dict[str, Any]:
    _check_enough_classes(values, min_classes)
    numbered = ""
    if label_names is not None:
        names = list(label_names)
    elif model_names and set(values) <= set(model_names):
        names, numbered = list(model_names), ", numbered as the model's config numbers them"
    else:
        names = sorted(set(values))
        if len(values) >= ALL_DISTINCT_MIN and len(names) == len(values):  # a text column taken for the labels
            raise DataError(f"each of the {len(values)} examples has a label of its own ({_preview(values, 3)}): "
                            f"{column or 'the label column'} holds no classes; name the column that does with "
                            "label_column / --label-column")
    ids = {name: i for i, name in enumerate(names)}
    unknown = next((i for i, v in enumerate(values) if v not in ids), None)
    if unknown is not None:
        raise DataError(f"example {unknown} has label {values[unknown]!r}, which is not one of the training "
                        f"data's classes ({_preview(names)})")
    num_labels = max(len(names), 2)  # one name (evaluation data) still means a classification head
    return dict(labels=[ids[v] for v in values], num_labels=num_labels, label_names=names,
                label_note=f"{num_labels} classes from string labels ({_preview(names)}){numbered}")


def class_label_names(data: Any) -> dict[str, list[str]]:
    """Column -> class names of a `datasets.Dataset`'s ClassLabel columns (ids 0..K-1 by their names)."""
    features = getattr(data, "features", None) or {}
    return {name: list(feature.names) for name, feature in features.items()
            if type(feature).__name__ == "ClassLabel" and feature.names}


def named_ids(values: list, names: Sequence[str]) -> list:
    """A ClassLabel column's ids as its names (anything else, such as -1 for "no label", as it is)."""
    return [names[v] if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(names) else v
            for v in values]


def config_label_names(config: Any) -> list[str] | None:
    """The class names a model's config gives ids 0..K-1 (`id2label`), or None when they are transformers'
    placeholders (LABEL_0, LABEL_1, ...) or not a full numbering."""
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    names = [id2label.get(i) for i in range(len(id2label))]
    if not names or None in names or len(set(names)) < len(names):
        return None
    return None if names == [f"LABEL_{i}" for i in range(len(names))] else names


def _integer_classes(ids: list[int], min_classes: int, column: str | None = None) -> dict[str, Any]:
    if min(ids) < 0:
        raise DataError(f"class labels must be >= 0, found {min(ids)}")
    _check_enough_classes(ids, min_classes)
    distinct = sorted(set(ids))
    if min_classes > 1 and len(ids) >= ALL_DISTINCT_MIN and len(distinct) == len(ids):  # an id column, say
        raise DataError(f"each of the {len(ids)} examples has a label of its own ({_preview(distinct, 3)}): "
                        f"{column or 'the label column'} holds no classes (numbers to regress are given as floats); "
                        "name the column that does with label_column / --label-column")
    largest = distinct[-1]
    if largest + 1 > max(MIN_MAX_CLASS_ID, 10 * len(distinct)):
        raise DataError(f"the largest label is {largest} but there are only {len(distinct)} distinct labels: "
                        f"integer labels are class ids 0..K-1, so this would build a {largest + 1}-class head; "
                        f"renumber the classes 0..{len(distinct) - 1}")
    num_labels = max(largest + 1, 2)
    if distinct == list(range(num_labels)):
        note = f"{num_labels} classes from integer labels 0-{largest}"
    else:
        note = f"{num_labels} classes (ids 0-{num_labels - 1}) from integer labels {_preview(distinct)}"
    return dict(labels=ids, num_labels=num_labels, label_note=note)


def _regression(values: list[int | float]) -> dict[str, Any]:
    bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
    if bad is not None:
        raise DataError(f"example {bad} has label {values[bad]!r}: regression labels must be finite numbers")
    distinct = sorted(set(values))
    note = f"labels are floats ({_preview(distinct)}): regression with 1 output and MSE loss"
    if all(float(v).is_integer() and v >= 0 for v in distinct) and len(distinct) >= 2:
        note += f"; write them as integers for {int(distinct[-1]) + 1}-class classification"
    # HF heads with num_labels=1 compute MSE against float labels.
    return dict(labels=[float(v) for v in values], num_labels=1, label_note=note)


def _check_enough_classes(values: list, min_classes: int) -> None:
    distinct = set(values)
    if len(distinct) >= min_classes:
        return
    if len(distinct) == 1:
        who = f"all {len(values)} examples have" if len(values) > 1 else "the one example has"
        raise DataError(f"{who} label {values[0]!r}: classification needs at least {_count(min_classes)} classes")
    raise DataError(f"the labels hold {len(distinct)} classes ({_preview(sorted(distinct))}): classification "
                    f"here needs at least {min_classes}")


def _count(n: int) -> str:
    return {2: "two", 3: "three"}.get(n, str(n))


def _preview(values: Sequence, limit: int = 6) -> str:
    """"a, b, c" for a few values; the first few and the total for many."""
    shown = ", ".join(str(v) if str(v).isprintable() else repr(v) for v in values[:limit])
    return shown if len(values) <= limit else f"{shown}, ... ({len(values)} in all)"


def short_repr(value: Any, limit: int = 40) -> str:
    """repr(value), cut to `limit` characters: one line of an error, whatever the data holds."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
