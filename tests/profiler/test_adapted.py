"""The adapted twin: its NF4 stand-in and its plain LoRA base measure what real bitsandbytes layers and peft
measure on real tensors, and profile_model(adapters=True) fills every adapted fit, whose saved bytes grow with
the rank as the memory model says."""

import types

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from autofit.layers import find_layout
from autofit.profiler import cache, measure_blocks, profile_model
from autofit.profiler.profile import add_adapters
from autofit.profiler.adapted import COMPUTE_DTYPES, LORA_PROFILE_RANK, attach_adapters, materialized
from autofit.profiler.measure_blocks import measure_memory, prepared
from autofit.profiler.schema import MEASURED_QUANTITIES
from autofit.knobs import Knobs
from autofit.techniques import lora, quantization

from _tiny import tiny_model

pytest.importorskip("bitsandbytes")

SHAPE = (3, 40)
CASES = [("llama", "causal-lm", "all-linear"), ("llama", "causal-lm", "attention"),
         ("bert", "classification", "all-linear"), ("bert", "classification", "attention")]
_make_batch = measure_blocks.make_batch


def _padded_batch(*args, **kwargs):
    """A batch with one pad position: real models skip building the 4-D mask for an all-ones mask, fake ones
    never do (see test_profile._padded_batch)."""
    batch = _make_batch(*args, **kwargs)
    batch["attention_mask"][0, -1] = 0
    return batch


@pytest.fixture
def visible_bitsandbytes(monkeypatch):
    """Real measurements see what bitsandbytes allocates: a padded batch, and its gemm_4bit op run as the Python
    function the CPU dispatches it to (its default kernel). Called as one op, the tracker would see only its
    output, not the dequantized weight and scales it allocates inside (which a GPU's fallback path allocates
    too)."""
    from bitsandbytes.backends.default.ops import _gemm_4bit_default_impl

    monkeypatch.setattr(measure_blocks, "make_batch", _padded_batch)
    monkeypatch.setattr(torch.ops.bitsandbytes, "gemm_4bit", types.SimpleNamespace(default=_gemm_4bit_default_impl))


def _real_measurement(model, task: str, precision: str):
    with prepared(model, find_layout(model), task, whole=False) as subject:  # peft's frozen base stays frozen
        measure_memory(subject, precision, SHAPE, "cpu")  # Linear4bit casts its bias in place on its first call
        return measure_memory(subject, precision, SHAPE, "cpu")


def _twin_measurement(model_type: str, task: str, targets: str, base_kind: str, precision: str,
                      rank: int = LORA_PROFILE_RANK, shape: tuple[int, int] = SHAPE):
    """The profiler's way: the same tiny model built on the meta device, adapted, measured as fake tensors."""
    with torch.device("meta"):
        model = tiny_model(model_type, task)
    attach_adapters(model, targets=targets, base_kind=base_kind, precision=precision, task=task, rank=rank)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    materialized(model, fake, "cpu")
    with fake, prepared(model, find_layout(model), task, whole=False) as subject:
        return measure_memory(subject, precision, shape, "cpu")


def _assert_same(real, twin):
    compared = 0
    for quantity in MEASURED_QUANTITIES:
        for kind in ("embeddings", "layer", "head"):
            # Equal to the byte: the stand-in allocates what bitsandbytes allocates, in the same order.
            assert getattr(twin, quantity)[kind] == getattr(real, quantity)[kind], (quantity, kind)
            compared += getattr(real, quantity)[kind] > 0
    assert compared >= 10  # the runs measured something


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("model_type,task,targets", CASES)
def test_the_nf4_standin_measures_what_bitsandbytes_allocates(visible_bitsandbytes, model_type, task, targets,
                                                              precision):
    model = tiny_model(model_type, task)
    assert quantization.quantize_block_linears(model, compute_dtype=COMPUTE_DTYPES[precision]) > 0
    lora.apply(model, rank=LORA_PROFILE_RANK, targets=targets, task=task)
    _assert_same(_real_measurement(model, task, precision),
                 _twin_measurement(model_type, task, targets, "nf4", precision))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("model_type,task,targets", CASES[::2])
def test_a_plain_base_twin_measures_what_peft_on_real_tensors_does(monkeypatch, model_type, task, targets,
                                                                    precision):
    monkeypatch.setattr(measure_blocks, "make_batch", _padded_batch)
    model = tiny_model(model_type, task).to(COMPUTE_DTYPES[precision])  # base_dtype = the precision's dtype
    lora.apply(model, rank=LORA_PROFILE_RANK, targets=targets, task=task)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # the executor trains adapters and the head's copy in fp32
    _assert_same(_real_measurement(model, task, precision),
                 _twin_measurement(model_type, task, targets, "plain", precision))


def test_the_standin_holds_packed_weights_and_saves_no_dequantized_one():
    with torch.device("meta"):
        model = tiny_model("llama", "causal-lm")
    attach_adapters(model, targets="attention", base_kind="nf4", precision="bf16", task="causal-lm")
    mlp = model.model.layers[0].mlp.gate_proj  # not targeted: the stand-in itself
    assert mlp.weight.dtype == torch.uint8 and mlp.weight.numel() == 64 * 32 // 2 and not mlp.weight.requires_grad
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)


def test_the_adapters_twin_is_measured_with_peft_s_base_frozen():
    """A plain profile makes every weight trainable; the adapters' twin must keep peft's frozen base, or its
    layers save the inputs of every base weight's gradient (+7% on a tight bert LoRA plan)."""
    model = tiny_model("bert", "classification")
    profile = profile_model(model, task="classification", adapters=True)
    layer = profile.block("layer")
    for base in lora.BASE_KINDS:
        adapted = layer.adapted[lora.activation_key("attention", base, "fp32")].saved(4, 32)
        assert 0 < adapted < layer.activations["fp32"].saved(4, 32), base  # no base weight gradient


@pytest.fixture(scope="module")
def adapted_profile():
    """A tiny llama profiled with and without adapters (2048 positions: every held-out shape is checked)."""
    model = tiny_model("llama", "causal-lm")
    return model, profile_model(model, task="causal-lm", adapters=True), profile_model(model, task="causal-lm")


KEYS = {lora.activation_key(t, b, p) for t in lora.TARGET_CHOICES for b in lora.BASE_KINDS
        for p in ("fp32", "bf16", "fp16")}


@pytest.mark.slow
def test_adapted_fits_exist_for_every_key_and_leave_the_rest_alone(adapted_profile):
    _, profile, plain = adapted_profile
    assert profile.lora_profile_rank == LORA_PROFILE_RANK and plain.lora_profile_rank == 0
    for block, plain_block in zip(profile.blocks, plain.blocks):
        assert set(block.adapted) == KEYS
        assert plain_block.adapted == {}
        assert block.model_copy(update={"adapted": {}}) == plain_block  # adapters=False: the profile as before
        for targets in lora.TARGET_CHOICES:
            for base in lora.BASE_KINDS:
                assert block.adapted[lora.activation_key(targets, base, "fp16")] == \
                    block.adapted[lora.activation_key(targets, base, "bf16")]
    layer = profile.block("layer")
    full = layer.activations["fp32"].saved(4, 32)
    nf4 = layer.adapted[lora.activation_key("attention", "nf4", "fp32")].saved(4, 32)
    assert 0 < nf4 < full  # the frozen base saves no inputs for its weight gradients
    adapted_checks = [c for c in profile.fit_checks if c.precision.startswith("lora-")]
    assert {c.precision for c in adapted_checks} == KEYS - {k for k in KEYS if k.endswith("fp16")}
    assert all(c.error < 0.01 for c in adapted_checks), [(c.precision, c.quantity, c.error) for c in adapted_checks]


@pytest.mark.slow
@pytest.mark.parametrize("base_kind", lora.BASE_KINDS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_saved_bytes_grow_with_the_rank_by_the_memory_models_term(adapted_profile, base_kind, precision):
    model, profile, _ = adapted_profile
    targets, rank, shape = "all-linear", 24, (4, 48)  # a shape the fits never saw
    layer = profile.block("layer")
    fit = layer.adapted[lora.activation_key(targets, base_kind, precision)].at(shape[0]).saved
    measured = _twin_measurement("llama", "causal-lm", targets, base_kind, precision, rank=rank, shape=shape)
    chosen = [(x.out_features, x.in_features) for x in layer.linears if lora.is_target(x.attention, targets)]
    knobs = Knobs(adapter="lora", lora_rank=rank, lora_targets=targets, precision=precision,
                  base_dtype="nf4" if base_kind == "nf4" else precision)
    predicted = lora.block_fits(layer, knobs, profile.lora_profile_rank).at(shape[0]).saved(*shape)
    # the memory model's rank terms: A's outputs, and under autocast the adapters' half weight copies
    copies = 0 if precision == "fp32" else 2 * lora.adapter_numel(chosen, rank - LORA_PROFILE_RANK)
    assert predicted - fit(*shape) == pytest.approx(
        lora.rank_activation_bytes(len(chosen), shape[0] * shape[1], 4 if precision == "fp32" else 2,
                                   rank - LORA_PROFILE_RANK) + copies)
    assert measured.saved["layer"] == pytest.approx(predicted, rel=1e-6, abs=1)


def test_a_profile_with_adapters_is_cached_apart_and_serves_one_without(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOFIT_CACHE", str(tmp_path))
    calls = []
    stub = types.SimpleNamespace(model_dump_json=lambda: "{}")

    def fake_profile(spec, **kwargs):
        calls.append(kwargs["adapters"])
        return stub

    monkeypatch.setattr(cache, "profile_model", fake_profile)
    monkeypatch.setattr(cache.Profile, "model_validate_json", classmethod(lambda cls, text: stub))
    config = tiny_model("bert").config
    cache.cached_profile(config, task="classification", adapters=True)
    assert [p.name.endswith(f"{cache.ADAPTERS_SUFFIX}.json") for p in tmp_path.iterdir()] == [True]
    assert cache.cached_profile(config, task="classification") is stub  # served by the adapted profile
    assert cache.cached_profile(config, task="classification", adapters=True) is stub
    assert calls == [True]
    added = []
    monkeypatch.setattr(cache, "add_adapters", lambda profile, spec, **kwargs: added.append(profile) or stub)
    cache.cached_profile(tiny_model("llama", "causal-lm").config, task="causal-lm")
    cache.cached_profile(tiny_model("llama", "causal-lm").config, task="causal-lm", adapters=True)
    # one without adapters does not serve a request with them: its adapters are measured and added to it
    assert calls == [True, False] and added == [stub]


@pytest.mark.slow
def test_adding_adapters_to_a_plain_profile_equals_profiling_with_them(adapted_profile):
    model, profile, plain = adapted_profile
    added = add_adapters(plain, model)
    assert added.model_dump(exclude={"seconds"}) == profile.model_dump(exclude={"seconds"})
    assert added.seconds > plain.seconds
