"""Dynamic padding: each batch is padded only to its own longest sequence, not to a global max length.

Trade-off: saves the compute and activation memory spent on pad tokens (a lot for short, varied texts);
costs nothing but varying tensor shapes (rounding lengths to a multiple of 8 keeps tensor cores busy).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from autofit.techniques.loss_weighting import IGNORE_INDEX
from autofit.workload import TOKEN_LEVEL_TASKS
from autofit.techniques.bucketing import padded_length

SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids")


class PaddingError(ValueError):
    """A batch that cannot be padded (empty, no input_ids, token labels of the wrong length)."""


def align_model_padding(model: Any, pad_token_id: int, task: str) -> str | None:
    """A decoder's sequence classifier (GPT2, Llama, ... ForSequenceClassification) pools each row's last
    token, found by `config.pad_token_id`: that must be the id the batches are padded with, or it pools a
    pad position (a different id) or refuses a batch (None). Sets it; returns a note when it replaced one."""
    from autofit.models import default_task  # the model layer, only for this check

    config = getattr(model, "config", None)
    if task != "classification" or config is None or default_task(config) != "causal-lm":
        return None
    before = getattr(config, "pad_token_id", None)
    if before == pad_token_id:
        return None
    config.pad_token_id = pad_token_id
    if before is None:
        return None
    return (f"the model's config padded with id {before} and the batches are padded with {pad_token_id}: the "
            f"config now says {pad_token_id}, as {type(model).__name__} finds each row's last token by it")


class PaddingCollator:
    """Collate tokenized examples into right-padded tensors: input_ids, attention_mask, labels (and
    token_type_ids when the examples have them).

    Token-level labels are padded with `label_pad_id` so pad positions add nothing to the loss. For
    causal-lm examples without labels, labels are the input ids with pad positions ignored."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = 8, label_pad_id: int = IGNORE_INDEX,
                 task: str = "classification"):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.label_pad_id = label_pad_id
        self.task = task

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise PaddingError("cannot collate an empty batch")
        if any("input_ids" not in f for f in features):
            raise PaddingError("every example needs input_ids (tokenize before collating)")
        rows = [list(map(int, f["input_ids"])) for f in features]
        width = padded_length(max(len(r) for r in rows), self.pad_to_multiple_of)
        batch = {"input_ids": self._pad(rows, width, self.pad_token_id)}
        batch["attention_mask"] = self._pad([f.get("attention_mask", [1] * len(r)) for f, r in zip(features, rows)],
                                            width, 0)
        if all("token_type_ids" in f for f in features):
            batch["token_type_ids"] = self._pad([f["token_type_ids"] for f in features], width, 0)
        labels = self._labels(features, rows, width, batch["attention_mask"])
        if labels is not None:
            batch["labels"] = labels
        return batch

    def _labels(self, features, rows, width: int, attention_mask: torch.Tensor) -> torch.Tensor | None:
        if self.task not in TOKEN_LEVEL_TASKS:
            if "labels" not in features[0]:
                return None
            return torch.tensor([f["labels"] for f in features])  # int -> long (classes), float -> regression
        if "labels" not in features[0]:
            if self.task != "causal-lm":
                raise PaddingError(f"{self.task} examples need token labels")
            labels = self._pad(rows, width, self.label_pad_id)
            return labels.masked_fill(attention_mask == 0, self.label_pad_id)  # pad may equal eos (gpt2)
        label_rows = [list(f["labels"]) for f in features]
        if any(len(lab) != len(r) for lab, r in zip(label_rows, rows)):
            raise PaddingError("token labels must have one entry per input token")
        return self._pad(label_rows, width, self.label_pad_id)

    @staticmethod
    def _pad(rows: Sequence[Sequence[int]], width: int, value: int) -> torch.Tensor:
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, :len(row)] = torch.as_tensor(list(row), dtype=torch.long)
        return out
