import pytest
import torch

from autofit.techniques.padding import PaddingCollator, PaddingError


def test_pads_to_longest_rounded_to_multiple():
    batch = PaddingCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": 1},
                                             {"input_ids": [5] * 10, "labels": 0}])
    assert batch["input_ids"].shape == (2, 16)
    assert batch["input_ids"][0].tolist() == [5, 6, 7] + [0] * 13
    assert batch["attention_mask"].sum(1).tolist() == [3, 10]
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long
    exact = PaddingCollator(pad_token_id=9, pad_to_multiple_of=None)([{"input_ids": [1, 2]}, {"input_ids": [1]}])
    assert exact["input_ids"].tolist() == [[1, 2], [1, 9]] and "labels" not in exact


def test_token_labels_padded_with_ignore_index_and_type_ids_kept():
    collate = PaddingCollator(pad_token_id=0, task="token-classification")
    batch = collate([{"input_ids": [3, 4], "token_type_ids": [0, 1], "labels": [2, -100]},
                     {"input_ids": [3, 4, 5], "token_type_ids": [0, 0, 1], "labels": [1, 1, 1]}])
    assert batch["labels"].tolist() == [[2, -100] + [-100] * 6, [1, 1, 1] + [-100] * 5]
    assert batch["token_type_ids"].tolist()[1][:4] == [0, 0, 1, 0]
    with pytest.raises(PaddingError):
        collate([{"input_ids": [3, 4], "labels": [1]}])


def test_causal_lm_labels_ignore_padding_even_when_pad_is_eos():
    batch = PaddingCollator(pad_token_id=2, task="causal-lm")([{"input_ids": [5, 2]}, {"input_ids": [5, 6, 7, 2]}])
    assert batch["labels"].tolist() == [[5, 2] + [-100] * 6, [5, 6, 7, 2] + [-100] * 4]


def test_regression_labels_are_float():
    batch = PaddingCollator(pad_token_id=0)([{"input_ids": [1], "labels": 0.5}, {"input_ids": [1], "labels": 2.0}])
    assert batch["labels"].dtype == torch.float32


def test_bad_batches_raise():
    with pytest.raises(PaddingError):
        PaddingCollator(0)([])
    with pytest.raises(PaddingError):
        PaddingCollator(0)([{"text": "hi"}])


def test_padded_batch_gives_the_same_logits_as_unpadded():
    from _tiny import tiny_model

    model = tiny_model("bert").eval()
    examples = [{"input_ids": [5, 6, 7]}, {"input_ids": list(range(10, 21))}]
    batch = PaddingCollator(pad_token_id=0)(examples)
    with torch.no_grad():
        padded = model(**batch).logits
        alone = torch.cat([model(input_ids=torch.tensor([e["input_ids"]])).logits for e in examples])
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_a_decoder_classifier_is_told_the_pad_id_its_batches_use():
    """GPT2ForSequenceClassification pools the last token before config.pad_token_id: None refuses a batch,
    another id than the batches' pools a pad position."""
    from _tiny import tiny_model

    from autofit.techniques.padding import align_model_padding

    unset = tiny_model("gpt2", "classification")
    unset.config.pad_token_id = None
    assert align_model_padding(unset, 0, "classification") is None and unset.config.pad_token_id == 0
    other = tiny_model("gpt2", "classification")
    other.config.pad_token_id = 5
    note = align_model_padding(other, 0, "classification")
    assert other.config.pad_token_id == 0 and "padded with id 5" in note and "GPT2ForSequenceClassification" in note
    encoder, lm = tiny_model("bert", "classification"), tiny_model("gpt2", "causal-lm")
    encoder.config.pad_token_id, lm.config.pad_token_id = 5, 5
    assert align_model_padding(encoder, 0, "classification") is None  # its attention mask says what is padding
    assert align_model_padding(lm, 0, "causal-lm") is None
    assert (encoder.config.pad_token_id, lm.config.pad_token_id) == (5, 5)
