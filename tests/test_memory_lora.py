"""The memory and time models under LoRA: what the base, the adapters and the head's copy weigh equals the real
peft model's tensors (fp32, half and 4-bit bases); the rank moves saved bytes by the measured slope; the time
model skips the base's weight gradients."""

import functools

import pytest
import torch

from autofit.cost import block_passes, micro_batch_seconds
from autofit.devices import get_device
from autofit.knobs import Knobs
from autofit.memory import param_state, predict_step_peak
from autofit.profiler import profile_model
from autofit.techniques import lora, quantization

from _profiles import make_profile
from _tiny import tiny_model


CASES = [("bert", "classification"), ("llama", "causal-lm"), ("gpt2", "causal-lm"), ("llama", "classification")]
BASES = [("fp32", "fp32"), ("bf16", "bf16"), ("nf4", "fp32"), ("nf4", "bf16")]


def _real_lora_model(model_type: str, task: str, knobs: Knobs):
    model = tiny_model(model_type, task)
    if knobs.base_dtype == "nf4":
        quantization.quantize_block_linears(model, double_quant=knobs.double_quant)
    elif knobs.base_dtype != "fp32":
        model.to(getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[knobs.base_dtype]))
    wrapped = lora.apply(model, rank=knobs.lora_rank, targets=knobs.lora_targets, task=task)
    for p in wrapped.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return wrapped


@functools.lru_cache(maxsize=None)
def _profile(model_type: str, task: str):
    return profile_model(tiny_model(model_type, task), task=task)


@pytest.mark.parametrize("base,precision", BASES)
@pytest.mark.parametrize("model_type,task", CASES)
def test_lora_weights_grads_and_state_are_the_real_tensors(model_type, task, base, precision):
    targets = "all-linear" if base == "nf4" else "attention"
    knobs = Knobs(adapter="lora", base_dtype=base, precision=precision, lora_rank=4, lora_targets=targets,
                  double_quant=model_type != "bert")
    profile = _profile(model_type, task)
    weights, grads, state, trainable = param_state(profile, knobs)
    model = _real_lora_model(model_type, task, knobs)
    real_trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable == sum(p.numel() for p in real_trainable) == model.get_nb_trainable_parameters()[0]
    assert weights == quantization.stored_bytes(model)
    assert grads == 4 * trainable and state == 8 * trainable


def test_the_rank_moves_saved_bytes_by_the_measured_slope():
    profile = make_profile(hidden=64, layers=2, vocab=500, adapters=True)
    layer = profile.block("layer")
    at = {r: lora.block_fits(layer, Knobs(adapter="lora", lora_rank=r), profile.lora_profile_rank) for r in (8, 40)}
    for padded_batch in (1, 4):
        tokens = padded_batch * 96
        moved = at[40].at(padded_batch).saved(padded_batch, 96) - at[8].at(padded_batch).saved(padded_batch, 96)
        assert moved == lora.rank_activation_bytes(4, tokens, 4, 32)  # 4 attention targets, fp32
    head = lora.block_fits(profile.block("head"), Knobs(adapter="lora", lora_rank=40), 8)
    assert head == profile.block("head").adapted[lora.activation_key("attention", "plain", "fp32")]


def test_a_profile_without_adapter_fits_is_refused_by_name():
    profile = make_profile(hidden=64, layers=2, vocab=500, adapters=True)
    bare = profile.model_copy(update={"blocks": [b.model_copy(update={"adapted": {}}) for b in profile.blocks]})
    with pytest.raises(ValueError, match="no LoRA measurements"):
        predict_step_peak(bare, Knobs(adapter="lora"), 2, 64, get_device("cpu"))


def test_lora_peak_holds_only_adapter_gradients_and_a_4_bit_base_weighs_less():
    profile = make_profile(hidden=256, layers=4, vocab=8000, adapters=True)
    device = get_device("a100")
    full = predict_step_peak(profile, Knobs(precision="bf16"), 4, 128, device)
    half = predict_step_peak(profile, Knobs(adapter="lora", base_dtype="bf16", precision="bf16"), 4, 128, device)
    nf4 = predict_step_peak(profile, Knobs(adapter="lora", base_dtype="nf4", precision="bf16"), 4, 128, device)
    assert half.peak_bytes < full.peak_bytes and nf4.weights < half.weights < full.weights
    _, grads, _, trainable = param_state(profile, Knobs(adapter="lora"))
    assert max(half.gradients, nf4.gradients) <= grads == 4 * trainable


def test_lora_backward_skips_the_base_weight_gradients():
    profile = make_profile(hidden=1024, layers=4, vocab=8000, adapters=True)  # at hidden 256 adapter kernel launches dominate
    knobs = Knobs(adapter="lora", base_dtype="bf16", precision="bf16", checkpoint_layers=(0, 1))
    passes = {b.kind: p for b, p in block_passes(profile, knobs)}
    assert passes["embeddings"].total == 1  # forward only
    assert (passes["layer"].backward_full, passes["layer"].backward_weights) == (0, 0)
    assert passes["layer"].backward_input == 3 and passes["layer"].adapters == 4  # layer 0's input needs none
    assert passes["layer"].recompute == 2 and passes["head"].backward_full == 1  # the classifier copy trains
    device = get_device("a100")
    lora_time = micro_batch_seconds(profile, knobs.model_copy(update={"checkpoint_layers": ()}), device, 8, 128)
    full_time = micro_batch_seconds(profile, Knobs(precision="bf16"), device, 8, 128)
    nf4_time = micro_batch_seconds(profile, Knobs(adapter="lora", base_dtype="nf4", precision="bf16"), device, 8, 128)
    assert lora_time < full_time and nf4_time > lora_time


@pytest.mark.parametrize("base,precision", [("fp32", "fp32"), ("bf16", "bf16"), ("nf4", "bf16")])
def test_the_reports_weight_parts_add_up_to_the_memory_models_weights(base, precision):
    profile = make_profile(hidden=64, layers=3, vocab=500, adapters=True)
    knobs = Knobs(adapter="lora", base_dtype=base, precision=precision, lora_targets="all-linear")
    parts = lora.weights_summary(profile, knobs)
    assert parts.base_linear_bytes + parts.other_frozen_bytes + parts.trainable_bytes == param_state(profile, knobs)[0]
