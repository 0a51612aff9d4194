import importlib.util
from pathlib import Path

import pytest
from torch import nn
from transformers import CONFIG_MAPPING, AutoModelForSequenceClassification

from autofit.knobs import Knobs
from autofit.layers import UnmappableModelError, find_layout
from autofit.techniques import freeze

_spec = importlib.util.spec_from_file_location("_tiny_models", Path(__file__).parent / "techniques" / "_tiny.py")
_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tiny)
TINY, tiny_model, random_batch = _tiny.TINY, _tiny.tiny_model, _tiny.random_batch

LAYERS_PATH = {"bert": "bert.encoder.layer", "roberta": "roberta.encoder.layer",
               "electra": "electra.encoder.layer", "distilbert": "distilbert.transformer.layer",
               "deberta-v2": "deberta.encoder.layer", "gpt2": "transformer.h", "llama": "model.layers"}
NARROW_ELECTRA = dict(embedding_size=16)
"""ELECTRA-small style: embeddings narrower than the layers, widened by `electra.embeddings_project`."""


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_every_parameter_lands_in_exactly_one_part(model_type):
    model = tiny_model(model_type)
    layout = find_layout(model)
    assert layout.layers_path == LAYERS_PATH[model_type]
    assert layout.num_layers == 2
    ids = [id(p) for p in layout.embedding_params] + [id(p) for p in layout.layers.parameters()]
    ids += [id(p) for p in layout.head_params]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert model.get_input_embeddings().weight in layout.embedding_params


def test_tied_lm_head_is_counted_once_as_embedding():
    model = tiny_model("gpt2", "causal-lm")
    layout = find_layout(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert all(p is not model.lm_head.weight for p in layout.head_params)
    assert {id(m) for m in layout.embedding_modules} == {id(model.transformer.wte), id(model.transformer.wpe)}


def test_electra_projection_after_the_embeddings_belongs_to_them():
    model = tiny_model("electra", **NARROW_ELECTRA)
    layout = find_layout(model)
    project = model.electra.embeddings_project
    assert any(m is project for m in layout.embedding_modules)
    assert {id(p) for p in project.parameters()} <= {id(p) for p in layout.embedding_params}
    assert {id(p) for p in layout.head_params} == {id(p) for p in model.classifier.parameters()}


def test_albert_mapping_into_the_hidden_size_belongs_to_the_embeddings():
    """ALBERT is not in the catalog; its `embedding_hidden_mapping_in` sits in the encoder, beside its
    (shared) layer group, and must neither break the layout nor stay trainable under frozen embeddings."""
    config = CONFIG_MAPPING["albert"](embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, vocab_size=100)
    model = AutoModelForSequenceClassification.from_config(config)
    layout = find_layout(model)
    mapping = model.albert.encoder.embedding_hidden_mapping_in
    assert {id(p) for p in mapping.parameters()} <= {id(p) for p in layout.embedding_params}
    freeze.apply(model, Knobs(freeze_embeddings=True))
    assert not any(p.requires_grad for p in mapping.parameters())
    model(**random_batch()).loss.backward()


class _EmbedOutLM(nn.Module):
    """GPT-NeoX as transformers < 5 built it: the LM head is named `embed_out`."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_in = nn.Embedding(100, 8)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.embed_out = nn.Linear(8, 100)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_in

    def get_output_embeddings(self) -> nn.Module:
        return self.embed_out


def test_an_output_embedding_named_embed_stays_in_the_head():
    model = _EmbedOutLM()
    layout = find_layout(model)
    assert [id(p) for p in layout.head_params] == [id(p) for p in model.embed_out.parameters()]
    assert [id(p) for p in layout.embedding_params] == [id(model.embed_in.weight)]


def test_model_without_layer_stack_is_a_clear_error():
    with pytest.raises(UnmappableModelError, match="stack of transformer layers"):
        find_layout(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)))
