"""What a model's config allows: a depth and sizes a transformer can have, and the sequence length it takes
(its position embeddings, less what padding to a multiple would push past them). Pure: configs in, numbers
or one-line errors out."""

from __future__ import annotations

from transformers import PretrainedConfig

from autofit.intmath import is_whole

MAX_LAYERS = 1024
"""No transformer has more layers (the deepest public ones have ~120); a config claiming more is broken, and
planning it would search a space that large."""


SIZES = ("hidden_size", "vocab_size", "num_attention_heads", "intermediate_size", "max_position_embeddings")
"""Config sizes that must be positive when given: no model has an empty vocabulary or a negative width."""


def check_config(config: PretrainedConfig) -> PretrainedConfig:
    """`config`, or a ValueError naming what autofit does not plan (an encoder-decoder) or no real transformer
    has (a depth beyond MAX_LAYERS, a size that is not positive)."""
    if getattr(config, "is_encoder_decoder", False):  # two layer stacks and cross-attention: no layout maps them
        raise ValueError(f"{config.model_type} is an encoder-decoder model: autofit plans encoders (bert, deberta, "
                         "...) and decoders (gpt2, llama, ...)")
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and not 1 <= layers <= MAX_LAYERS:
        raise ValueError(f"the config says {layers} layers: autofit plans transformers of 1 to {MAX_LAYERS} layers")
    for name in SIZES:
        value = getattr(config, name, None)
        if isinstance(value, int) and value < 1:
            raise ValueError(f"the config's {name} is {value}: it must be at least 1")
    return config


POSITION_OFFSET_MODELS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text")
"""Models whose position ids start after the padding index: max_position_embeddings - pad_token_id - 1
positions are usable (RoBERTa's 514 give 512)."""


def max_sequence_length(config: PretrainedConfig) -> int | None:
    """The longest sequence the model's position embeddings take, or None when they set no limit."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and config.model_type in POSITION_OFFSET_MODELS:
        limit -= (getattr(config, "pad_token_id", None) or 0) + 1
    return limit


DEFAULT_SEQ_LEN = 512
"""The length planned for when the user gives none (cut to the model's positions)."""


class SeqLenError(ValueError):
    """A sequence length the model cannot take: longer than its positions, or below 1."""


def usable_length(limit: int, multiple: int | None) -> int:
    """The longest length whose padding up to a multiple of `multiple` stays within `limit` positions:
    `limit` rounded down to a multiple (unchanged when `multiple` is None or 1; 0 when it exceeds `limit`).
    XLM-R's 518 positions padded to multiples of 8 take 512 tokens: 518 would pad to 520."""
    if limit < 1 or (multiple is not None and multiple < 1):
        raise ValueError(f"usable_length needs limit >= 1 and multiple >= 1, got {limit} and {multiple}")
    return limit if not multiple else limit // multiple * multiple


def check_seq_len(config: PretrainedConfig, seq_len: int | None, *, explicit: bool, multiple: int | None = None,
                  flag: str = "--seq-len") -> int:
    """The sequence length to plan for on `config`'s model.

    None: DEFAULT_SEQ_LEN, cut to the model's usable positions. A length the user chose (`explicit`) that
    is longer than the model takes is a SeqLenError naming the limit; a default one is cut to the limit.
    With `multiple` (the padding multiple), the limit is `usable_length(positions, multiple)`. `flag` names
    the value in errors ("--seq-len" for the CLI, "seq_len" for the API)."""
    positions = max_sequence_length(config)
    limit = None if positions is None else usable_length(positions, multiple)
    if seq_len is not None and not is_whole(seq_len):
        raise SeqLenError(f"{flag} must be a whole number, not {seq_len!r}")
    if seq_len is not None and seq_len < 1:
        raise SeqLenError(f"{flag} must be at least 1, got {seq_len}")
    if limit is not None and limit < 1:
        raise SeqLenError(f"{_name(config)} has {positions} positions, fewer than one padding multiple ({multiple})")
    if seq_len is None:
        seq_len, explicit = DEFAULT_SEQ_LEN, False
    if limit is None or seq_len <= limit:
        return seq_len
    if not explicit:
        return limit
    padded = f"; {limit} when padded to a multiple of {multiple}" if limit != positions else ""
    raise SeqLenError(f"{flag} {seq_len} is longer than {_name(config)} takes ({positions} positions{padded})")


def _name(config: PretrainedConfig) -> str:
    return getattr(config, "name_or_path", "") or config.model_type
