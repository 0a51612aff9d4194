"""Fast tokenization: Rust (`tokenizers`) tokenizers, called on large batches, without padding.

Trade-off: saves tokenization time (batched Rust encoding is typically 10-100x faster than Python
tokenizers; padding is left to each batch's collator); costs nothing: the ids are the same.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast


class TokenizationError(ValueError):
    """Texts that cannot be tokenized (not strings, mismatched pairs, bad sizes)."""


def is_fast(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "is_fast", False))


def ensure_fast(tokenizer: PreTrainedTokenizerBase, *, strict: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer's Rust counterpart: loaded offline from its own directory when it has one, else
    converted in memory. Where none exists the slow tokenizer is kept with a warning (`strict` raises)."""
    if is_fast(tokenizer):
        return tokenizer
    fast = _load_fast(tokenizer) or _convert(tokenizer)
    if fast is None:
        message = f"{type(tokenizer).__name__} has no fast (Rust) counterpart; tokenization stays slow"
        if strict:
            raise TokenizationError(message)
        warnings.warn(message, stacklevel=2)
        return tokenizer
    warnings.warn(f"replaced slow {type(tokenizer).__name__} with fast {type(fast).__name__}", stacklevel=2)
    return fast


def _load_fast(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerFast | None:
    if not tokenizer.name_or_path:
        return None
    try:
        fast = AutoTokenizer.from_pretrained(tokenizer.name_or_path, use_fast=True, local_files_only=True)
    except Exception:  # not a local directory or cached hub id: try converting instead
        return None
    return fast if is_fast(fast) else None


def _convert(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerFast | None:
    from transformers.convert_slow_tokenizer import SLOW_TO_FAST_CONVERTERS

    name = type(tokenizer).__name__
    # transformers 5 keeps a few python tokenizers as "<Name>Legacy"; they convert like <Name>.
    converter = SLOW_TO_FAST_CONVERTERS.get(name) or SLOW_TO_FAST_CONVERTERS.get(name.removesuffix("Legacy"))
    if converter is None:
        return None
    try:
        backend = converter(tokenizer).converted()
    except Exception:  # a converter needing a missing file or library (sentencepiece, protobuf)
        return None
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=tokenizer.model_max_length,
                                   padding_side=tokenizer.padding_side, **tokenizer.special_tokens_map)


def _chunks(texts: Sequence[str], text_pair: Sequence[str] | None, batch_size: int) -> Iterator[tuple]:
    if batch_size < 1:
        raise TokenizationError(f"batch_size must be >= 1, not {batch_size}")
    if text_pair is not None and len(text_pair) != len(texts):
        raise TokenizationError(f"{len(texts)} texts but {len(text_pair)} paired texts")
    for name, column in (("texts", texts), ("text_pair", text_pair or [])):
        bad = next((i for i, t in enumerate(column) if not isinstance(t, str)), None)
        if bad is not None:
            raise TokenizationError(f"{name}[{bad}] is {type(column[bad]).__name__}, not a string")
    for start in range(0, len(texts), batch_size):
        pair = None if text_pair is None else list(text_pair[start:start + batch_size])
        yield list(texts[start:start + batch_size]), pair


def encode_examples(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, *,
                    text_pair: Sequence[str] | None = None, max_length: int, batch_size: int = 1000,
                    token_type_ids: bool | None = None) -> list[dict[str, list[int]]]:
    """Tokenize in batches (truncated to `max_length`, unpadded) into collator-ready examples with
    input_ids, and token_type_ids when the tokenizer's model takes them (BERT-style text pairs; None
    asks `tokenizer.model_input_names`)."""
    wants_types = "token_type_ids" in tokenizer.model_input_names if token_type_ids is None else token_type_ids
    examples: list[dict[str, list[int]]] = []
    for chunk, pair in _chunks(texts, text_pair, batch_size):
        encoded = tokenizer(chunk, pair, truncation=True, max_length=max_length, padding=False,
                            return_attention_mask=False, return_token_type_ids=wants_types)
        if wants_types:
            examples += [{"input_ids": ids, "token_type_ids": types}
                         for ids, types in zip(encoded["input_ids"], encoded["token_type_ids"])]
        else:
            examples += [{"input_ids": ids} for ids in encoded["input_ids"]]
    return examples


def tokenize(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, *, text_pair: Sequence[str] | None = None,
             max_length: int, batch_size: int = 1000) -> list[list[int]]:
    """Token ids of each text (or pair), truncated to `max_length`, unpadded (padding is per batch)."""
    return [ex["input_ids"] for ex in encode_examples(texts, tokenizer, text_pair=text_pair,
                                                      max_length=max_length, batch_size=batch_size)]


def token_lengths(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, *,
                  text_pair: Sequence[str] | None = None, max_length: int, batch_size: int = 1000) -> list[int]:
    """Token length of each example: the data's length distribution the planner needs."""
    return [len(ids) for ids in tokenize(texts, tokenizer, text_pair=text_pair, max_length=max_length,
                                         batch_size=batch_size)]
