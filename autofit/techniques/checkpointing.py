"""Selective gradient checkpointing: chosen layers keep only their input and recompute the rest in backward.

Trade-off: saves the activations a checkpointed layer would keep for backward (all but its input);
costs one extra forward of that layer per step. Non-reentrant, so frozen lower layers keep gradients flowing.

The knob in one place: the memory terms below (what a checkpointed layer keeps, leaves and needs in its
forward and backward, which memory.py's step replay adds up), the time term (`recomputed_layers`: cost.py
adds one forward for each) and the apply side. search/space.py says which layers the search may choose.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from autofit.knobs import Knobs
from autofit.layers import find_layout
from autofit.profiler.schema import BlockActivations
from autofit.techniques import freeze

CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past", "cache")
"""Names of KV-cache arguments of HF layers; a cache written in forward would be written again by the
recompute (and the replayed attention would see twice the keys)."""


class CheckpointingError(ValueError):
    """Layer indices that do not exist in the model."""


# ---- pure side -------------------------------------------------------------------------------------------


def recomputed_layers(knobs: Knobs, num_layers: int) -> list[int]:
    """Checkpointed layers that really recompute in backward: those that train (frozen layers below the
    boundary run no backward), within the model's depth. The memory and time models both ask this."""
    return [i for i in knobs.checkpoint_layers if i < num_layers and freeze.trains("layer", i, knobs)]


def kept_bytes(input_bytes: float, shared_args_bytes: float) -> float:
    """What a checkpointed layer keeps from its forward to its backward: its input (the previous block's
    output) and, for the lowest checkpointed layer only, the arguments every checkpointed layer shares (an
    attention mask, DeBERTa's relative positions), which live until the last recompute."""
    return input_bytes + shared_args_bytes


def forward_leftover_bytes(acts: BlockActivations, batch: int, seq: int) -> float:
    """What a checkpointed layer's forward leaves until the model's forward returns: autocast's cached
    low-precision weight copies (measured; none when not)."""
    return acts.checkpointed_leftover(batch, seq) if acts.checkpointed_leftover is not None else 0.0


def forward_transient_bytes(acts: BlockActivations, batch: int, seq: int) -> float:
    """The transient of a checkpointed layer's forward (it saves nothing inside, so it differs)."""
    if acts.checkpointed_forward_transient is not None:
        return acts.checkpointed_forward_transient(batch, seq)
    return acts.forward_transient(batch, seq)


def backward_transient_bytes(acts: BlockActivations, batch: int, seq: int, *, needs_input_grad: bool,
                             grad_out: float, frozen_tied_bytes: float) -> float:
    """Bytes above what is kept while a checkpointed layer's backward runs: the recompute brings back what
    the layer saves, then its own backward runs (measured together when the profile has it)."""
    if acts.recompute_backward_transient is not None:
        # above a frozen boundary the recompute saves only what the weights' gradients need
        saved = acts.saved if needs_input_grad else acts.saved_first_trainable
        return saved(batch, seq) + max(0.0, acts.recompute_backward_transient(batch, seq) - frozen_tied_bytes)
    # profiles without the measurement: the recompute brings back what the block saves, while the
    # gradient flowing in waits; then the block's own backward runs
    return acts.saved(batch, seq) + max(grad_out + acts.forward_transient(batch, seq),
                                        acts.backward_transient(batch, seq))


# ---- apply side ------------------------------------------------------------------------------------------


def _checkpointed_forward(layer: nn.Module, previous: Any, *args: Any, **kwargs: Any) -> Any:
    forward = previous if previous is not None else partial(type(layer).forward, layer)
    if not (torch.is_grad_enabled() and layer.training):
        return forward(*args, **kwargs)  # no backward will replay it (eval, no_grad): run as is, cache included
    args, kwargs = _without_cache(args, kwargs)
    # preserve_rng_state (the default) replays dropout masks exactly in the recompute.
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _without_cache(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Drop KV caches, passed by name or (gpt2) by position, from a layer call that will be replayed."""
    from transformers.cache_utils import Cache

    args = tuple(None if isinstance(a, Cache) else a for a in args)
    kwargs = {k: None if k in CACHE_KWARGS or isinstance(v, Cache) else v for k, v in kwargs.items()}
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    return args, kwargs


def is_checkpointed(layer: nn.Module) -> bool:
    forward = layer.__dict__.get("forward")
    return isinstance(forward, partial) and forward.func is _checkpointed_forward


def apply(model: nn.Module, layer_indices: Sequence[int]) -> None:
    """Checkpoint exactly the layers `layer_indices` of the model's layer stack (others are restored).

    The layer's `forward` is wrapped on the instance, so its class, parameters and state-dict keys stay
    unchanged, hooks stay outside the checkpoint, and a deep copy wraps the copied layer."""
    layout = find_layout(model)
    wanted = sorted(set(layer_indices))
    bad = [i for i in wanted if not 0 <= i < layout.num_layers]
    if bad:
        raise CheckpointingError(f"cannot checkpoint layers {bad}: the model has {layout.num_layers} layers")
    if _hf_checkpointing_on(model):
        # HF's own all-layer checkpointing would nest inside ours and checkpoint every layer anyway.
        warnings.warn("disabling the model's built-in gradient checkpointing; autofit checkpoints "
                      f"layers {wanted} only", stacklevel=2)
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()
    remove(model)
    for i in wanted:
        layer = layout.layers[i]
        previous = layer.__dict__.get("forward")  # e.g. a hook-installed forward (accelerate) stays inside
        layer.forward = partial(_checkpointed_forward, layer, previous)


def _hf_checkpointing_on(model: nn.Module) -> bool:
    """Whether transformers' own checkpointing is on; transformers 5 renamed the property (the old name warns)."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def checkpointed_indices(model: nn.Module) -> list[int]:
    """Indices of the layers `apply` checkpointed."""
    return [i for i, layer in enumerate(find_layout(model).layers) if is_checkpointed(layer)]


def remove(model: nn.Module) -> None:
    """Undo `apply`: every layer runs its own forward again."""
    for module in model.modules():
        if is_checkpointed(module):
            previous = module.__dict__["forward"].args[1]
            if previous is None:
                del module.forward
            else:
                module.forward = previous
