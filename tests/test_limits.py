"""What a model's config allows (autofit/limits.py): depth and sizes, and the sequence length it takes."""

import pytest
from transformers import CONFIG_MAPPING, PretrainedConfig

from autofit.limits import DEFAULT_SEQ_LEN, SeqLenError, check_config, check_seq_len, max_sequence_length, usable_length
from autofit.models import resolve_config

from _tiny import short_config

TINY_BERT = short_config("bert")


def _tiny(spec: dict, **overrides):
    return CONFIG_MAPPING["bert"](**spec | overrides)


@pytest.mark.parametrize("model_type, overrides, usable", [
    ("roberta", dict(max_position_embeddings=514, pad_token_id=1), 512),  # positions start after padding_idx
    ("bert", dict(max_position_embeddings=512), 512),
    ("gpt2", dict(n_positions=1024), 1024),
])
def test_max_sequence_length_knows_position_offsets(model_type, overrides, usable):
    assert max_sequence_length(CONFIG_MAPPING[model_type](**overrides)) == usable



# --- sequence length --------------------------------------------------------------------------------------

XLM_R_520 = dict(max_position_embeddings=520, pad_token_id=1)  # 518 usable positions: not a multiple of 8


@pytest.mark.parametrize("limit, multiple, usable", [
    (518, 8, 512), (518, None, 518), (518, 1, 518), (512, 8, 512), (1024, 64, 1024), (100, 64, 64), (4, 8, 0),
])
def test_usable_length_keeps_padding_within_the_limit(limit, multiple, usable):
    assert usable_length(limit, multiple) == usable
    if usable:
        assert -(-usable // (multiple or 1)) * (multiple or 1) <= limit  # padded up, it still fits


def test_usable_length_refuses_nonsense():
    with pytest.raises(ValueError):
        usable_length(0, 8)
    with pytest.raises(ValueError):
        usable_length(512, 0)


def test_check_seq_len_defaults_to_512_cut_to_the_model():
    assert check_seq_len(resolve_config("bert-base-uncased")[1], None, explicit=False) == DEFAULT_SEQ_LEN == 512
    assert check_seq_len(_tiny(TINY_BERT), None, explicit=False) == 64
    assert check_seq_len(CONFIG_MAPPING["xlm-roberta"](**XLM_R_520), None, explicit=False) == 512
    assert check_seq_len(CONFIG_MAPPING["xlm-roberta"](**XLM_R_520), None, explicit=False, multiple=8) == 512
    assert check_seq_len(CONFIG_MAPPING["roberta"](max_position_embeddings=260, pad_token_id=1), None,
                         explicit=False, multiple=8) == 256  # 258 usable positions would pad to 264


def test_check_seq_len_without_a_position_limit():
    config = PretrainedConfig()  # no max_position_embeddings or n_positions: no limit to check against
    assert check_seq_len(config, None, explicit=False) == 512
    assert check_seq_len(config, 100_000, explicit=True) == 100_000


def test_an_explicit_length_past_the_model_is_a_one_line_error():
    _, bert = resolve_config("bert-base-uncased")
    assert check_seq_len(bert, 512, explicit=True) == 512
    with pytest.raises(SeqLenError) as error:
        check_seq_len(bert, 4096, explicit=True)
    assert str(error.value) == "--seq-len 4096 is longer than bert-base-uncased takes (512 positions)"
    assert isinstance(error.value, ValueError)
    assert check_seq_len(bert, 4096, explicit=False) == 512  # a default is cut, not refused


def test_padding_can_make_the_last_positions_unusable():
    xlmr = CONFIG_MAPPING["xlm-roberta"](**XLM_R_520)
    assert check_seq_len(xlmr, 518, explicit=True) == 518
    with pytest.raises(SeqLenError, match=r"^seq_len 518 is longer than xlm-roberta takes "
                                          r"\(518 positions; 512 when padded to a multiple of 8\)$"):
        check_seq_len(xlmr, 518, explicit=True, multiple=8, flag="seq_len")
    assert check_seq_len(xlmr, 518, explicit=False, multiple=8) == 512


@pytest.mark.parametrize("seq_len", [0, -5])
def test_a_length_below_one_is_refused(seq_len):
    with pytest.raises(SeqLenError, match=f"--seq-len must be at least 1, got {seq_len}"):
        check_seq_len(_tiny(TINY_BERT), seq_len, explicit=True)


@pytest.mark.parametrize("field, value", [("hidden_size", -32), ("vocab_size", 0), ("num_hidden_layers", 10**6)])
def test_configs_no_transformer_has_are_refused(field, value):
    from transformers import BertConfig

    with pytest.raises(ValueError, match=field.replace("num_hidden_layers", "layers").split("_")[0]):
        check_config(BertConfig(**{field: value}))


@pytest.mark.parametrize("model_type", ["bart", "t5"])
def test_encoder_decoder_models_are_refused_by_name(model_type):
    # they passed the layout and failed inside the fake-tensor profiler (aten.unique_consecutive)
    with pytest.raises(ValueError, match=f"{model_type} is an encoder-decoder model"):
        check_config(CONFIG_MAPPING[model_type]())
