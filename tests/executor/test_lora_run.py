"""run_plan with LoRA plans: the adapters learn (fp32, half and 4-bit bases), only they and the head copy
change, the saved adapter reloads with peft, a stopped run resumes bit-identically from trainable-only
checkpoints, and models that cannot take the plan are refused in one line."""

from __future__ import annotations

import random

import pytest
import torch

from autofit.data import TokenizedData
from autofit.executor import ExecutorInputError, default_fallback, run_plan
from autofit.plan import Plan
from autofit.techniques import adapter, lora, quantization

from _tiny import make_plan, short_model, tiny_model

LORA = dict(adapter="lora", lora_rank=8, lora_targets="all-linear")


def halves_data(n: int, seed: int) -> TokenizedData:
    """Class 0 sequences use tokens 3..49, class 1 tokens 50..96: a frozen random base plus adapters learns it."""
    rng = random.Random(seed)
    labels = [rng.randrange(2) for _ in range(n)]
    ids = [[rng.randrange(3, 50) + 47 * y for _ in range(rng.randint(4, 12))] for y in labels]
    return TokenizedData(task="classification", input_ids=ids, labels=labels, num_labels=2)


def constant_data(n: int, seed: int) -> TokenizedData:
    """Each sequence repeats one token: a causal LM learns to predict the token it has seen."""
    rng = random.Random(seed)
    return TokenizedData(task="causal-lm", input_ids=[[rng.randrange(3, 100)] * rng.randint(4, 12) for _ in range(n)])


def model_for(task: str, seed: int = 0, **overrides):
    if task == "classification":
        return tiny_model("llama", task, seed=seed, max_position_embeddings=64, **overrides)
    # wider embeddings: the frozen tied LM head of a 0.02-std model cannot express a confident prediction
    return short_model("gpt2", task, seed=seed, **{"initializer_range": 0.2, **overrides})


@torch.no_grad()
def held_out_loss(model, data: TokenizedData) -> float:
    """Mean loss over examples, one at a time (no padding)."""
    model.eval()
    losses = []
    for i in range(len(data)):
        ids = torch.tensor([data.input_ids[i]])
        labels = torch.tensor([data.labels[i]]) if data.labels is not None else ids
        losses.append(float(model(input_ids=ids, labels=labels).loss))
    return sum(losses) / len(losses)


def base_name(name: str) -> str:
    """A peft parameter's name in the unwrapped model."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "").replace(".original_module", "")


@pytest.mark.parametrize("base,precision", [("fp32", "fp32"), ("nf4", "fp32"), ("bf16", "bf16"), ("nf4", "bf16")])
@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_lora_lowers_held_out_loss_and_changes_only_adapters_and_head(task, base, precision):
    make = halves_data if task == "classification" else constant_data
    train, held = make(64, 0), make(32, 1)
    model = model_for(task)
    before_loss = held_out_loss(model, held)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    plan = make_plan(model, task, train, batch_size=8, micro_batch_size=8, base_dtype=base, precision=precision,
                     **LORA)
    # 5e-3: at 1e-2 the NF4 + bf16 classifier overshot after epoch 2 (held-out 0.24 -> 0.55) with the packages
    # of 2026-12-02; at 5e-3 every case ends at or below 0.28 (classification) and 1.93 (causal LM)
    result = run_plan(model, plan, train, eval=held, epochs=4, lr=5e-3, quiet=True, measure_memory=False)

    losses = [e.loss for e in result.eval]
    assert losses[-1] < before_loss - 0.2, (before_loss, losses)
    if task == "classification":
        assert result.eval[-1].accuracy >= 0.8
    peft_model = result.model
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in peft_model.named_parameters() if n in trainable)
    quantized = quantization.quantized_kind(model)
    assert (quantized == "4-bit NF4 with double quantization") == (base == "nf4")
    for name, p in peft_model.named_parameters():
        if name in trainable or quantized and "weight" in name and getattr(p, "quant_state", None) is not None:
            continue  # 4-bit weights are compared as stored below
        original = before[base_name(name)]
        assert torch.equal(p.detach().float(), original.to(p.dtype).float()), name  # untouched, or only cast
    if quantized:  # each 4-bit weight is the original rounded to NF4, as a fresh quantization stores it
        twin = model_for(task)
        quantization.quantize_block_linears(twin, double_quant=True)
        stored = {base_name(n): p for n, p in peft_model.named_parameters() if hasattr(p, "quant_state")}
        assert len(stored) == len(lora.target_layers(twin, "all-linear"))
        for name, p in twin.named_parameters():
            if name in stored:
                assert torch.equal(dequantized(stored[name]), dequantized(p)), name


def dequantized(weight) -> torch.Tensor:
    import bitsandbytes.functional as F

    return F.dequantize_4bit(weight.data, weight.quant_state).float()


@pytest.mark.parametrize("base", ["fp32", "nf4"])
def test_saved_adapter_reloads_with_peft_to_the_same_logits(tmp_path, base):
    from peft import PeftModel

    train = halves_data(16, 0)
    model = model_for("classification")
    plan = make_plan(model, "classification", train, batch_size=8, micro_batch_size=4, base_dtype=base, **LORA)
    result = run_plan(model, plan, train, lr=1e-2, quiet=True, measure_memory=False, output_dir=str(tmp_path))
    assert result.adapter_dir == str(tmp_path / "adapter")

    fresh = model_for("classification")  # the same base, as the user would load it again
    if base == "nf4":
        quantization.quantize_block_linears(fresh, double_quant=True)
        adapter.keep_4bit_layout(fresh)
    reloaded = PeftModel.from_pretrained(fresh, result.adapter_dir).eval()
    batch = {"input_ids": torch.tensor([train.input_ids[0][:4], train.input_ids[1][:4]])}
    with torch.no_grad():
        trained, again, untrained = (result.model.eval()(**batch).logits, reloaded(**batch).logits,
                                     model_for("classification")(**batch).logits)
    assert torch.equal(trained, again)
    assert not torch.allclose(trained, untrained)


def test_export_merged_gives_the_adapted_logits_and_refuses_a_4bit_base(tmp_path):
    from transformers import AutoModelForSequenceClassification

    train = halves_data(16, 0)
    model = model_for("classification")
    plan = make_plan(model, "classification", train, batch_size=8, micro_batch_size=8, **LORA)
    peft_model = run_plan(model, plan, train, lr=1e-2, quiet=True, measure_memory=False).model.eval()
    batch = {"input_ids": torch.tensor([train.input_ids[0][:4]])}
    with torch.no_grad():
        adapted = peft_model(**batch).logits
    lora.export_merged(peft_model, tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted, rtol=1e-4, atol=1e-5)

    model = model_for("classification")
    plan = make_plan(model, "classification", train, batch_size=8, micro_batch_size=8, base_dtype="nf4", **LORA)
    peft_model = run_plan(model, plan, train, max_steps=1, quiet=True, measure_memory=False).model
    with pytest.raises(ValueError, match="cannot export a merged model from a 4-bit NF4") as error:
        lora.export_merged(peft_model, tmp_path / "merged4")
    assert "\n" not in str(error.value)


def test_a_lora_plan_round_trips_through_json_and_trains_after_loading(tmp_path):
    train = halves_data(16, 0)
    model = model_for("classification")
    plan = make_plan(model, "classification", train, batch_size=8, micro_batch_size=4, base_dtype="nf4",
                     double_quant=False, lora_rank=4, lora_targets="attention", adapter="lora",
                     checkpoint_layers=(1,))
    again = Plan.model_validate_json(plan.model_dump_json())
    assert again == plan and again.knobs.quantized and again.knobs.lora_rank == 4
    plan.save(tmp_path / "plan.json")
    result = run_plan(model, Plan.load(tmp_path / "plan.json"), train, quiet=True, measure_memory=False)
    assert result.optimizer_steps == 2 and quantization.quantized_kind(model) == "4-bit NF4"
    assert len([n for n, _ in result.model.named_parameters() if "lora_A" in n]) == 2 * 4  # q, k, v, o per layer


def test_oom_fallback_under_lora_keeps_the_adapter_knobs_and_the_effective_batch():
    train = halves_data(16, 0)
    model = model_for("classification")
    plan = make_plan(model, "classification", train, batch_size=8, micro_batch_size=1, **LORA)
    smaller = default_fallback(plan)
    assert smaller.knobs.checkpoint_layers == (0, 1) and smaller.batch_size == 8
    assert (smaller.knobs.adapter, smaller.knobs.lora_rank, smaller.knobs.freeze_layers) == ("lora", 8, 0)
    assert not smaller.knobs.freeze_embeddings and default_fallback(smaller) is None

    calls = []
    forward = model.forward

    def oom_once_on_four(*args, **kwargs):
        calls.append(len(kwargs["input_ids"]))
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return forward(*args, **kwargs)

    model.forward = oom_once_on_four
    plan = make_plan(model, "classification", train, batch_size=8, micro_batch_size=4, **LORA)
    result = run_plan(model, plan, train, quiet=True, measure_memory=False)
    assert [f.summary for f in result.fallbacks] == ["micro_batch_size 4 -> 2"]
    assert result.plan.knobs.adapter == "lora" and all(r.samples == 8 for r in result.history)
    assert calls[1:] == [2] * 8  # both steps of 8 examples, in micro-batches of 2


def test_checkpointed_layers_pass_gradients_to_adapters_of_a_frozen_base():
    from autofit.knobs import Knobs
    from autofit.techniques import checkpointing

    grads = []
    for layers in [(), (0, 1)]:
        model = model_for("classification", seed=3)
        torch.manual_seed(0)
        peft_model = adapter.prepare(model, Knobs(**LORA), "classification", precision_dtype=None)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)  # B starts at zero: A would get no gradient
        checkpointing.apply(model, layers)
        batch = {"input_ids": torch.tensor([[5, 9, 11, 40]]), "labels": torch.tensor([1])}
        peft_model(**batch).loss.backward()
        grads.append({n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad})
        assert checkpointing.checkpointed_indices(model) == list(layers)
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert grad is not None and grad.abs().sum() > 0 and torch.allclose(grad, grads[1][name]), name


def test_models_that_cannot_take_the_plan_are_refused_in_one_line(monkeypatch):
    train = halves_data(8, 0)

    def refused(model, match, **knobs):
        plan = make_plan(model, "classification", train, batch_size=8, micro_batch_size=8, **knobs)
        with pytest.raises(ExecutorInputError, match=match) as error:
            run_plan(model, plan, train, quiet=True, measure_memory=False)
        assert "\n" not in str(error.value)

    quantized = model_for("classification")
    plan_model = model_for("classification")
    quantization.quantize_block_linears(quantized, double_quant=True)
    for knobs in [{}, dict(LORA), dict(LORA, base_dtype="bf16", precision="bf16"),
                  dict(LORA, base_dtype="nf4", double_quant=False)]:
        plan = make_plan(plan_model, "classification", train, batch_size=8, micro_batch_size=8, **knobs)
        with pytest.raises(ExecutorInputError, match="already quantized"):
            run_plan(quantized, plan, train, quiet=True, measure_memory=False)
    # the same NF4 it already has is accepted (a model loaded with BitsAndBytesConfig)
    plan = make_plan(plan_model, "classification", train, batch_size=8, micro_batch_size=8, base_dtype="nf4", **LORA)
    assert run_plan(quantized, plan, train, quiet=True, measure_memory=False).optimizer_steps == 1

    refused(quantized, "already has peft adapters", base_dtype="nf4", **LORA)  # the run above put them in
    deberta = tiny_model("deberta-v2", "classification")
    refused(deberta, "4-bit base under bf16 fails in deberta-v2's attention", base_dtype="nf4", precision="bf16",
            **LORA)
    monkeypatch.setattr(quantization, "nf4_unavailable", lambda device: "RuntimeError: no 4-bit kernels")
    refused(model_for("classification"), "bitsandbytes cannot run on cpu: RuntimeError", base_dtype="nf4", **LORA)
    monkeypatch.setattr(adapter, "block_linears", lambda model: [])
    refused(model_for("classification"), "needs linear layers in the model's blocks", **LORA)


def test_nf4_is_available_on_this_cpu():
    assert quantization.nf4_unavailable(torch.device("cpu")) is None


def test_a_4bit_bases_fp32_originals_are_freed_while_it_trains():
    """The run kept every parameter of the caller's model (to give back its requires_grad flags), so the fp32
    weights the 4-bit layers replaced lived through the whole run: neither predicted nor seen by the meter,
    5-22% over the prediction on small models (over the budget in 3 of 4 such plans)."""
    import weakref

    from torch.optim.optimizer import register_optimizer_step_post_hook

    model = model_for("classification")
    train = halves_data(16, seed=0)
    plan = make_plan(model, "classification", train, batch_size=8, micro_batch_size=8, base_dtype="nf4", **LORA)
    layers = model.model.layers
    originals = [weakref.ref(m.weight) for m in layers.modules() if isinstance(m, torch.nn.Linear)]
    alive_at_steps = []
    hook = register_optimizer_step_post_hook(
        lambda *_: alive_at_steps.append(sum(ref() is not None for ref in originals)))
    try:
        run_plan(model, plan, train, epochs=1, quiet=True, measure_memory=False)
    finally:
        hook.remove()
    assert originals and alive_at_steps and max(alive_at_steps) == 0


def test_the_meter_counts_replaced_parameters_that_something_still_holds():
    """The meter walked the model's parameters after set-up: originals a 4-bit base replaced but something
    kept alive (as the run itself did) were invisible to it. Here the test holds them: the measured peak
    must grow by their bytes."""
    peaks = []
    for hold in (False, True):
        model = model_for("classification")
        train = halves_data(16, seed=0)
        plan = make_plan(model, "classification", train, batch_size=8, micro_batch_size=8, base_dtype="nf4", **LORA)
        held = [m.weight for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)] if hold else []
        peaks.append(run_plan(model, plan, train, epochs=2, quiet=True).measured_peak_bytes)
        held_bytes = sum(w.numel() * w.element_size() for w in held)
    assert peaks[1] - peaks[0] == held_bytes > 0
