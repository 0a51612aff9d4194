"""autofit.plan / autofit.train on tiny models, and the memory model against peaks measured while training.

The memory model (autofit.memory.predict_peak, fed by the fake-tensor profile) and the measurement
(autofit.measure, a live-tensor tracker used by the executor) are independent code: they must agree."""

import math
import random

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import autofit
from autofit.api import make_workload, plan_from_profile, target_device
from autofit.executor import run_plan
from autofit.knobs import Knobs
from autofit.memory import param_state, predict_peak
from autofit.plan import Plan
from autofit.profiler import profile_model
from autofit.workload import LengthHistogram

from _tiny import short_model as tiny_model
from _tiny import token_data

# A tiny BERT, a little wider than the executor's (hidden 64), so that every memory term is visible:
# three layers to freeze and checkpoint, matrices of >= 4096 elements for 8-bit AdamW.
BERT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=3,
            max_position_embeddings=128)
WORDS = [f"w{i}" for i in range(40)]


def make_rows(n: int, *, seed: int = 0, min_words: int = 3, max_words: int = 40) -> list[dict]:
    """{"text", "label"} rows; the label says whether w7 occurs, so a model can learn it."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        rows.append({"text": " ".join(words), "label": int("w7" in words)})
    return rows


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained offline on the generated vocabulary: [PAD] = 0, [CLS] x [SEP]."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")),
                                                 ("[SEP]", tok.token_to_id("[SEP]"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")
    assert fast.pad_token_id == 0 and len(fast) < 100  # the tiny models' pad id and vocabulary
    return fast


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def bert():
    return tiny_model("bert", "classification", **BERT)


@pytest.fixture(scope="module")
def profile(bert):
    return profile_model(bert, task="classification")


def _trainable_numel(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- plan ---------------------------------------------------------------------------------------------------


def test_plan_fits_the_budget_keeps_the_batch_and_round_trips(bert, profile, tmp_path):
    cpu = target_device("cpu")
    workload = make_workload("classification", seq_len=128, batch_size=16, lengths=None)
    plain = predict_peak(profile, Knobs(micro_batch_size=16), workload, cpu)
    budget = int(plain.peak_bytes * 0.6)  # the plain plan does not fit: knobs must turn

    plan = autofit.plan(bert, budget, seq_len=128, batch_size=16, device="cpu")

    assert plan.budget_bytes == budget and plan.headroom_bytes > 0
    assert plan.predicted.peak_bytes <= plan.budget_bytes - plan.headroom_bytes
    assert plan.batch_size == 16 and plan.step.batch_size == 16
    assert plan.knobs != Knobs(micro_batch_size=16)
    assert plan.num_params == sum(p.numel() for p in bert.parameters()) and plan.num_layers == 3
    assert plan.workload.from_data is False and plan.workload.lengths == LengthHistogram.fixed(128, 10_000)
    assert plan.time.measured  # planned for the CPU: its blocks were timed there
    # The prediction is the memory model's for the chosen knobs (the fake-tensor bytes are deterministic).
    assert predict_peak(profile, plan.knobs, plan.workload, cpu) == plan.predicted
    # JSON in, JSON out.
    assert Plan.model_validate_json(plan.to_json()) == plan
    assert Plan.load(plan.save(tmp_path / "plan.json")) == plan


def test_plan_from_data_uses_the_real_lengths(bert, profile, tok):
    rows = make_rows(60, min_words=3, max_words=60)
    plan = autofit.plan(bert, "1GB", seq_len=48, batch_size=8, data=rows, tokenizer=tok, device="cpu",
                        profile=profile)
    lengths = [min(len(tok(r["text"])["input_ids"]), 48) for r in rows]
    assert plan.workload.from_data is True
    assert plan.workload.lengths == LengthHistogram.from_lengths(lengths)
    assert plan.workload.lengths.max_length == 48 > min(lengths)  # cut at seq_len, and really varied
    assert plan.workload.lengths.num_samples == 60
    assert plan.batch_size == 8
    # Special tokens count: a 3-word text is 5 tokens.
    assert len(tok("w1 w2 w3")["input_ids"]) == 5


def test_no_plan_fits_names_a_budget_that_does(bert, profile):
    with pytest.raises(autofit.NoPlanFitsError) as caught:
        autofit.plan(bert, "1MB", seq_len=128, batch_size=16, device="cpu", profile=profile)
    error = caught.value
    assert error.budget_bytes == 2**20 < error.smallest_budget_bytes
    assert "smallest budget" in str(error)
    plan = autofit.plan(bert, error.smallest_budget_bytes, seq_len=128, batch_size=16, device="cpu",
                        profile=profile)
    assert plan.predicted.peak_bytes <= plan.budget_bytes - plan.headroom_bytes
    assert plan.batch_size == 16 and plan.step.batch_size == 16


def test_make_workload_and_target_device():
    fixed = make_workload("causal-lm", seq_len=256, batch_size=4, lengths=None, num_samples=10)
    assert fixed.lengths == LengthHistogram.fixed(256, 10) and not fixed.from_data
    real = make_workload("classification", seq_len=256, batch_size=4, lengths=[5, 0, 7, 5])
    assert real.from_data and real.lengths == LengthHistogram(lengths=[1, 5, 7], counts=[1, 2, 1])
    with pytest.raises(ValueError):
        make_workload("classification", seq_len=256, batch_size=4, lengths=[])
    if not torch.cuda.is_available():
        assert target_device(None).kind == "cuda"  # planning: for a GPU even on a machine without one
        assert target_device(None, train=True).kind == "cpu"  # training: where it will really run
    assert target_device("t4").supports_bf16 is False
    with pytest.raises(ValueError, match="unknown device"):
        target_device("tpu-v9")


# ---- train --------------------------------------------------------------------------------------------------


def _mean_loss(model, rows, tok) -> float:
    enc = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(**enc, labels=torch.tensor([r["label"] for r in rows])).loss.item()


def test_train_learns_within_the_predicted_peak(tok):
    model = tiny_model("bert", "classification", seed=1)
    rows = make_rows(64, seed=1, max_words=24)
    before = _mean_loss(model, rows, tok)
    result = autofit.train(model, rows, budget="1GB", tokenizer=tok, epochs=2, quiet=True, batch_size=8,
                           lr=2e-3, eval_data=rows)
    losses = [s.loss for s in result.history]
    print("loss before", round(before, 3), "steps", [round(x, 3) for x in losses],
          "eval", [round(e.loss, 3) for e in result.eval])
    assert result.epochs_completed == 2 and result.optimizer_steps == len(losses) >= 16
    assert all(math.isfinite(x) for x in losses)
    assert len(result.eval) == 2
    assert result.eval[-1].loss < before - 0.02  # trained: the same examples' loss went down
    assert result.eval[-1].loss == pytest.approx(_mean_loss(model, rows, tok), rel=1e-3)  # on the model we hold
    assert result.plan.workload.from_data and result.plan.batch_size == 8
    assert [r.samples for r in result.history] == [8] * len(losses)
    assert result.plan.device.kind == "cpu"
    print("measured", result.measured_peak_bytes, "predicted", result.predicted_allocated_bytes)
    assert 0 < result.measured_peak_bytes <= result.predicted_allocated_bytes * 1.10


def test_train_needs_a_budget_or_a_plan(tok):
    with pytest.raises(ValueError, match="budget"):
        autofit.train(tiny_model("bert"), make_rows(4), tokenizer=tok)


# ---- memory model against measured peaks ----------------------------------------------------------------------

CASES = {
    "plain": dict(),
    "checkpoint all": dict(checkpoint_layers=(0, 1, 2)),
    "freeze emb+1": dict(freeze_embeddings=True, freeze_layers=1),
    "8-bit adam": dict(optimizer_bits=8),
    "bf16": dict(precision="bf16"),
    "micro 2 x 4": dict(micro_batch_size=2),  # steps of 8: four micro-batches of 2
}
TOLERANCE = 0.10


@pytest.fixture(scope="module")
def runs(profile):
    """Case -> (predicted MemoryBreakdown, measured peak bytes) for a few steps of the tiny BERT."""
    data = token_data(32, min_len=56, max_len=64)
    cpu = target_device("cpu")
    workload = make_workload("classification", seq_len=64, batch_size=8, lengths=data.lengths)
    base = plan_from_profile(profile, workload, 1 << 30, cpu)
    found = {}
    for name, knobs in CASES.items():
        knobs = Knobs(**{"micro_batch_size": 8, **knobs})
        predicted = predict_peak(profile, knobs, workload, cpu)
        plan = base.model_copy(update={"knobs": knobs, "predicted": predicted})
        result = run_plan(tiny_model("bert", "classification", **BERT), plan, data, max_steps=3, quiet=True)
        found[name] = predicted, result.measured_peak_bytes
    for name, (predicted, measured) in found.items():
        print(f"{name:15s} predicted {predicted.allocated_bytes:>9,} measured {measured:>9,} "
              f"error {(predicted.allocated_bytes - measured) / measured:+.1%} at {predicted.peak_phase}")
    return found


@pytest.mark.parametrize("case", CASES)
def test_predicted_peak_matches_the_measured_peak(runs, case):
    predicted, measured = runs[case]
    assert measured > 0
    error = (predicted.allocated_bytes - measured) / measured
    assert abs(error) <= TOLERANCE, f"{case}: predicted {predicted.allocated_bytes:,}, measured {measured:,}"


@pytest.mark.parametrize("case", [c for c in CASES if c != "plain"])
def test_every_technique_lowers_both_peaks(runs, case):
    (plain, plain_measured), (predicted, measured) = runs["plain"], runs[case]
    assert measured < plain_measured
    assert predicted.allocated_bytes < plain.allocated_bytes


def test_weights_gradients_and_optimizer_state_terms(runs, profile):
    model = tiny_model("bert", "classification", **BERT)
    numel = sum(p.numel() for p in model.parameters())
    plain = runs["plain"][0]
    assert plain.weights == 4 * numel
    assert plain.optimizer_state == 8 * numel  # AdamW: two fp32 moments
    # Freezing: gradients and state for the trainable parameters only.
    model.bert.embeddings.requires_grad_(False)
    model.bert.encoder.layer[0].requires_grad_(False)
    trainable = _trainable_numel(model)
    assert trainable < numel
    weights, grads, state, trainable_numel = param_state(profile, Knobs(freeze_embeddings=True, freeze_layers=1))
    assert (weights, grads, state, trainable_numel) == (4 * numel, 4 * trainable, 8 * trainable, trainable)
    frozen = runs["freeze emb+1"][0]
    assert frozen.optimizer_state == 8 * trainable and frozen.gradients <= 4 * trainable
    # 8-bit AdamW: 2 B/param + an fp32 scale per 256-element block; embeddings and small tensors stay 32-bit.
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    expected = sum(8 * p.numel() if id(p) in embeddings or p.numel() < 4096
                   else 2 * p.numel() + 8 * math.ceil(p.numel() / 256) for p in model.parameters())
    eight = runs["8-bit adam"][0]
    assert eight.optimizer_state == expected < plain.optimizer_state


def test_checkpointing_and_precision_shrink_the_activations(runs):
    plain = runs["plain"][0]
    assert runs["checkpoint all"][0].activations < plain.activations
    assert runs["bf16"][0].activations < plain.activations
    assert runs["micro 2 x 4"][0].activations < plain.activations
    assert runs["micro 2 x 4"][0].peak_shape[0] == 2 and plain.peak_shape[0] == 8
