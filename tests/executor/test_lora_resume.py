"""LoRA runs checkpoint only what trains and resume exactly (as tests/executor/test_resume.py does for full
fine-tuning); a resume with other adapter knobs is refused; a model loaded by path for an NF4 plan comes in
4 bits exactly as the in-memory quantization makes it, and trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import autofit
from autofit.executor import ExecutorInputError, latest_checkpoint, run_plan
from autofit.models import load_model
from autofit.techniques import adapter, quantization

from _tiny import make_plan, short_model, token_data

N, EPOCHS, LR = 12, 2, 1e-2  # steps of 4 examples in micro-batches of 2: 3 steps per epoch, 6 in all


def setup(base: str, *, seed: int = 0, **knobs):
    # Dropout on: a resumed run must also restore the random generators to match.
    model = short_model("bert", seed=seed, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    train = token_data(N)
    plan = make_plan(model, data=train, batch_size=4, micro_batch_size=2, adapter="lora", base_dtype=base,
                     lora_rank=4, lora_targets="all-linear", **knobs)
    return model, plan, train


def run(model, plan, train, **kwargs):
    return run_plan(model, plan, train, **{"epochs": EPOCHS, "lr": LR, "quiet": True, "measure_memory": False,
                                           **kwargs})


def trainable(result) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in result.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("base", ["fp32", "nf4"])
@pytest.mark.parametrize("stop_after", [1, 4])  # inside epoch 0, inside epoch 1
def test_stopped_and_resumed_lora_run_equals_an_uninterrupted_one(tmp_path, base, stop_after):
    ref_model, plan, train = setup(base)
    ref = run(ref_model, plan, train)

    model, plan, train = setup(base)
    first = run(model, plan, train, max_steps=stop_after, output_dir=str(tmp_path), checkpoint_every=2)
    saved = Path(first.output_dir) / "model.safetensors"
    with safe_open(str(saved), "pt") as f:  # only what trains: adapters and the classifier's copy
        assert set(f.keys()) == set(trainable(first)) and f.metadata() == {"autofit_tensors": "trainable"}
    assert saved.stat().st_size < 0.5 * sum(p.numel() * 4 for p in short_model("bert").parameters())

    # A fresh process: the same base, loaded again; its adapters and head copy come from the checkpoint.
    resumed_model, plan, train = setup(base)
    result = run(resumed_model, plan, train, output_dir=str(tmp_path), checkpoint_every=2, resume=True)
    assert result.optimizer_steps == ref.optimizer_steps == N // 4 * EPOCHS
    assert [(r.epoch, r.loss) for r in result.history] == [(r.epoch, r.loss) for r in ref.history]
    ours, theirs = trainable(result), trainable(ref)
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name
    assert Path(result.adapter_dir) == tmp_path / "adapter"


def test_a_lora_resume_onto_another_base_is_refused(tmp_path):
    """A LoRA checkpoint holds only the adapters: resumed onto other frozen weights they would go on training
    against a base they never saw."""
    model, plan, train = setup("fp32")
    run(model, plan, train, max_steps=1, output_dir=str(tmp_path))
    other, plan, train = setup("fp32", seed=123)
    with pytest.raises(ExecutorInputError, match="another plan or settings .*base_weights sha256"):
        run(other, plan, train, output_dir=str(tmp_path), resume=True)
    same, plan, train = setup("fp32")
    assert run(same, plan, train, output_dir=str(tmp_path), resume=True, max_steps=2).optimizer_steps == 2


@pytest.mark.parametrize("change", [dict(lora_rank=8), dict(lora_targets="attention"), dict(base_dtype="nf4"),
                                    dict(double_quant=False)])
def test_a_resume_with_other_adapter_knobs_is_refused(tmp_path, change):
    knobs = dict(lora_rank=4, lora_targets="all-linear", base_dtype="fp32", double_quant=True)
    model, plan, train = setup("fp32")
    run(model, plan, train, max_steps=1, output_dir=str(tmp_path))
    knobs.update(change)
    base = knobs.pop("base_dtype")
    model = short_model("bert", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    plan = make_plan(model, data=train, batch_size=4, micro_batch_size=2, adapter="lora", base_dtype=base, **knobs)
    name = next(iter(change))
    with pytest.raises(ExecutorInputError, match=f"another plan or settings .*knobs.{name}") as error:
        run(model, plan, train, output_dir=str(tmp_path), resume=True)
    assert "\n" not in str(error.value)
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-00000001"  # nothing was overwritten


@pytest.mark.parametrize("model_type,task", [("bert", "classification"), ("gpt2", "causal-lm")])
def test_a_model_loaded_by_path_for_an_nf4_plan_is_the_in_memory_quantization(tmp_path, model_type, task):
    short_model(model_type, task).save_pretrained(tmp_path)
    loaded = load_model(tmp_path, task=task, nf4=dict(double_quant=True, compute_dtype=torch.float32))
    in_memory = short_model(model_type, task)
    quantization.quantize_block_linears(in_memory, double_quant=True)
    assert quantization.quantized_kind(loaded) == "4-bit NF4 with double quantization"
    four_bit = {n for n, p in loaded.named_parameters() if hasattr(p, "quant_state")}
    assert four_bit == {n for n, p in in_memory.named_parameters() if hasattr(p, "quant_state")} and four_bit
    batch = {"input_ids": torch.tensor([[5, 9, 11, 40, 41]])}
    for model in (loaded, in_memory):
        adapter.keep_4bit_layout(model)  # eval on the CPU would repack 4-bit weights (and fail below 64 wide)
    import bitsandbytes.functional as F

    stored = dict(in_memory.named_parameters())
    for name, p in loaded.named_parameters():  # the same 4-bit weights (gpt2's Conv1D arrives transposed)
        if name in four_bit:
            assert torch.equal(F.dequantize_4bit(p.data, p.quant_state),
                               F.dequantize_4bit(stored[name].data, stored[name].quant_state)), name
    with torch.no_grad():  # the same model, up to the order of float sums
        torch.testing.assert_close(loaded.eval()(**batch).logits, in_memory.eval()(**batch).logits,
                                   rtol=1e-5, atol=1e-6)


def test_train_by_path_loads_nf4_and_trains(tmp_path):
    short_model("bert").save_pretrained(tmp_path / "model")
    train = token_data(16)
    plan = make_plan(short_model("bert"), data=train, batch_size=8, micro_batch_size=4, adapter="lora",
                     base_dtype="nf4", lora_rank=4)
    result = autofit.train(str(tmp_path / "model"), train, plan=plan, epochs=1, lr=LR, quiet=True,
                           output_dir=str(tmp_path / "out"))
    assert result.optimizer_steps == 2 and result.adapter_dir == str(tmp_path / "out" / "adapter")
    assert quantization.quantized_kind(result.model) == "4-bit NF4 with double quantization"
    assert getattr(result.model.base_model.model, "is_quantized", False)  # loaded in 4 bits, not quantized after
