"""run_plan end to end on the CPU: training, result fields, freezing, checkpointed layers, 8-bit AdamW,
mixed precision, and the input checks that run before anything changes."""

from __future__ import annotations

import math

import pytest
import torch

from autofit.data import TokenizedData
from autofit.executor import ExecutorInputError, TrainingDivergedError, run_plan
from autofit.knobs import Precision
from autofit.layers import find_layout
from autofit.techniques import checkpointing
from autofit.techniques import optimizer as optim
from autofit.techniques.accumulation import StepSampler, run_shapes

LR = 3e-3


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def changed(before: dict[str, torch.Tensor], model, prefix: str) -> dict[str, bool]:
    """{name: weight differs from `before`} for the parameters under `prefix`."""
    out = {name: not torch.equal(before[name], p) for name, p in model.named_parameters() if name.startswith(prefix)}
    assert out, f"no parameter under {prefix!r}"
    return out


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


# ---- 1. training works -------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type, task", [("bert", "classification"), ("gpt2", "causal-lm")])
def test_loss_goes_down_and_result_is_sane(tiny, data, plan_for, model_type, task):
    model, train = tiny(model_type, task), data(24, task=task)
    plan = plan_for(model, task, train, batch_size=8, micro_batch_size=4)
    before = snapshot(model)
    result = run_plan(model, plan, train, eval=train, epochs=5, lr=LR, quiet=True)

    steps_per_epoch = math.ceil(24 / 8)  # steps of 8 examples, each cut into 2 micro-batches of 4
    assert result.optimizer_steps == 5 * steps_per_epoch == len(result.history)
    assert [r.step for r in result.history] == list(range(1, 16))
    assert [r.epoch for r in result.history] == [e for e in range(5) for _ in range(steps_per_epoch)]
    assert result.epochs_completed == 5
    assert all(r.samples == 8 and r.micro_batches == 2 for r in result.history)
    assert sum(r.samples for r in result.history) == 5 * 24
    assert not any(r.skipped for r in result.history)
    assert all(math.isfinite(r.loss) and r.loss > 0 for r in result.history)
    assert all(r.lr == pytest.approx(LR) for r in result.history)
    # Learns: later steps and the end-of-epoch evaluation (on the training data) beat the first ones.
    assert mean(r.loss for r in result.history[-3:]) < mean(r.loss for r in result.history[:3]) - 0.05
    assert [e.epoch for e in result.eval] == list(range(5))
    assert [e.step for e in result.eval] == [3, 6, 9, 12, 15]
    assert all(e.samples == 24 for e in result.eval)
    assert result.eval[-1].loss < result.eval[0].loss
    if task == "classification":
        assert 0.0 <= result.eval[-1].accuracy <= 1.0
    else:
        assert result.eval[-1].accuracy is None
    assert any(changed(before, model, "").values())

    # Result fields.
    assert 0.0 < result.padding_efficiency < 1.0  # random lengths 4..20, padded to multiples of 8
    assert result.tokens_per_second > 0 and result.samples_per_second > 0
    real_tokens = 5 * sum(train.lengths)
    assert sum(r.tokens_per_second * r.seconds for r in result.history) == pytest.approx(real_tokens, rel=1e-6)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert result.measured_peak_bytes is not None and result.measured_peak_bytes > weight_bytes
    assert result.measured_reserved_bytes is None  # CUDA only
    assert result.predicted_peak_bytes == plan.predicted.peak_bytes
    assert result.budget_bytes == plan.budget_bytes
    # make_plan's prediction is made up (a few KB): the run says the measured peak broke it
    assert "above the predicted" in result.memory_warning
    assert result.plan == plan and result.fallbacks == []
    assert result.output_dir is None
    assert result.final_loss == result.history[-1].loss
    assert model.training  # mode restored (it was in train mode)


def test_padding_efficiency_is_one_without_padding(tiny, data, plan_for):
    model, train = tiny(), data(8, min_len=8, max_len=8)
    plan = plan_for(model, data=train, micro_batch_size=4)
    result = run_plan(model, plan, train, quiet=True, measure_memory=False)
    assert result.padding_efficiency == 1.0
    assert result.measured_peak_bytes is None  # not measured


def test_max_steps_bounds_the_run(tiny, data, plan_for):
    model, train = tiny(), data(24)
    plan = plan_for(model, data=train, batch_size=8, micro_batch_size=4)  # 3 steps per epoch
    result = run_plan(model, plan, train, epochs=5, max_steps=4, lr=LR, quiet=True)
    assert result.optimizer_steps == 4 == len(result.history)
    assert [r.epoch for r in result.history] == [0, 0, 0, 1]
    assert result.epochs_completed == 1


def test_max_steps_runs_past_the_epochs_it_is_given_instead_of_them(tiny, data, plan_for):
    # the README's promise: max_steps bounds a run by optimizer steps instead of epochs (epochs=1 by default
    # ran 3 of the 7 steps asked for, without a word); a run stopped inside an epoch is evaluated at its end
    model, train = tiny(), data(24)
    plan = plan_for(model, data=train, batch_size=8, micro_batch_size=4)  # 3 steps per epoch
    result = run_plan(model, plan, train, eval=data(6), max_steps=7, lr=LR, quiet=True)
    assert result.optimizer_steps == 7 == len(result.history)
    assert [r.epoch for r in result.history] == [0, 0, 0, 1, 1, 1, 2]
    assert [(r.epoch, r.step) for r in result.eval] == [(0, 3), (1, 6), (2, 7)]


def test_the_run_is_priced_on_the_steps_it_will_train_but_its_first(tiny, data, plan_for):
    model, train = tiny(), data(24)
    plan = plan_for(model, data=train, batch_size=8, micro_batch_size=3)  # 3 steps an epoch, 3 micro-batches each
    asked = []

    def price(knobs, shapes):
        asked.append((knobs, shapes))
        return plan.predicted.model_copy(update={"activations": plan.predicted.activations + 1})

    result = run_plan(model, plan, train, max_steps=5, lr=LR, quiet=True, price_shapes=price)
    (knobs, shapes), = asked
    steps = StepSampler(24, 8).epoch_steps(0) + StepSampler(24, 8).epoch_steps(1)
    assert knobs == plan.knobs and shapes == run_shapes(steps[1:5], train.lengths, plan.knobs)
    assert result.run_predicted_allocated_bytes == plan.predicted.allocated_bytes + 1


# (n, batch, micro-batch cap): caps that divide the batch or not, above it, a batch larger than the data.
@pytest.mark.parametrize("n, batch, micro", [(20, 8, 4), (9, 4, 3), (5, 8, 2), (21, 6, 16)])
def test_every_step_trains_the_batch_only_the_last_is_short(tiny, data, plan_for, n, batch, micro):
    model, train = tiny(), data(n)
    plan = plan_for(model, data=train, batch_size=batch, micro_batch_size=micro)
    result = run_plan(model, plan, train, epochs=2, quiet=True, measure_memory=False)
    per_epoch = math.ceil(n / batch)
    assert result.optimizer_steps == 2 * per_epoch
    for epoch in range(2):
        samples = [r.samples for r in result.history if r.epoch == epoch]
        assert samples == [batch] * (n // batch) + ([n % batch] if n % batch else [])
        assert all(r.micro_batches == math.ceil(r.samples / min(micro, batch)) for r in result.history)


def test_bucketed_token_budget_steps_on_skewed_data_train_the_batch(tiny, data, plan_for):
    """The issue's setup in small: a token budget leaves one long sequence per micro-batch, yet every step
    trains the asked batch of random examples; a step with long examples simply runs more micro-batches."""
    model = tiny()
    train = data(150, min_len=3, max_len=60)
    rng = __import__("random").Random(0)
    train.input_ids[:] = [row[:max(3, int(rng.expovariate(1 / 12)))] for row in train.input_ids]  # long tail
    plan = plan_for(model, data=train, batch_size=16, micro_batch_size=16, tokens_per_micro_batch=64,
                    bucket_boundaries=(8, 16, 32, 64))
    result = run_plan(model, plan, train, epochs=2, quiet=True, measure_memory=False)
    for epoch in range(2):
        samples = [r.samples for r in result.history if r.epoch == epoch]
        assert samples == [16] * 9 + [6]
    counts = [r.micro_batches for r in result.history if r.samples == 16]
    fewest, most = plan.step.micro_batches_per_step
    assert len(set(counts)) > 1 and fewest <= min(counts) and max(counts) <= most + 1  # as the plan says
    assert result.padding_efficiency > 0.6


# ---- 2./3. freezing and checkpointed layers -----------------------------------------------------------------


def test_frozen_weights_stay_bit_identical_and_flags_come_back(tiny, data, plan_for):
    model, train = tiny(), data(16)
    model.classifier.bias.requires_grad_(False)  # the caller's own choice must survive the run
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    plan = plan_for(model, data=train, batch_size=4, micro_batch_size=4, freeze_embeddings=True, freeze_layers=1)
    before = snapshot(model)
    result = run_plan(model, plan, train, epochs=2, lr=LR, quiet=True)
    assert result.optimizer_steps == 8

    assert not any(changed(before, model, "bert.embeddings.").values())
    assert not any(changed(before, model, "bert.encoder.layer.0.").values())
    assert not any(changed(before, model, "classifier.bias").values())
    assert all(changed(before, model, "bert.encoder.layer.1.attention.self.query.weight").values())
    assert all(changed(before, model, "classifier.weight").values())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert not flags["classifier.bias"] and flags["bert.embeddings.word_embeddings.weight"]


def test_frozen_embeddings_freeze_the_tied_lm_head(tiny, data, plan_for):
    model, train = tiny("gpt2", "causal-lm"), data(8, task="causal-lm")
    assert model.lm_head.weight is model.transformer.wte.weight
    plan = plan_for(model, "causal-lm", train, micro_batch_size=4, freeze_embeddings=True)
    before = snapshot(model)
    run_plan(model, plan, train, lr=LR, quiet=True, measure_memory=False)
    assert not any(changed(before, model, "transformer.wte.").values())
    assert not any(changed(before, model, "transformer.wpe.").values())
    assert all(changed(before, model, "transformer.h.0.attn.c_attn.weight").values())
    assert all(p.requires_grad for p in model.parameters())


def count_forwards(modules) -> list[int]:
    counts = [0] * len(modules)
    for i, module in enumerate(modules):
        module.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


@pytest.mark.parametrize("model_type, task", [("bert", "classification"), ("gpt2", "causal-lm")])
@pytest.mark.parametrize("checkpoint_layers", [(1,), (0, 1)])
def test_checkpointed_layers_above_the_frozen_boundary_train(tiny, data, plan_for, checkpoint_layers,
                                                             model_type, task):
    """Layer 1's input comes from a frozen layer and needs no grad: reentrant checkpointing would train
    nothing there. The weights must move, exactly as far as without checkpointing."""
    train = data(16, task=task)
    runs = {}
    for layers in ((), checkpoint_layers):
        model = tiny(model_type, task)
        plan = plan_for(model, task, train, batch_size=4, micro_batch_size=4, freeze_embeddings=True,
                        freeze_layers=1, checkpoint_layers=layers)
        layout = find_layout(model)
        # Hooks on a sub-module of each layer run again when the layer's forward is recomputed.
        counts = count_forwards([next(iter(layer.children())) for layer in layout.layers])
        before = snapshot(model)
        result = run_plan(model, plan, train, epochs=2, lr=LR, quiet=True, measure_memory=False)
        assert result.optimizer_steps == 8
        runs[layers] = model, counts, before
    model, counts, before = runs[checkpoint_layers]
    micro_batches = 2 * 4
    # Layer 1 recomputes (checkpointed and trainable); layer 0 is frozen, runs no backward, never recomputes.
    assert counts == [micro_batches, 2 * micro_batches]
    assert runs[()][1] == [micro_batches, micro_batches]
    stack = layout.layers_path
    assert all(changed(before, model, f"{stack}.1.").values())
    assert not any(changed(before, model, f"{stack}.0.").values())
    reference = runs[()][0]
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)
    assert checkpointing.checkpointed_indices(model) == []  # the layers run their own forward again
    assert all(p.requires_grad for p in model.parameters())


# ---- 7./8. 8-bit optimizer and mixed precision ----------------------------------------------------------


def test_8bit_adamw_trains_and_keeps_embedding_state_32bit(tiny, data, plan_for, monkeypatch):
    # Tensors under 4096 elements stay 32-bit in bitsandbytes: make the embeddings (200 x 32, 128 x 32)
    # and the feed-forward matrices (32 x 128) big enough that 8-bit state would apply to them.
    model, train = tiny(vocab_size=200, max_position_embeddings=128, intermediate_size=128), data(16)
    plan = plan_for(model, data=train, batch_size=4, micro_batch_size=4, optimizer_bits=8)
    built = []
    real_build = optim.build_optimizer
    monkeypatch.setattr(optim, "build_optimizer", lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])
    before = snapshot(model)
    result = run_plan(model, plan, train, epochs=3, lr=LR, quiet=True)

    optimizer, = built
    assert "8bit" in type(optimizer).__name__.lower()
    assert result.optimizer_steps == 12 and all(math.isfinite(r.loss) for r in result.history)
    assert mean(r.loss for r in result.history[-4:]) < mean(r.loss for r in result.history[:4])
    assert all(changed(before, model, "bert.encoder.layer.0.intermediate.dense.weight").values())
    state = {id(p): s for p, s in optimizer.state.items()}

    def moment_dtype(param):
        return state[id(param)]["state1"].dtype

    for embedding in (model.bert.embeddings.word_embeddings, model.bert.embeddings.position_embeddings):
        assert embedding.weight.numel() >= optim.BNB_MIN_8BIT_SIZE
        assert moment_dtype(embedding.weight) == torch.float32
    assert moment_dtype(model.bert.encoder.layer[0].intermediate.dense.weight) == torch.uint8
    assert moment_dtype(model.bert.encoder.layer[0].attention.self.query.weight) == torch.float32  # 1024 < 4096
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("precision", [Precision.fp16, Precision.bf16])
@pytest.mark.parametrize("model_type, task", [("bert", "classification"), ("gpt2", "causal-lm")])
def test_mixed_precision_runs_on_cpu_without_nan(tiny, data, plan_for, precision, model_type, task):
    model, train = tiny(model_type, task), data(16, task=task)
    plan = plan_for(model, task, train, batch_size=4, micro_batch_size=4, precision=precision)
    before = snapshot(model)
    result = run_plan(model, plan, train, epochs=2, lr=LR, quiet=True)
    assert result.optimizer_steps == 8
    assert all(math.isfinite(r.loss) for r in result.history)
    assert sum(not r.skipped for r in result.history) >= 6  # fp16's scaler may skip a first step or two
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())  # fp32 masters
    assert any(changed(before, model, "").values())
    assert result.plan.knobs.precision is precision


# ---- 6. bad input, refused before anything changes ------------------------------------------------------


def refuse(model, plan, train, match: str, **kwargs) -> str:
    before = snapshot(model)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ExecutorInputError, match=match) as info:
        run_plan(model, plan, train, quiet=True, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert checkpointing.checkpointed_indices(model) == []
    return message


def test_empty_data_is_refused(tiny, data, plan_for):
    model = tiny()
    plan = plan_for(model, micro_batch_size=4)
    empty = TokenizedData(task="classification", input_ids=[], labels=[], num_labels=2)
    refuse(model, plan, empty, "training data is empty")
    refuse(model, plan, data(8), "evaluation data is empty", eval=empty)


def test_plan_for_another_model_is_refused(tiny, data, plan_for):
    model, train = tiny(), data(8)
    deeper = plan_for(tiny(num_hidden_layers=3), data=train)
    assert "3 layers" in refuse(model, deeper, train, "plan is for 3 layers")
    other_type = plan_for(tiny("gpt2", "classification"), data=train)
    assert "gpt2" in refuse(model, other_type, train, "plan is for a gpt2 model")
    wider = plan_for(tiny(hidden_size=64, intermediate_size=128), data=train)
    refuse(model, wider, train, "parameters")


def test_data_the_model_cannot_take_is_refused(tiny, data, plan_for):
    model = tiny()  # 64 positions, vocabulary 100
    plan = plan_for(model, micro_batch_size=4)
    too_long = data(4, min_len=10, max_len=10)
    too_long.input_ids[2] = too_long.input_ids[2] * 7  # 70 tokens
    assert "70-token" in refuse(model, plan, too_long, "64 positions")
    refuse(model, plan, data(4), "evaluation data has a 70-token", eval=too_long)
    lm = tiny("gpt2", "causal-lm")
    lm_long = data(4, task="causal-lm", min_len=65, max_len=65)
    refuse(lm, plan_for(lm, "causal-lm"), lm_long, "64 positions")
    # Within the model's positions, but padded to a multiple of 8 beyond them.
    short_positions = tiny(max_position_embeddings=60)
    message = refuse(short_positions, plan_for(short_positions, micro_batch_size=2), data(4, min_len=58, max_len=58),
                     "padded to a multiple of 8 that is 64 tokens, but the model takes at most 60 positions")
    assert "max_length <= 56" in message
    unpadded = plan_for(short_positions, batch_size=2, micro_batch_size=2, pad_to_multiple_of=None)
    result = run_plan(short_positions, unpadded, data(4, min_len=58, max_len=58), quiet=True, measure_memory=False)
    assert result.optimizer_steps == 2
    # RoBERTa's position ids start after the padding index (0 here): 66 position embeddings take 65 tokens.
    roberta = tiny("roberta", max_position_embeddings=66)
    refuse(roberta, plan_for(roberta, micro_batch_size=2, pad_to_multiple_of=None), data(4, min_len=66, max_len=66),
           "at most 65 positions")
    bad_ids = data(4)
    bad_ids.input_ids[0][0] = 100
    refuse(model, plan, bad_ids, "token id 100")
    refuse(model, plan, data(4, task="causal-lm"), "prepared for causal-lm")
    unlabelled = data(4)
    refuse(model, plan, unlabelled.model_copy(update=dict(labels=None)), "no labels, which classification needs")
    refuse(model, plan, unlabelled.model_copy(update=dict(labels=[0, 1])), "2 labels for 4 examples")


@pytest.mark.parametrize("knobs, match", [
    (dict(checkpoint_layers=(1, 2)), r"\[2\] out of range"),
    (dict(freeze_embeddings=True, freeze_layers=3), "freeze_layers=3"),
])
def test_knobs_the_model_cannot_take_are_refused(tiny, data, plan_for, knobs, match):
    """A plan (a file, say) whose knobs do not fit its own model does not even load."""
    model, train = tiny(), data(8)
    with pytest.raises(ValueError, match=match):
        plan_for(model, data=train, **knobs)


def test_other_bad_arguments_are_refused(tiny, data, plan_for, tmp_path):
    model, train = tiny(), data(8)
    plan = plan_for(model, data=train)
    refuse(model, plan, train, "epochs and max_steps", epochs=0)
    refuse(model, plan, train, "epochs and max_steps", max_steps=0)
    refuse(model, plan, train, "epochs and max_steps", epochs=1.5)  # it trained, then failed the result
    refuse(model, plan, train, "epochs and max_steps", max_steps=True)
    refuse(model, plan, train, "checkpoint_every must be a whole", output_dir=str(tmp_path), checkpoint_every=2.5)
    refuse(model, plan, train, "need an output_dir", checkpoint_every=2)
    refuse(model, plan, train, "need an output_dir", resume=True)
    refuse(model, plan, train, "checkpoint_every must be a whole number >= 1", output_dir=str(tmp_path),
           checkpoint_every=0)
    everything = plan_for(model, data=train, freeze_embeddings=True, freeze_layers=2)
    for p in [*model.bert.pooler.parameters(), *model.classifier.parameters()]:
        p.requires_grad_(False)
    refuse(model, everything, train, "nothing to optimize")


# ---- the run says when something went wrong --------------------------------------------------------------


def test_a_diverging_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny, data, plan_for, tmp_path):
    model, train = tiny(), data(16)
    plan = plan_for(model, data=train, batch_size=4, micro_batch_size=4)
    forward, calls = model.forward, []

    def nan_from_call_3(*args, **kwargs):
        calls.append(1)
        output = forward(*args, **kwargs)
        if len(calls) >= 3:
            output.loss = output.loss * float("nan")
        return output

    model.forward = nan_from_call_3
    with pytest.raises(TrainingDivergedError, match="diverged at step 3: the loss is nan") as info:
        run_plan(model, plan, train, lr=LR, output_dir=str(tmp_path), checkpoint_every=1, quiet=True,
                 measure_memory=False)
    assert "\n" not in str(info.value) and "checkpoint-00000002" in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-00000002"]  # nothing saved after it
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the nan step never updated them


def test_a_learning_rate_that_blows_up_the_weights_stops_at_once(tiny, data, plan_for, tmp_path):
    model, train = tiny(), data(16)
    plan = plan_for(model, data=train, batch_size=4, micro_batch_size=4)
    with pytest.raises(TrainingDivergedError, match="diverged at step 1: the update made the weights inf"):
        run_plan(model, plan, train, lr=1e308, output_dir=str(tmp_path), checkpoint_every=1, quiet=True,
                 measure_memory=False)
    assert list(tmp_path.iterdir()) == []  # no checkpoint of inf weights


def test_fp16_overflow_is_not_divergence(tiny, data, plan_for):
    model, train = tiny(), data(16)
    plan = plan_for(model, data=train, batch_size=4, micro_batch_size=4, precision=Precision.fp16)
    result = run_plan(model, plan, train, lr=LR, quiet=True, measure_memory=False)
    assert result.optimizer_steps == 4  # the scaler's first skipped steps do not stop anything


def test_a_run_over_its_budget_says_so(tiny, data, plan_for):
    model, train = tiny(hidden_size=64, intermediate_size=256), data(16)
    plan = plan_for(model, data=train, batch_size=4, micro_batch_size=4)
    plan = plan.model_copy(update=dict(budget_bytes=1 << 20))  # weights + AdamW alone take more
    result = run_plan(model, plan, train, quiet=True)
    assert result.measured_peak_bytes > result.budget_bytes == 1 << 20
    assert "over its 1.0 MB budget" in result.memory_warning and "\n" not in result.memory_warning


def test_token_type_ids_beyond_the_models_token_types_are_refused(tiny, data, plan_for):
    model = tiny()  # BERT: type_vocab_size 2
    plan = plan_for(model, micro_batch_size=4)
    train = data(4)
    segments = train.model_copy(update={"token_type_ids": [[0] * (len(ids) - 1) + [2] for ids in train.input_ids]})
    assert "token type id 2 but the model has 2 token types" in refuse(model, plan, segments, "token type id")
    ok = train.model_copy(update={"token_type_ids": [[0] * (len(ids) - 1) + [1] for ids in train.input_ids]})
    assert run_plan(model, plan, ok, quiet=True, measure_memory=False).optimizer_steps == 1
