"""Fast tokenization: Rust (`tokenizers`) tokenizers, called on large batches, without padding.

Trade-off: saves tokenization time (batched Rust encoding is typically 10-100x faster than Python
tokenizers; padding is left to each batch's collator); costs nothing: the ids are the same.

The fast tokenizer itself is what `autofit.models.load_tokenizer` loads (use_fast=True, offline); this module
encodes with it, as data.prepare_examples and data.text_lengths do.
"""

from __future__ import annotations

from collections.abc import Sequence

BATCH = 1000
"""Texts per tokenizer call: a batched call runs in parallel in Rust."""


def encode_batched(tokenizer, texts: Sequence[Sequence[str]],
                   max_length: int | None) -> tuple[list[list[int]], list[list[int]] | None]:
    """(input_ids, token_type_ids or None) of each example, unpadded, truncated to `max_length` when given.

    `texts` holds one column of strings per text field (two for sentence pairs), all of the same length."""
    ids: list[list[int]] = []
    types: list[list[int]] | None = []
    for start in range(0, len(texts[0]), BATCH):
        chunk = [column[start:start + BATCH] for column in texts]
        enc = tokenizer(*chunk, truncation=max_length is not None, max_length=max_length, verbose=False)
        ids.extend(enc["input_ids"])
        if types is not None and "token_type_ids" in enc:
            types.extend(enc["token_type_ids"])
        else:
            types = None
    return ids, types
