"""Tiny randomly initialised transformers (2 layers, hidden 32) for the technique tests. No network."""

import torch
from transformers import (CONFIG_MAPPING, AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoModelForTokenClassification)

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
HEADS = {"classification": AutoModelForSequenceClassification, "causal-lm": AutoModelForCausalLM,
         "token-classification": AutoModelForTokenClassification}
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "dropout": 0.0,
              "attention_dropout": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def tiny_model(model_type: str, task: str = "classification", *, dropout: bool = False, seed: int = 0, **kw):
    """A tiny fp32 model of `model_type` with `task`'s head, eager attention, a pad token id of 0."""
    torch.manual_seed(seed)
    config = CONFIG_MAPPING[model_type](**{**TINY[model_type], **kw})
    if not dropout:
        for key, value in NO_DROPOUT.items():
            if hasattr(config, key):
                setattr(config, key, value)
    config.pad_token_id = 0
    config._attn_implementation = "eager"
    return HEADS[task].from_config(config).float()


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
