"""AdamW with 32-bit or 8-bit (bitsandbytes) state.

Trade-off: 8-bit state stores each Adam moment in 1 byte with one fp32 scale per 256-element block, so
state drops from 8 to ~2 B/param. Embeddings keep 32-bit state (rare tokens' moments quantise badly; the
HF Trainer does the same) and bitsandbytes leaves tensors under 4096 elements at 32 bits. Tiny quality risk.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import torch
from torch import nn

from autofit.intmath import ceil_div
from autofit.knobs import Knobs
from autofit.techniques.quantization import bitsandbytes_quiet

BNB_BLOCK_SIZE = 256
BNB_MIN_8BIT_SIZE = 4096
FULL_LEARNING_RATE = 2e-5
"""AdamW's rate when the model's own weights train (BERT-style fine-tuning's usual)."""
ADAPTER_LEARNING_RATE = 2e-4
"""Under LoRA: the adapters start at zero and are a small share of the weights, and at 2e-5 they barely move
in a few epochs; peft's and QLoRA's usual rate is 1e-4 to 2e-4."""


def default_learning_rate(knobs: Knobs) -> float:
    """The rate a run uses when none is given: the adapters' under LoRA, else full fine-tuning's."""
    return ADAPTER_LEARNING_RATE if knobs.adapter == "lora" else FULL_LEARNING_RATE


def state_bytes(param_numels: list[int], embedding_numels: list[int], bits: int) -> int:
    """Bytes of AdamW state (two moments) for trainable tensors of the given sizes. Pure."""
    total = 0
    embedding_left = list(embedding_numels)
    for numel in param_numels:
        if numel in embedding_left:
            embedding_left.remove(numel)
            total += 8 * numel
        elif bits == 32 or numel < BNB_MIN_8BIT_SIZE:
            total += 8 * numel
        else:
            blocks = ceil_div(numel, BNB_BLOCK_SIZE)
            total += 2 * (numel + 4 * blocks)
    return total


# ---- apply side ------------------------------------------------------------------------------------------

class OptimizerUnavailableError(ValueError):
    """8-bit AdamW was asked for but bitsandbytes cannot be imported or cannot run on this device."""


class NoTrainableParametersError(ValueError):
    """Everything is frozen: there is nothing to optimize."""


def embedding_weights(model: nn.Module) -> list[nn.Parameter]:
    """Trainable weights of every nn.Embedding (token, position, type, relative): these keep 32-bit state."""
    seen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.weight.requires_grad:
            seen.setdefault(id(module.weight), module.weight)
    return list(seen.values())


def state_bytes_for(model: nn.Module, bits: int) -> int:
    """`state_bytes` for a model's trainable parameters, with its embeddings kept at 32 bits."""
    trainable = [p.numel() for p in model.parameters() if p.requires_grad]
    return state_bytes(trainable, [p.numel() for p in embedding_weights(model)], bits)


def param_groups(model: nn.Module, weight_decay: float, *, embeddings_32bit: bool = False) -> list[dict]:
    """Trainable params in groups: decayed matrices, non-decayed 1-D tensors (biases, norm weights), and
    (for 8-bit state) the embeddings, which carry `optim_bits=32`."""
    embedding_ids = {id(p) for p in embedding_weights(model)} if embeddings_32bit else set()
    decay, no_decay, embeddings = [], [], []
    for p in model.parameters():  # deduplicated: a tied LM head appears once
        if not p.requires_grad:
            continue
        if id(p) in embedding_ids:
            embeddings.append(p)
        else:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if embeddings:
        groups.append({"params": embeddings, "weight_decay": weight_decay, "optim_bits": 32})
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, knobs: Knobs, *, lr: float, weight_decay: float = 0.01,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                    fallback: bool = False) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters only, with 32-bit or 8-bit state as `knobs.optimizer_bits` says.

    With `fallback=True` an unavailable bitsandbytes warns and gives 32-bit AdamW instead of raising."""
    if not any(p.requires_grad for p in model.parameters()):
        raise NoTrainableParametersError("every parameter is frozen; nothing to optimize")
    if knobs.optimizer_bits == 8:
        device = next(p.device for p in model.parameters() if p.requires_grad)
        try:
            adamw8bit = _bnb_adamw8bit(device.type)
        except OptimizerUnavailableError as error:
            if not fallback:
                raise
            warnings.warn(f"{error}; falling back to 32-bit AdamW", stacklevel=2)
        else:
            groups = param_groups(model, weight_decay, embeddings_32bit=True)
            return adamw8bit(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, foreach=True)


@lru_cache(maxsize=None)
def _bnb_adamw8bit(device_type: str) -> type:
    """bitsandbytes' AdamW8bit, honouring a per-group `optim_bits`, after a probe step on `device_type`."""
    try:
        with bitsandbytes_quiet():
            import bitsandbytes as bnb
    except Exception as error:  # ImportError, or a broken native library raising anything at import
        raise OptimizerUnavailableError(f"8-bit AdamW needs bitsandbytes, which cannot be imported: {error}") from None

    class AdamW8bitGroupBits(bnb.optim.AdamW8bit):
        # bitsandbytes reads per-parameter overrides from a process-wide manager keyed by (group, index),
        # which leaks between optimizers; a group's own `optim_bits` is local and explicit.
        def get_config(self, gindex, pindex, group):
            config = super().get_config(gindex, pindex, group)
            config["optim_bits"] = group.get("optim_bits", self.args.optim_bits)
            return config

    try:
        probe = nn.Parameter(torch.zeros(BNB_MIN_8BIT_SIZE, device=device_type))
        probe.grad = torch.ones_like(probe)
        AdamW8bitGroupBits([probe], lr=1e-3).step()
    except Exception as error:
        raise OptimizerUnavailableError(
            f"bitsandbytes 8-bit AdamW cannot run on {device_type!r}: {type(error).__name__}: {error}") from None
    return AdamW8bitGroupBits
