"""Freezing: the input embeddings and the bottom k transformer layers get no gradient.

Trade-off: saves their gradients and optimizer state, and (because nothing below the boundary needs a
gradient) the activations and backward of every frozen layer; costs some quality risk, more with depth.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from pydantic import BaseModel
from torch import nn

from autofit.knobs import Knobs
from autofit.layers import find_layout

B = TypeVar("B")


class FreezeReport(BaseModel):
    """What `apply` froze, in tensors and elements."""

    embeddings_frozen: bool
    frozen_layers: int
    frozen_tensors: int
    frozen_numel: int
    trainable_tensors: int
    trainable_numel: int


# ---- pure side -------------------------------------------------------------------------------------------


def trains(kind: str, index: int, knobs: Knobs, task_head: bool = True) -> bool:
    """Whether copy `index` of a block of `kind` ("embeddings", "layer", "head") trains under `knobs`.
    Under LoRA the base is frozen: every layer trains its adapters, the head only its task layer's copy
    (`task_head`: it has one; a causal LM's head has none)."""
    if knobs.adapter == "lora":
        return kind == "layer" or (kind == "head" and task_head)
    if kind == "embeddings":
        return not knobs.freeze_embeddings
    if kind == "layer":
        return index >= knobs.freeze_layers
    return True


@dataclass(frozen=True)
class BlockCopy(Generic[B]):
    """One executed copy of a block (layers expanded), bottom-up, and what freezing makes of it."""

    block: B
    index: int
    """Which copy of `block` (the layer index for the layer stack)."""
    trains: bool
    """Its weights get gradients."""
    needs_input_grad: bool
    """Something below it trains, so its backward must also compute its input's gradient."""


def block_copies(blocks: Iterable[B], knobs: Knobs) -> list[BlockCopy[B]]:
    """Every copy of every block (anything with `kind` and `count`, e.g. a profile's BlockProfiles),
    bottom-up, with whether it trains and whether its input needs a gradient: the one answer to "what
    trains" that the memory model, the time model and `apply` share."""
    copies: list[BlockCopy[B]] = []
    below_trains = False
    for block in blocks:
        for index in range(block.count):
            trainable = trains(block.kind, index, knobs, task_head=bool(getattr(block, "task_head_numels", True)))
            copies.append(BlockCopy(block, index, trainable, below_trains))
            below_trains = below_trains or trainable
    return copies


# ---- apply side ------------------------------------------------------------------------------------------


def apply(model: nn.Module, knobs: Knobs) -> FreezeReport:
    """Set requires_grad=False on the embeddings and the first `knobs.freeze_layers` layers.

    Only freezes: parameters a caller froze before stay frozen. Weights tied to the input embedding
    (e.g. gpt2's LM head) are the same tensor and freeze with it. Raises UnmappableModelError when the
    model has no recognisable layer stack, ValueError when `knobs` do not fit its depth."""
    layout = find_layout(model)
    knobs.validate_for(layout.num_layers)
    to_freeze: list[nn.Parameter] = [] if trains("embeddings", 0, knobs) else list(layout.embedding_params)
    for index, layer in enumerate(layout.layers):
        if not trains("layer", index, knobs):
            to_freeze.extend(layer.parameters())
    for p in to_freeze:
        p.requires_grad_(False)
    params = list(model.parameters())  # deduplicated
    frozen = [p for p in params if not p.requires_grad]
    trainable = [p for p in params if p.requires_grad]
    return FreezeReport(
        embeddings_frozen=knobs.freeze_embeddings,
        frozen_layers=knobs.freeze_layers,
        frozen_tensors=len(frozen),
        frozen_numel=sum(p.numel() for p in frozen),
        trainable_tensors=len(trainable),
        trainable_numel=sum(p.numel() for p in trainable),
    )
