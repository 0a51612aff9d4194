"""LoRA adapters: the planner's parameter count equals peft's own, the base stays frozen, and a LoRA model (on
an fp32 or a 4-bit base) learns."""

import functools

import pytest
import torch

from autofit.layers import find_layout
from autofit.techniques import lora, quantization

from _tiny import random_batch, tiny_model


CASES = [("bert", "classification"), ("deberta-v2", "classification"), ("gpt2", "causal-lm"),
         ("llama", "causal-lm"), ("llama", "classification")]


@pytest.mark.parametrize("rank", [4, 8])
@pytest.mark.parametrize("targets", ["attention", "all-linear"])
@pytest.mark.parametrize("model_type,task", CASES)
def test_adapter_count_equals_peefts_own(model_type, task, targets, rank):
    model = tiny_model(model_type, task)
    shapes = [shape for _, shape in lora.target_layers(model, targets)]
    head = sum(p.numel() for p in find_layout(model).head_params) if task == "classification" else 0
    wrapped = lora.apply(model, rank=rank, targets=targets, task=task)
    adapters = sum(p.numel() for name, p in wrapped.named_parameters() if "lora_" in name)
    assert adapters == lora.adapter_numel(shapes, rank) > 0
    trainable, _ = wrapped.get_nb_trainable_parameters()
    if task == "causal-lm":
        assert trainable == adapters  # the LM head is tied to the frozen embeddings
    else:  # a classifier's new head trains in full (its pooler, for bert, stays frozen)
        classifier = sum(p.numel() for n, p in wrapped.named_parameters() if p.requires_grad and "lora_" not in n)
        assert trainable == adapters + classifier and 0 < classifier <= head


def test_attention_targets_are_the_attention_projections():
    names = [name for name, _ in lora.target_layers(tiny_model("llama", "causal-lm"), "attention")]
    assert [n.rsplit(".", 1)[1] for n in names[:4]] == ["q_proj", "k_proj", "v_proj", "o_proj"] and len(names) == 8
    gpt2 = [name for name, _ in lora.target_layers(tiny_model("gpt2", "causal-lm"), "attention")]
    assert [n.rsplit(".", 2)[1:] for n in gpt2[:2]] == [["attn", "c_attn"], ["attn", "c_proj"]]


@pytest.mark.parametrize("four_bit", [False, True])
def test_a_lora_classifier_learns_and_only_its_adapters_and_head_train(four_bit):
    torch.manual_seed(0)
    model = tiny_model("llama", "classification")
    if four_bit:
        quantization.quantize_block_linears(model)
    model = lora.apply(model, rank=8, targets="all-linear", task="classification")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    batch = random_batch(batch=8, seq=12, task="classification")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(40):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert frozen and all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def _saved_activation_bytes(model, batch) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward, weights left out."""
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**batch)
    return sum(saved.values())


@pytest.mark.parametrize("four_bit", [False, True])
@pytest.mark.parametrize("targets", ["attention", "all-linear"])
def test_saved_activations_grow_with_the_rank_as_the_memory_model_says(targets, four_bit):
    batch = random_batch(batch=3, seq=20, task="causal-lm")
    measured = {}
    for rank in (4, 12):
        model = tiny_model("llama", "causal-lm")
        num_targets = len(lora.target_layers(model, targets))
        if four_bit:
            quantization.quantize_block_linears(model)
        measured[rank] = _saved_activation_bytes(lora.apply(model, rank=rank, targets=targets, task="causal-lm"),
                                                 batch)
    tokens = 3 * 20
    assert measured[12] - measured[4] == lora.rank_activation_bytes(num_targets, tokens, 4, 12 - 4)


@functools.lru_cache(maxsize=None)
def _profile(model_type: str, task: str):
    """The profile of tiny_model(model_type, task), made once per module (the model is seeded)."""
    from autofit.profiler import profile_model

    return profile_model(tiny_model(model_type, task), task=task)


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama", "deberta-v2"])
@pytest.mark.parametrize("targets", ["attention", "all-linear"])
def test_the_profile_knows_every_layer_peft_adapts(model_type, targets):
    model = tiny_model(model_type, "classification")
    layer = next(b for b in _profile(model_type, "classification").blocks if b.kind == "layer")
    chosen = [(x.out_features, x.in_features) for x in layer.linears if lora.is_target(x.attention, targets)]
    assert lora.adapter_numel(chosen * layer.count, 8) == lora.adapter_numel(
        [shape for _, shape in lora.target_layers(model, targets)], 8)


@pytest.mark.parametrize("model_type,task", [("bert", "classification"), ("llama", "classification"),
                                             ("gpt2", "causal-lm"), ("roberta", "classification"),
                                             ("distilbert", "classification")])  # peft trains its pre_classifier
@pytest.mark.parametrize("targets", ["attention", "all-linear"])
def test_what_trains_under_lora_is_what_the_profile_predicts(model_type, task, targets):
    model = tiny_model(model_type, task)
    profile = _profile(model_type, task)
    wrapped = lora.apply(model, rank=4, targets=targets, task=task)
    trainable = sorted(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert trainable == sorted(lora.trainable_numels(profile, 4, targets))
