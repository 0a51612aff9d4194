import pytest
import torch
from torch import nn
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoModelForSequenceClassification

from autofit.layers import UnmappableModelError, find_layout

TINY = {
    "bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100),
    "roberta": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    vocab_size=100),
    "electra": dict(hidden_size=32, embedding_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, vocab_size=100),
    "distilbert": dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=100),
    "deberta-v2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       vocab_size=100, relative_attention=True, position_buckets=16, pos_att_type=["p2c", "c2p"]),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, vocab_size=100),
    "llama": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=64, vocab_size=100),
}
LAYERS_PATH = {"bert": "bert.encoder.layer", "roberta": "roberta.encoder.layer",
               "electra": "electra.encoder.layer", "distilbert": "distilbert.transformer.layer",
               "deberta-v2": "deberta.encoder.layer", "gpt2": "transformer.h", "llama": "model.layers"}


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_every_parameter_lands_in_exactly_one_part(model_type):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(CONFIG_MAPPING[model_type](**TINY[model_type]))
    layout = find_layout(model)
    assert layout.layers_path == LAYERS_PATH[model_type]
    assert layout.num_layers == 2
    ids = [id(p) for p in layout.embedding_params] + [id(p) for p in layout.layers.parameters()]
    ids += [id(p) for p in layout.head_params]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert model.get_input_embeddings().weight in layout.embedding_params


def test_tied_lm_head_is_counted_once_as_embedding():
    model = AutoModelForCausalLM.from_config(CONFIG_MAPPING["gpt2"](**TINY["gpt2"]))
    layout = find_layout(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert all(p is not model.lm_head.weight for p in layout.head_params)
    assert {id(m) for m in layout.embedding_modules} == {id(model.transformer.wte), id(model.transformer.wpe)}


def test_model_without_layer_stack_is_a_clear_error():
    with pytest.raises(UnmappableModelError, match="stack of transformer layers"):
        find_layout(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)))
