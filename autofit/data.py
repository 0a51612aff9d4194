"""Data intake: tokenize the text and label columns (found by columns.py; files are read by data_files.py), and
hand the executor plain token-id lists (`TokenizedData`) and the planner a length distribution (`text_lengths`).

Accepted data: a `datasets.Dataset` (or a `DatasetDict`'s "train" split), a list of dicts (or a dict of
columns), or already tokenized examples (`input_ids` present; pads an `attention_mask` marks at either end
are dropped). Texts are one column, or a pair (`text`+`text_pair`, `sentence1`+`sentence2`,
`premise`+`hypothesis`, `question1`+`question2`). Sequences longer than `max_length` are truncated and
counted (`num_truncated`); with `truncation=False` they are an error instead.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel

from autofit.columns import (columns_of, default_label_column, find_label_column, find_text_columns,
                             reads_token_ids)
from autofit.data_files import train_split
from autofit.labels import NAMES, DataError, class_label_names, class_labels, named_ids, short_repr
from autofit.techniques.loss_weighting import IGNORE_INDEX
from autofit.techniques.tokenization import encode_batched
from autofit.workload import TOKEN_LEVEL_TASKS

TOKEN_RANGES = {"input_ids": (0, None, "token ids must be >= 0 (-100 is for labels)"),
                "token_type_ids": (0, None, "segment ids must be >= 0"),
                "attention_mask": (0, 1, "a mask holds only 0s and 1s")}
"""(least, greatest or None, why) of the values of pre-tokenized columns (ids past the model's vocabulary are
refused where the model is known: executor/validate.py)."""
log = logging.getLogger("autofit")


class TokenizedData(BaseModel):
    """Tokenized examples ready for the collator: one entry per example in each list."""

    task: str
    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None = None
    labels: list[int] | list[float] | list[list[int]] | None = None
    """Class ids (classification), floats (regression), token labels, or None (causal LM: the inputs)."""
    num_labels: int | None = None
    label_names: list[str] | None = None
    """Original label of each class id, when the data's labels were strings."""
    label_note: str | None = None
    """One sentence on the task the labels asked for and why, e.g. "3 classes from integer labels 0-2" or
    "labels are floats (0.0, 1.0): regression with 1 output and MSE loss; ..."; None without class labels."""
    num_truncated: int = 0
    text_columns: tuple[str, ...] | None = None
    """The column (or pair) its texts were read from; None for examples given as token ids. Evaluation data
    is read from the same ones."""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    def example(self, index: int) -> dict[str, Any]:
        """One example as the collator takes it."""
        row: dict[str, Any] = {"input_ids": self.input_ids[index]}
        if self.token_type_ids is not None:
            row["token_type_ids"] = self.token_type_ids[index]
        if self.labels is not None:
            row["labels"] = self.labels[index]
        return row


def min_tokens(task: str) -> int:
    """Tokens an example needs for anything to be learnt from it: one, or for a causal LM two (a next token
    to predict)."""
    return 2 if task == "causal-lm" else 1


def without_untrainable(data: TokenizedData) -> tuple[TokenizedData, int]:
    """(`data` less the examples nothing can be learnt from, how many went): no tokens (an empty text under a
    tokenizer that adds none), for a causal LM a single one (no next token to predict: a step of only such
    examples would log a loss of 0 and update nothing), or token labels all -100 (none is scored)."""
    least = min_tokens(data.task)
    keep = [i for i, ids in enumerate(data.input_ids) if len(ids) >= least and _scores_a_token(data, i)]
    if len(keep) == len(data):
        return data, 0
    if not keep:
        raise DataError(f"no example has {least} or more tokens with a label to predict: there is nothing to "
                        "train on")
    pick = lambda column: None if column is None else [column[i] for i in keep]  # noqa: E731
    return data.model_copy(update=dict(input_ids=pick(data.input_ids), token_type_ids=pick(data.token_type_ids),
                                       labels=pick(data.labels))), len(data) - len(keep)


def _scores_a_token(data: TokenizedData, i: int) -> bool:
    """Example i has a token label the loss counts (always, without token labels). A causal LM predicts
    token t from those before it: its first label is never scored."""
    if data.labels is None or data.task not in TOKEN_LEVEL_TASKS:
        return True
    scored = data.labels[i][1:] if data.task == "causal-lm" else data.labels[i]
    return any(label != IGNORE_INDEX for label in scored)


# ---- tokenizing -------------------------------------------------------------------------------------------


def prepare_examples(data, tokenizer=None, *, task: str, max_length: int | None,
                     text_column: str | Sequence[str] | None = None, label_column: str | None = None,
                     truncation: bool = True, min_classes: int = 2,
                     label_names: Sequence[str] | None = None, model_names: Sequence[str] | None = None,
                     train_kind: str | None = None, train_text_columns: tuple[str, ...] | None = None) -> TokenizedData:
    """Tokenize `data` for `task` ("classification", "causal-lm", "token-classification").

    Sequences longer than `max_length` (the smaller of the user's limit and the model's positions) are
    truncated and counted in `num_truncated`; with `truncation=False` they raise DataError instead.
    Class labels must hold at least `min_classes` classes: 2 for training data; evaluation data may pass 1,
    and the training data's `label_names` so that its string labels get the same class ids. String labels
    that are all among `model_names` (the model config's, labels.config_label_names) keep the model's ids.
    Evaluation data passes `train_kind`, the training data's `label_kind`: its labels must be of that kind, and
    `train_text_columns`, the columns training read its texts from: read them when it has them, and a pair
    where training read one text (or the reverse) is refused."""
    label_rules = dict(min_classes=min_classes, label_names=label_names, model_names=model_names,
                       train_kind=train_kind, class_names=class_label_names(train_split(data)))
    columns = columns_of(data)
    ids_only = task == "token-classification" and "input_ids" in columns  # its labels are per token id
    if ids_only or reads_token_ids(columns, text_column, label_column):
        return _from_token_ids(columns, task, max_length, label_column, truncation, label_rules)
    if task == "token-classification":
        raise DataError("token-classification needs pre-tokenized examples with input_ids and token labels")
    names = find_text_columns(columns, text_column, label_column, like=train_text_columns)
    if tokenizer is None:
        raise DataError("text data needs a tokenizer (or pass examples that already hold input_ids)")
    texts = [_texts(columns, name) for name in names]
    ids, types, truncated = _encode(tokenizer, texts, max_length, truncation)
    fields = dict(task=task, input_ids=ids, token_type_ids=types, num_truncated=truncated, text_columns=tuple(names))
    label = find_label_column(columns, label_column, task)
    if task not in TOKEN_LEVEL_TASKS:
        fields.update(_sequence_labels(columns[label], label, label_rules))
    return TokenizedData.model_construct(**fields)  # built and checked here: skip re-validating every id


def text_lengths(data, tokenizer, text_column: str | Sequence[str] | None = None,
                 max_length: int | None = None, label_column: str | None = None) -> list[int]:
    """Token length of every example (with special tokens), capped at `max_length`: the planner's input."""
    columns = columns_of(data)
    if reads_token_ids(columns, text_column, label_column):
        lengths = [len(ids) for ids in _unpadded(columns, [])["input_ids"]]
    else:
        texts = [_texts(columns, name) for name in find_text_columns(columns, text_column, label_column)]
        lengths = [len(ids) for ids in _encode(tokenizer, texts, None, True)[0]]
    return [min(n, max_length) for n in lengths] if max_length else lengths


def _texts(columns: dict[str, list], name: str) -> list[str]:
    values = columns[name]
    bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
    if bad is not None:
        raise DataError(f"example {bad} has no text in column {name!r} (found {values[bad]!r})")
    blank = sum(not v.strip() for v in values)
    if blank == len(values):
        raise DataError(f"every text in column {name!r} is empty: there is nothing to learn from")
    if blank:  # kept: with a tokenizer's special tokens they still make an input (without any, they are left out)
        log.info(f"{blank} example{'s' * (blank != 1)} of {len(values)} {'have' if blank != 1 else 'has'} an "
                 f"empty text in column {name!r}")
    return values


def _encode(tokenizer, texts: list[list[str]], max_length: int | None,
            truncation: bool) -> tuple[list[list[int]], list[list[int]] | None, int]:
    """(input_ids, token_type_ids or None, number truncated). Tokenizes untruncated first so that what
    truncation cuts is counted, then re-tokenizes only the too-long examples with truncation."""
    ids, types = encode_batched(tokenizer, texts, None)
    _check_texts_were_read(texts, ids)
    too_long = [i for i, row in enumerate(ids) if max_length is not None and len(row) > max_length]
    if too_long and not truncation:
        raise DataError(f"{len(too_long)} examples are longer than max_length={max_length} tokens "
                        f"(the longest has {max(len(ids[i]) for i in too_long)}); enable truncation "
                        "or raise --max-length up to the model's limit")
    if too_long:
        longest = [[column[i] for i in too_long] for column in texts]
        cut_ids, cut_types = encode_batched(tokenizer, longest, max_length)
        for j, i in enumerate(too_long):
            ids[i] = cut_ids[j]
            if types is not None:
                types[i] = cut_types[j]
    return ids, types, len(too_long)


def _check_texts_were_read(texts: list[list[str]], ids: list[list[int]]) -> None:
    """Different texts that all tokenize to the same ids: the tokenizer reads none of their words (one that
    does not match the model, or whose vocabulary misses every word), and nothing could be learnt."""
    if any(row != ids[0] for row in ids):  # the usual case, settled at the first two rows
        return
    rows = {tuple(" ".join(text.lower().split()) for text in row) for row in zip(*texts)}  # uncased tokenizers
    if len(rows) > 2:
        raise DataError(f"all {len(ids)} examples tokenize to the same ids {ids[0][:8]} although their texts "
                        "differ: the tokenizer does not read their words (check that it is the model's)")


def _from_token_ids(columns: dict[str, list], task: str, max_length: int | None, label_column: str | None,
                    truncation: bool, label_rules: dict[str, Any]) -> TokenizedData:
    """Examples that already hold input_ids (and maybe token_type_ids, attention_mask and labels)."""
    label = find_label_column(columns, label_column, task)
    if task in TOKEN_LEVEL_TASKS and label is None and task != "causal-lm":
        raise DataError(f"{task} examples need token labels; the data has columns {sorted(columns)}")
    columns = _unpadded(columns, [label] if task in TOKEN_LEVEL_TASKS and label else [])
    ids = columns["input_ids"]
    empty = next((i for i, row in enumerate(ids) if not row), None)
    if empty is not None:
        raise DataError(f"example {empty} has empty input_ids")
    too_long = [i for i, row in enumerate(ids) if max_length is not None and len(row) > max_length]
    if too_long and not truncation:
        raise DataError(f"{len(too_long)} examples are longer than max_length={max_length} tokens "
                        f"(the longest has {max(len(ids[i]) for i in too_long)}); enable truncation")
    cut = (lambda row: list(row)[:max_length]) if max_length else list
    types = [cut(row) for row in columns["token_type_ids"]] if "token_type_ids" in columns else None
    fields = dict(task=task, input_ids=[cut(row) for row in ids], token_type_ids=types,
                  num_truncated=len(too_long))
    if task not in TOKEN_LEVEL_TASKS:
        fields.update(_sequence_labels(columns[label], label, label_rules))
    elif label is not None:
        fields["labels"] = [cut(row) for row in columns[label]]
        if task == "token-classification":
            fields["num_labels"] = _token_classes(fields["labels"], label)
    return TokenizedData.model_construct(**fields)


def _token_classes(rows: list[list], column: str) -> int:
    """How many classes token-classification labels name: class ids from 0, -100 on tokens not scored."""
    values = {v for row in rows for v in row}
    bad = next((v for v in values if isinstance(v, bool) or not isinstance(v, numbers.Integral)
                or (v < 0 and v != IGNORE_INDEX)), None)
    if bad is not None:
        raise DataError(f"token labels ({column!r}) must be class ids from 0, or -100 on tokens not scored; "
                        f"found {bad!r}")
    scored = values - {IGNORE_INDEX}
    if not scored:
        raise DataError(f"no token has a label ({column!r} holds only -100): there is nothing to train on")
    return max(2, int(max(scored)) + 1)


def class_count(data, label_column: str | None = None) -> int | None:
    """How many outputs a classifier trained on `data` needs (classes; 1 for numbers to regress), read from
    its label column as training reads it; None without one."""
    if isinstance(data, TokenizedData):  # already prepared: it knows
        return data.num_labels
    columns = columns_of(data)
    label = label_column if label_column is not None else default_label_column(list(columns))
    if label not in columns:
        return None
    rules = dict(min_classes=2, label_names=None, model_names=None, train_kind=None,
                 class_names=class_label_names(train_split(data)))
    return _sequence_labels(columns[label], label, rules)["num_labels"]


def _sequence_labels(values: list, column: str, rules: dict[str, Any]) -> dict[str, Any]:
    """class_labels of a label column. A datasets ClassLabel column's ids are its names' (so the trained model's
    id2label names them), unless the training labels were plain ids."""
    rules = dict(rules)
    names = rules.pop("class_names").get(column)
    values = _plain(values)
    if names is not None and rules["train_kind"] in (None, NAMES):
        values = named_ids(values, names)
        rules["label_names"] = rules["label_names"] or names
    return class_labels(values, **rules, column=repr(column))


def _unpadded(columns: dict[str, list], labels: list[str]) -> dict[str, list]:
    """Token columns (and token `labels`) cut to each attention_mask's 1s, else pads are trained on."""
    names = [n for n in ("input_ids", "token_type_ids", "attention_mask", *labels) if n in columns]
    columns = {**columns, **{n: _integer_rows(columns[n], n) for n in names}}
    for i, ids in enumerate(columns["input_ids"]):
        bad = next((n for n in names if len(columns[n][i]) != len(ids)), None)
        if bad is not None:
            raise DataError(f"example {i}: {bad} has {len(columns[bad][i])} entries but input_ids has {len(ids)}")
    if "attention_mask" not in columns:
        return columns
    spans = [_attended(i, mask) for i, mask in enumerate(columns["attention_mask"])]
    return {**columns, **{n: [list(row)[a:b] for row, (a, b) in zip(columns[n], spans)] for n in names}}


def _integer_rows(rows: list, name: str) -> list[list[int]]:
    """A token column as lists of Python ints, its values in TOKEN_RANGES. Strings, floats and bools are
    refused, not passed through int(): "2563", 3.7 or True as a token id is a mistake upstream."""
    least, greatest, why = TOKEN_RANGES.get(name, (None, None, ""))
    checked = []
    for i, row in enumerate(rows):
        row = row.tolist() if hasattr(row, "tolist") else row  # numpy arrays, tensors
        if not isinstance(row, list | tuple):
            found = f"{name} {short_repr(row)}" if row is not None else f"no {name}"
            raise DataError(f"example {i} has {found}: {name} must be a list of integers")
        bad = next((j for j, v in enumerate(row) if isinstance(v, bool) or not isinstance(v, int | np.integer)), None)
        if bad is not None:
            raise DataError(f"example {i} has {short_repr(row[bad])} ({type(row[bad]).__name__}) in {name}: {name} "
                            "must be a list of integers")
        row = [int(v) for v in row]  # numpy integers too
        out = _out_of_range(row, least, greatest)
        if out is not None:
            raise DataError(f"example {i} has {out} in {name}: {why}")
        checked.append(row)
    return checked


def _out_of_range(row: list[int], least: int | None, greatest: int | None) -> int | None:
    """The value of `row` below `least` or above `greatest` (None: no bound), or None."""
    if row and least is not None and min(row) < least:
        return min(row)
    if row and greatest is not None and max(row) > greatest:
        return max(row)
    return None


def _attended(index: int, mask) -> tuple[int, int]:
    """Where an attention_mask's one run of 1s starts and ends: pads at either end go, holes cannot."""
    ones = [j for j, m in enumerate(mask) if m]
    if not ones:
        raise DataError(f"example {index} has an attention_mask of all 0s: it has no tokens to train on")
    if ones[-1] + 1 - ones[0] != len(ones):
        raise DataError(f"example {index} has 0s between 1s in its attention_mask: only padding at either end "
                        "can be dropped")
    return ones[0], ones[-1] + 1


def _plain(values: list) -> list:
    """Numpy scalars (labels from an array) as the Python numbers they hold, which the label rules know."""
    return [v.item() if isinstance(v, np.generic) else v for v in values]
