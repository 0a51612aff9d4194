"""4-bit base weights: the predicted NF4 bytes equal the bytes of real bitsandbytes tensors, and a quantized
model still runs forward and backward on the CPU with its embeddings and head untouched."""

import pytest
import torch

from autofit.layers import block_linears, linear_shape
from autofit.techniques import quantization as q

from _tiny import random_batch, tiny_model

bnb = pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(64, 32), (3072, 768), (5, 7), (1000, 333), (512, 8192)])
def test_nf4_bytes_equal_a_real_params4bit(shape, double_quant):
    layer = bnb.nn.Linear4bit(shape[1], shape[0], bias=False, compress_statistics=double_quant, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(shape), requires_grad=False, compress_statistics=double_quant,
                                     quant_type="nf4")
    layer = layer.to("cpu")  # quantizes
    assert layer.weight.dtype == torch.uint8
    assert q.stored_bytes(layer) == q.nf4_bytes(shape[0] * shape[1], double_quant=double_quant)


def test_nf4_is_about_half_a_byte_per_weight():
    n = 4096 * 4096
    assert 0.56 < q.nf4_bytes(n, double_quant=False) / n < 0.57  # 0.5 + 4/64
    assert 0.51 < q.nf4_bytes(n, double_quant=True) / n < 0.52  # 0.5 + 1/64 + 4/(64*256)
    assert q.weight_bytes(n, "bf16") == 2 * n and q.weight_bytes(n, "fp32") == 4 * n


@pytest.mark.parametrize("model_type,task", [("llama", "causal-lm"), ("bert", "classification"),
                                             ("gpt2", "causal-lm")])
def test_quantized_blocks_store_what_was_predicted_and_still_train(model_type, task):
    model = tiny_model(model_type, task)
    shapes = {name: linear_shape(module) for name, module in block_linears(model)}
    outside = {name: p.clone() for name, p in model.named_parameters() if ".h." not in name and "layer" not in name}
    assert q.quantize_block_linears(model, double_quant=True) == len(shapes) > 0
    for name, (out_features, in_features) in shapes.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, bnb.nn.Linear4bit)
        bias = layer.bias.numel() * 4 if layer.bias is not None else 0
        assert q.stored_bytes(layer) == q.nf4_bytes(out_features * in_features, double_quant=True) + bias
    for name, p in model.named_parameters():  # embeddings, norms outside the blocks, the head: as they were
        if name in outside:
            assert p.dtype == torch.float32 and torch.equal(p, outside[name])
    loss = model(**random_batch(task=task)).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert q.quantize_block_linears(model) == 0  # already quantized: nothing left to do


@pytest.mark.parametrize("model_type,task", [("llama", "causal-lm"), ("bert", "classification"),
                                             ("gpt2", "causal-lm")])
def test_a_quantized_model_weighs_what_its_profile_predicts(model_type, task):
    from autofit.profiler import profile_model

    model = tiny_model(model_type, task)
    profile = profile_model(model, task=task)
    assert q.stored_bytes(model) == q.base_weight_bytes(profile, "fp32")
    q.quantize_block_linears(model, double_quant=False)
    assert q.stored_bytes(model) == q.base_weight_bytes(profile, "nf4", double_quant=False)
