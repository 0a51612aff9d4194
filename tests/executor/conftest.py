"""Tiny models, random token data and hand-built Plans for the executor tests (no planner, no network)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoModelForSequenceClassification

from autofit.data import TokenizedData
from autofit.devices import get_device
from autofit.knobs import Knobs
from autofit.plan import MemoryBreakdown, Plan, TimePrediction
from autofit.workload import LengthHistogram, Workload

VOCAB = 100
CONFIGS = {
    "bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 vocab_size=VOCAB, max_position_embeddings=64, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0),
    "roberta": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    vocab_size=VOCAB, max_position_embeddings=64, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=1,
                 eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
}


def tiny_model(model_type: str = "bert", task: str = "classification", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = CONFIG_MAPPING[model_type](**{**CONFIGS[model_type], **overrides})
    config.pad_token_id = 0
    config._attn_implementation = "eager"
    head = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    return head.from_config(config).float()


def token_data(n: int = 24, *, task: str = "classification", min_len: int = 4, max_len: int = 20,
               seed: int = 0) -> TokenizedData:
    """Random ids (never the pad id 0) of random lengths; the label says whether token 7 occurs, so a
    model can learn it."""
    rng = random.Random(seed)
    ids = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(min_len, max_len))] for _ in range(n)]
    if task == "causal-lm":
        return TokenizedData(task=task, input_ids=ids)
    return TokenizedData(task=task, input_ids=ids, labels=[int(7 in row) for row in ids], num_labels=2)


def make_plan(model, task: str = "classification", data: TokenizedData | None = None, batch_size: int = 8,
              **knobs) -> Plan:
    """A Plan for `model` with the given knobs and a made-up prediction (the executor only compares it)."""
    layers = model.config.num_hidden_layers
    lengths = data.lengths if data is not None else [16]
    k = Knobs(**knobs)
    return Plan(
        model_id=f"tiny-{model.config.model_type}", model_type=model.config.model_type, num_layers=layers,
        num_params=sum(p.numel() for p in model.parameters()), task=task, budget_bytes=1 << 30,
        device=get_device("cpu"), policy="balanced", headroom_bytes=0, knobs=k,
        predicted=MemoryBreakdown(weights=1000, gradients=1000, optimizer_state=2000, activations=500,
                                  temporaries=100, overhead=0, peak_phase="backward"),
        time=TimePrediction(step_seconds=0.01, epoch_seconds=0.1, samples_per_second=100.0),
        workload=Workload(task=task, lengths=LengthHistogram.from_lengths(lengths),
                          batch_size=batch_size, from_data=data is not None),
    )


# The helpers as fixtures (importing from a conftest module is fragile when several exist).
@pytest.fixture
def tiny():
    return tiny_model


@pytest.fixture
def data():
    return token_data


@pytest.fixture
def plan_for():
    return make_plan


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
