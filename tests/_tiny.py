"""The tests' one source of tiny models and data: randomly initialised transformers (2 layers, hidden 32),
random batches and token data, and hand-built Plans. No network."""

from __future__ import annotations

import random

import torch
from transformers import (CONFIG_MAPPING, AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoModelForTokenClassification)

from autofit.data import TokenizedData
from autofit.devices import get_device
from autofit.knobs import Knobs
from autofit.plan import MemoryBreakdown, Plan, TimePrediction
from autofit.workload import LengthHistogram, Workload

TINY = {
    "bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100),
    "roberta": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    vocab_size=100),
    "electra": dict(hidden_size=32, embedding_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, vocab_size=100),
    "distilbert": dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=100),
    "deberta-v2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       vocab_size=100, relative_attention=True, position_buckets=16, pos_att_type=["p2c", "c2p"]),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, vocab_size=100, bos_token_id=1, eos_token_id=2),
    "llama": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=64, vocab_size=100),
}
SHORT_POSITIONS = {"bert": dict(max_position_embeddings=64), "roberta": dict(max_position_embeddings=64),
                   "gpt2": dict(n_positions=64)}
"""Position tables of 64: what the executor, API, CLI and profiler tests train with."""
VOCAB = 100
HEADS = {"classification": AutoModelForSequenceClassification, "causal-lm": AutoModelForCausalLM,
         "token-classification": AutoModelForTokenClassification}
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "dropout": 0.0,
              "attention_dropout": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def short_config(model_type: str) -> dict:
    """The config fields of a tiny `model_type` with 64-position tables (a config.json's, less model_type)."""
    return {**TINY[model_type], **SHORT_POSITIONS[model_type]}


def tiny_model(model_type: str = "bert", task: str = "classification", *, dropout: bool = False, seed: int = 0,
               **overrides):
    """A tiny fp32 model of `model_type` with `task`'s head, eager attention, a pad token id of 0. Dropout is
    off unless `dropout` (or a dropout probability given in `overrides`)."""
    torch.manual_seed(seed)
    config = CONFIG_MAPPING[model_type](**{**TINY[model_type], **overrides})
    if not dropout:
        for key, value in NO_DROPOUT.items():
            if hasattr(config, key) and key not in overrides:
                setattr(config, key, value)
    config.pad_token_id = 0
    config._attn_implementation = "eager"
    return HEADS[task].from_config(config).float()


def short_model(model_type: str = "bert", task: str = "classification", seed: int = 0, **overrides):
    """A tiny model with 64-position tables (bert, roberta, gpt2), dropout off unless overridden."""
    return tiny_model(model_type, task, seed=seed, **{**SHORT_POSITIONS[model_type], **overrides})


def random_batch(batch: int = 3, seq: int = 12, vocab: int = 100, seed: int = 1, task: str = "classification"):
    """Input ids (no pad id 0), a right-padded attention mask with uneven lengths, and labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(1, batch):
        mask[row, seq - 2 * row:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    if task == "classification":
        labels = torch.randint(0, 2, (batch,), generator=g)
    else:
        labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


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
