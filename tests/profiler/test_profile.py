"""profile_model: block structure, held-out fit error, fake-tensor bytes against a real CPU measurement, a 7B
config without its weights, real timing, and the live model left as it was."""

import threading
import time

import psutil
import pytest
import torch

from autofit.layers import find_layout
from autofit.profiler import measure_blocks, profile_model
from autofit.profiler.measure_blocks import measure_memory, prepared

from _tiny import short_model as tiny_model

pytestmark = pytest.mark.slow  # the profiled tiny models take minutes on 2 cores (the module fixture)

KINDS = ["embeddings", "layer", "head"]
# Three layers (the profiler builds a two-layer twin: the count must come from the model) and 512 positions
# (every held-out shape of the profiler is then checked).
MODELS = {
    "bert": ("classification", dict(num_hidden_layers=3, max_position_embeddings=512)),
    "gpt2": ("causal-lm", dict(n_layer=3, n_positions=512)),
}


def _unusual_state(model):
    """Eval mode, checkpointing on, the (tied) embeddings and layer 0 frozen, a stale grad: what profiling
    must leave exactly as it found it."""
    model.eval()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.transformer.wte.requires_grad_(False)
    model.transformer.h[0].requires_grad_(False)
    model.transformer.ln_f.weight.grad = torch.full_like(model.transformer.ln_f.weight, 0.5)


def _snapshot(model) -> dict:
    return dict(
        layers=len(model.transformer.h), layer_ids=[id(m) for m in model.transformer.h],
        state={k: v.clone() for k, v in model.state_dict().items()},
        requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
        grads={n: p.grad for n, p in model.named_parameters()},
        training=model.training, checkpointing=model.is_gradient_checkpointing,
        config=model.config.to_dict(),
    )


@pytest.fixture(scope="module")
def profiled():
    """model type -> (tiny model, its Profile). The GPT-2 is profiled with real fp32 timing, in an unusual
    state, and a snapshot of it from before is kept under "before"."""
    found = {}
    task, overrides = MODELS["bert"]
    bert = tiny_model("bert", task, **overrides)
    found["bert"] = bert, profile_model(bert, task=task)
    task, overrides = MODELS["gpt2"]
    gpt2 = tiny_model("gpt2", task, **overrides)
    _unusual_state(gpt2)
    found["before"] = _snapshot(gpt2)
    found["gpt2"] = gpt2, profile_model(gpt2, task=task, timing=("fp32",))
    return found


def _unique_numel(model):
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


@pytest.mark.parametrize("model_type", MODELS)
def test_blocks_counts_and_parameters(profiled, model_type):
    model, profile = profiled[model_type]
    assert [b.kind for b in profile.blocks] == KINDS
    assert [b.count for b in profile.blocks] == [1, 3, 1]
    assert profile.num_layers == 3 and profile.task == MODELS[model_type][0]
    if model_type == "bert":  # no timing asked for
        assert profile.device == "meta" and all(b.time == {} for b in profile.blocks)
    assert profile.num_params == _unique_numel(model)
    layout = find_layout(model)
    assert sorted(profile.block("layer").param_numels) == sorted(p.numel() for p in layout.layers[0].parameters())
    for block in profile.blocks:
        assert block.param_bytes == 4 * block.numel  # fp32 storage
        assert set(block.activations) == {"fp32", "bf16", "fp16"}
    vocab_table = model.get_input_embeddings().weight.numel()
    assert vocab_table in profile.block("embeddings").embedding_numels
    assert vocab_table in profile.block("embeddings").param_numels


def test_tied_weights_are_counted_once(profiled):
    model, profile = profiled["gpt2"]
    assert model.lm_head.weight is model.transformer.wte.weight
    with_duplicates = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert profile.num_params == _unique_numel(model) < with_duplicates
    assert profile.block("head").numel == model.transformer.ln_f.weight.numel() * 2  # ln_f only, no lm_head


@pytest.mark.parametrize("model_type", MODELS)
def test_held_out_fit_checks_within_one_percent(profiled, model_type):
    _, profile = profiled[model_type]
    checks = profile.fit_checks
    assert {c.quantity for c in checks} == {f"{k}.saved" for k in KINDS}
    assert {c.precision for c in checks} >= {"fp32", "bf16"}
    assert not {(c.batch, c.seq) for c in checks} & set(map(tuple, profile.profile_shapes))
    report = [(c.quantity, c.precision, c.batch, c.seq, f"{c.error:.2%}") for c in checks]
    print(model_type, report)
    bad = [r for c, r in zip(checks, report) if c.error >= 0.01]
    assert not bad, f"held-out fit error >= 1%: {bad}"


_make_batch = measure_blocks.make_batch


def _padded_batch(*args, **kwargs):
    """make_batch with one pad position, as in a padded training batch. With an all-ones mask transformers
    skips building the attention mask for real tensors, never for fake ones (is_tracing): under bf16 autocast
    the real run then saves less, as the fp32 mask is what promotes the scores to an fp32 softmax."""
    batch = _make_batch(*args, **kwargs)
    batch["attention_mask"][0, -1] = 0
    return batch


@pytest.mark.parametrize("shape", [(3, 40), (1, 200)], ids=["3x40", "1x200"])
@pytest.mark.parametrize("model_type", MODELS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fake_tensor_bytes_match_a_real_cpu_measurement(profiled, model_type, precision, shape, monkeypatch):
    """The profile is measured on a fake-tensor twin; the same measurement on the real model at a shape the
    fits never saw must agree with the fits. Batch 1 has fits of its own: at batch 1 GPT-2's eager attention
    saves q and k as views that keep the whole fused c_attn output alive (at batch >= 2 the reshape copies
    them), which batch >= 2 fits under-predict by 256 B/token in fp32."""
    model, profile = profiled[model_type]
    assert shape not in set(map(tuple, profile.profile_shapes))
    task = MODELS[model_type][0]
    monkeypatch.setattr(measure_blocks, "make_batch", _padded_batch)
    frozen = [p for p in model.parameters() if not p.requires_grad]  # the profile is of a fully trainable model
    try:
        for p in frozen:
            p.requires_grad_(True)
        with prepared(model, find_layout(model), task) as subject:
            real = measure_memory(subject, precision, shape, "cpu")
    finally:
        for p in frozen:
            p.requires_grad_(False)
    for kind in KINDS:
        acts = profile.block(kind).activations[precision].at(shape[0])
        for quantity in ("saved", "output"):
            predicted, measured = getattr(acts, quantity)(*shape), getattr(real, quantity)[kind]
            assert measured > 0 or kind == "head", (kind, quantity)
            assert predicted == pytest.approx(measured, rel=0.01, abs=64), (kind, quantity)


@pytest.fixture(scope="module")
def sdpa_bert():
    """A fresh tiny BERT on SDPA attention, which skips its attention mask for batches without padding."""
    model = tiny_model("bert", "classification", num_hidden_layers=3, max_position_embeddings=512)
    model.set_attn_implementation("sdpa")
    return model, profile_model(model, task="classification")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_batches_without_padding_match_the_unpadded_fits(sdpa_bert, precision):
    """An all-ones mask lets the real model skip its 4-D attention mask; the profile's unpadded fits must
    agree with that real measurement, including what a checkpointed layer keeps and what the model's code
    holds of the embeddings' output."""
    model, profile = sdpa_bert
    shape = (3, 40)
    with prepared(model, find_layout(model), "classification") as subject:
        real = measure_memory(subject, precision, shape, "cpu")
    for kind in KINDS:
        acts = profile.block(kind).activations[precision].at(shape[0], padded=False)
        for quantity in ("saved", "saved_first_trainable", "output", "held", "checkpoint_args",
                         "checkpointed_leftover"):
            fit = getattr(acts, quantity)
            predicted, measured = (fit(*shape) if fit else 0.0), getattr(real, quantity)[kind]
            assert predicted == pytest.approx(measured, rel=0.01, abs=64), (kind, quantity)
    assert real.held["embeddings"] > 0  # BertModel keeps `embedding_output` through the encoder


def test_sdpa_models_get_a_cheaper_fit_for_batches_without_padding(sdpa_bert, profiled):
    layer = sdpa_bert[1].block("layer").activations["fp32"]
    assert layer.unpadded is not None
    assert layer.at(8, padded=False).saved(8, 256) < layer.at(8).saved(8, 256)
    assert layer.at(1, padded=False) is layer.unpadded.single
    eager = profiled["bert"][1].block("layer").activations["fp32"]
    # eager attention builds its mask either way: what it saves does not change
    assert eager.at(8, padded=False).saved(8, 256) == pytest.approx(eager.at(8).saved(8, 256))


def test_repeated_measurements_agree(profiled):
    """Every run starts without gradients: a run after another must not see the first run's."""
    model, _ = profiled["bert"]
    with prepared(model, find_layout(model), "classification") as subject:
        first = measure_memory(subject, "fp32", (2, 32), "cpu")
        again = measure_memory(subject, "fp32", (2, 32), "cpu")
    assert first == again
    assert first.backward_transient["layer"] > 0


class _PeakRss:
    """Highest resident set size of this process while the block runs, sampled every 5 ms."""

    def __enter__(self):
        self._process = psutil.Process()
        self.start = self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.start


def test_a_7b_config_is_profiled_without_allocating_its_weights():
    with _PeakRss() as rss:
        profile = profile_model("meta-llama/Llama-2-7b-hf")
    # Two fp32 layers, the embeddings and the head of Llama-2-7B would take ~2.7 GB; one layer 0.8 GB.
    print(f"RSS growth while profiling Llama-2-7B: {rss.growth / 2**20:.0f} MiB")
    assert rss.growth < 512 * 2**20
    assert profile.num_params == 6_738_415_616
    assert [b.count for b in profile.blocks] == [1, 32, 1]
    assert profile.block("layer").numel == 202_383_360
    assert profile.block("layer").param_bytes == 4 * 202_383_360
    assert profile.task == "causal-lm"
    # The bytes are real sizes: a layer at (1, 512) in fp32 keeps far more than its 4096-wide output.
    acts = profile.block("layer").activations["fp32"]
    assert acts.output(1, 512) == pytest.approx(4 * 512 * 4096)
    assert acts.saved(1, 512) > 10 * acts.output(1, 512)


def test_timing_fills_block_time(profiled):
    _, profile = profiled["gpt2"]
    assert profile.device == "cpu"
    for block in profile.blocks:
        assert set(block.time) == {"fp32"}, block.kind
        fit = block.time["fp32"]
        for shape in ((1, 32), (4, 64)):
            forward, backward = fit.forward(*shape), fit.backward(*shape)
            assert 0 < forward < 1.0 and 0 < backward < 1.0, (block.kind, shape, forward, backward)
    layer = profile.block("layer").time["fp32"]
    assert layer.forward(4, 128) > layer.forward(1, 8)


def test_profiling_leaves_the_live_model_unchanged(profiled):
    (model, profile), before = profiled["gpt2"], profiled["before"]
    after = _snapshot(model)
    assert profile.num_layers == 3 == after["layers"] == before["layers"]
    assert after["layer_ids"] == before["layer_ids"]
    assert after["state"].keys() == before["state"].keys()
    changed = [k for k, v in after["state"].items() if not torch.equal(v, before["state"][k])]
    assert not changed, changed
    assert after["requires_grad"] == before["requires_grad"]
    assert after["requires_grad"]["transformer.wte.weight"] is False
    assert all(after["grads"][n] is g for n, g in before["grads"].items())  # the stale grad kept, no new ones
    assert after["training"] is before["training"] is False
    assert after["checkpointing"] is before["checkpointing"] is True
    assert after["config"] == before["config"]


WIDE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4)
"""Weight copies big beside the activations, as in small models under autocast."""


@pytest.mark.parametrize(("checkpointed", "precision", "width"), [((0,), "fp32", {}), ((1,), "fp32", {}),
                                                                 ((0, 1), "bf16", WIDE), ((1,), "bf16", WIDE)])
def test_a_checkpointed_deberta_layers_backward_peak_is_predicted_to_its_measurement(checkpointed, precision,
                                                                                     width):
    """Checkpointing keeps a layer's arguments alive unsaved until its recompute: its input and DeBERTa's
    int64 relative positions (S x S x 8 bytes). The memory model counts them as the layer's kept bytes; the
    recompute's measured transient must not count them again (it did: +3% here, +7% on a LoRA plan).
    Under autocast the arguments were measured short by the layer's weight copies, which autocast's cache
    frees when the forward returns (-2% to -3% on bf16 DeBERTa plans)."""
    from _tiny import tiny_model as any_tiny_model

    from autofit.devices import get_device
    from autofit.knobs import Knobs
    from autofit.measure import PeakMemoryMeter
    from autofit.memory import predict_step_peak
    from autofit.techniques import checkpointing

    model = any_tiny_model("deberta-v2", **width)
    profile = profile_model(model, task="classification")
    batch, seq = 2, 256  # a profiled shape: the fits are exact there, what is left is the walk's accounting
    knobs = Knobs(micro_batch_size=batch, checkpoint_layers=checkpointed, precision=precision)
    predicted = predict_step_peak(profile, knobs, batch, seq, get_device("cpu"), padded=False)
    assert predicted.peak_phase == "backward"
    checkpointing.apply(model.train(), list(checkpointed))
    optimizer = torch.optim.AdamW(model.parameters())
    ids = torch.randint(1, 100, (batch, seq), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1])

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        with autocast:
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer state exists from here on, as in the steady state the model predicts
    with PeakMemoryMeter("cpu", track=[model, optimizer]) as meter:
        step()
    assert predicted.allocated_bytes == pytest.approx(meter.peak_bytes, rel=0.002)


def test_a_model_with_frozen_weights_is_profiled_and_timed_whole_and_given_back_frozen():
    """A user's model with frozen embeddings (or what peft's merge_and_unload returns): the profile is of
    the whole model training, so timing its backward found no embeddings' window (KeyError 'bwd:emb')."""
    model = tiny_model("bert")
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)
    profile = profile_model(model, task="classification", timing=("fp32",))
    assert profile.block("embeddings").time["fp32"].backward(1, 32) > 0
    assert not any(p.requires_grad for p in model.bert.embeddings.parameters())
    assert all(p.requires_grad for p in model.bert.encoder.parameters())


def test_the_cache_key_hashes_the_profilers_code_as_it_was_imported(monkeypatch):
    """A profile made by the code this process runs must not be stored under the key of files edited on disk
    since (a long benchmark stored old profiles under new code's key that way)."""
    from pathlib import Path

    from autofit.profiler import cache

    config = tiny_model("bert").config
    before = cache.cache_key(config, "classification", ("fp32",), None)
    monkeypatch.setattr(Path, "read_bytes", lambda self: b"edited since")
    assert cache.cache_key(config, "classification", ("fp32",), None) == before
