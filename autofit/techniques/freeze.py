"""Freezing: the input embeddings and the bottom k transformer layers get no gradient.

Trade-off: saves their gradients and optimizer state, and (because nothing below the boundary needs a
gradient) the activations and backward of every frozen layer; costs some quality risk, more with depth.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel
from torch import nn

from autofit.knobs import Knobs
from autofit.layers import find_layout


class FreezeReport(BaseModel):
    """What `apply` froze, in tensors and elements."""

    embeddings_frozen: bool
    frozen_layers: int
    frozen_tensors: int
    frozen_numel: int
    trainable_tensors: int
    trainable_numel: int


# ---- pure side -------------------------------------------------------------------------------------------


def trainable_numel(embedding_numel: int, layer_numels: Sequence[int], head_numel: int, knobs: Knobs) -> int:
    """Parameters that still train under `knobs`, from the sizes of a model's three parts."""
    knobs.validate_for(len(layer_numels))
    embeddings = 0 if knobs.freeze_embeddings else embedding_numel
    return embeddings + sum(layer_numels[knobs.freeze_layers:]) + head_numel


def frozen_fraction(embedding_numel: int, layer_numels: Sequence[int], head_numel: int, knobs: Knobs) -> float:
    """Share of all parameters frozen by `knobs` (a rough quality-risk signal for the search)."""
    total = embedding_numel + sum(layer_numels) + head_numel
    return 1.0 - trainable_numel(embedding_numel, layer_numels, head_numel, knobs) / total


# ---- apply side ------------------------------------------------------------------------------------------


def apply(model: nn.Module, knobs: Knobs) -> FreezeReport:
    """Set requires_grad=False on the embeddings and the first `knobs.freeze_layers` layers.

    Only freezes: parameters a caller froze before stay frozen. Weights tied to the input embedding
    (e.g. gpt2's LM head) are the same tensor and freeze with it. Raises UnmappableModelError when the
    model has no recognisable layer stack, ValueError when `knobs` do not fit its depth."""
    layout = find_layout(model)
    knobs.validate_for(layout.num_layers)
    to_freeze: list[nn.Parameter] = list(layout.embedding_params) if knobs.freeze_embeddings else []
    for layer in layout.layers[: knobs.freeze_layers]:
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
