"""The Profile: the numbers the profiler gathers and every later stage reads. Plain, validated, serialisable.

Sizes that depend on the micro-batch shape are stored as a `ShapeFit`, fit by least squares from a few
small real shapes: value(batch, seq) = const + per_batch * B + per_token * B*S + per_token_seq * B*S*S
+ per_seq * S + per_seq_sq * S*S. The B term is per-example tensors (a classifier's pooled output and
logits). The B*S*S term is attention scores/probs of implementations that materialise them
(eager); it is ~0 for flash/memory-efficient attention. The batch-free S and S*S terms are tensors shared
by the whole batch: DeBERTa's relative-position tables, a causal mask built once.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

BlockKind = Literal["embeddings", "layer", "head"]


class ShapeFit(BaseModel):
    """value(batch, seq) = const + per_batch*B + per_token*B*S + per_token_seq*B*S*S + per_seq*S
    + per_seq_sq*S*S (bytes, seconds or FLOPs)."""

    model_config = ConfigDict(frozen=True)

    const: float = 0.0
    per_batch: float = 0.0
    per_token: float = 0.0
    per_token_seq: float = 0.0
    per_seq: float = 0.0
    per_seq_sq: float = 0.0
    small: ShapeFit | None = None
    """The fit used instead for micro-batches of at most `small_tokens` tokens (transients: the op at the
    peak changes as shapes grow, so one envelope over all shapes is loose at the small end)."""
    small_tokens: int = 0
    measured: tuple[tuple[int, int, float], ...] = ()
    """(batch, seq, value) where an envelope was measured. Within their grid they bound the value too: see
    `grid_bound`."""

    def __call__(self, batch: int, seq: int) -> float:
        tokens = batch * seq
        if self.small is not None and tokens <= self.small_tokens:
            value = self.small(batch, seq)
        else:
            value = (self.const + self.per_batch * batch + self.per_token * tokens
                     + self.per_token_seq * tokens * seq + self.per_seq * seq + self.per_seq_sq * seq * seq)
        if self.measured:
            bound = self.grid_bound(batch, seq)
            value = value if bound is None else min(value, bound)
        return max(0.0, value)

    @cached_property
    def _grid(self) -> tuple[dict[tuple[int, int], float], list[int], list[int]]:
        """The measurements by (batch, seq), and the grid's sorted batches and lengths: built once, as the
        search calls a fit thousands of times."""
        table = {(b, s): v for b, s, v in self.measured}
        return table, sorted({b for b, _ in table}), sorted({s for _, s in table})

    def grid_bound(self, batch: int, seq: int) -> float | None:
        """An upper bound from the measurements around (batch, seq), None outside their grid.

        A transient is the largest of some ops' sums of monomials in B and S with non-negative coefficients,
        so it is convex in (log B, log S) after taking its log: interpolating the logs of the four measured
        corners bilinearly can only land above it (Jensen). A corner measured as zero leaves the largest
        corner, the bound monotonicity gives. Below the grid (a sequence shorter than the shortest measured)
        the value is at most the grid's edge, by monotonicity too: the fit alone, extrapolated, can be loose
        there, and short micro-batches are most of real data."""
        table, batches, seqs = self._grid
        corners = []
        for axis, x in ((batches, batch), (seqs, seq)):
            if not axis or x > axis[-1]:
                return None
            x = max(x, axis[0])
            high = next(i for i, a in enumerate(axis) if a >= x)
            low = high if axis[high] == x else high - 1
            weight = 0.0 if low == high else math.log(x / axis[low]) / math.log(axis[high] / axis[low])
            corners.append(((axis[low], 1.0 - weight), (axis[high], weight)))
        points = [((b, s), wb * ws) for b, wb in corners[0] for s, ws in corners[1]]
        if any(key not in table for key, _ in points):
            return None
        if any(table[key] <= 0 for key, _ in points):
            return max(table[key] for key, _ in points)
        return math.exp(sum(w * math.log(table[key]) for key, w in points))


class BlockActivations(BaseModel):
    """How one block uses activation memory under one precision, all as functions of (batch, seq).

    All values are bytes and exclude parameters, their gradients and optimizer state."""

    saved: ShapeFit
    """Bytes kept alive for backward by this block when it and everything below it trains (storages
    first saved during this block's forward; autocast's weight copies included)."""
    saved_first_trainable: ShapeFit
    """Same, when this block trains but its input needs no gradient (the first layer above a frozen
    boundary): autograd then skips what only the input's gradient would have needed."""
    output: ShapeFit
    """Bytes of the block's output hidden state: what a checkpointed block above it keeps as its input."""
    forward_transient: ShapeFit
    """Peak bytes above the running total while this block's forward runs (temporaries freed at its end)."""
    backward_transient: ShapeFit
    """Peak bytes above (everything still saved + gradients already held) while this block's backward
    runs: incoming/outgoing activation grads and the op workspaces."""
    resident: ShapeFit = ShapeFit()
    """Bytes alive when this block's forward ends that no op saved and that are not its output: its input
    and earlier hidden states the model's code still references (under autocast only their low-precision
    copies are saved, so the fp32 originals live on as plain references)."""
    held: ShapeFit = ShapeFit()
    """Embeddings only: bytes of their output that the model's code keeps referenced until the forward
    returns (BERT's `embedding_output`, Llama's `inputs_embeds`). Saved by layer 0 when it trains; when it
    is frozen nothing saves them, yet they stay live through every layer's forward."""
    checkpointed_forward_transient: ShapeFit | None = None
    """Layers only: forward_transient when the layer is checkpointed (its forward then saves nothing)."""
    checkpoint_args: ShapeFit | None = None
    """Layers only: bytes of a checkpointed layer's arguments besides its input (masks, position tables)
    that checkpointing keeps referenced until the recompute. Every layer gets the same tensors: count once."""
    checkpointed_leftover: ShapeFit | None = None
    """Layers only: bytes a checkpointed layer's forward leaves live beyond its output until the model's
    forward returns: autocast's cached low-precision weight copies (saved for backward when not
    checkpointed). Each checkpointed layer has its own."""
    recompute_backward_transient: ShapeFit | None = None
    """Layers only: backward_transient when the layer is checkpointed, beyond the `saved` bytes its recompute
    brings back (the recompute's own temporaries, the gradient flowing in). None where not measured."""
    single: BlockActivations | None = None
    """The same fits made at micro-batch 1, which models special-case (views instead of copies, no mask):
    used for micro-batches of one sequence."""
    unpadded: BlockActivations | None = None
    """The same fits (with their own `single`) for micro-batches without pad tokens, where the model skips
    building its attention mask; None when padding makes no difference to this model."""

    def at(self, batch: int, padded: bool = True) -> BlockActivations:
        """The fits for micro-batches of `batch` sequences, with pad tokens or without."""
        fits = self if padded or self.unpadded is None else self.unpadded
        return fits.single if batch == 1 and fits.single is not None else fits


MEASURED_QUANTITIES: tuple[str, ...] = tuple(
    name for name in BlockActivations.model_fields if name not in ("single", "unpadded"))
"""The byte quantities the profiler measures per block kind and fits over shapes: BlockActivations' fields
(the one list; measure_blocks.ShapeSample and the profile's fits follow it)."""


class TimeFit(BaseModel):
    """Measured seconds of one block's forward and backward on the profiling device."""

    forward: ShapeFit
    backward: ShapeFit


class LinearLayer(BaseModel):
    """One linear layer of a block: what 4-bit storage and LoRA adapters are sized from."""

    name: str
    """Qualified name inside the block, e.g. `self_attn.q_proj`."""
    out_features: int = Field(ge=1)
    in_features: int = Field(ge=1)
    attention: bool
    """Inside the attention module (LoRA's `attention` targets)."""

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


class BlockProfile(BaseModel):
    """One part of the model: the embeddings, one transformer layer (repeated `count` times), or the head
    (everything after the last layer, including the loss)."""

    name: str
    kind: BlockKind
    count: int = Field(1, ge=1)
    """How many identical copies of this block the model has (layers are profiled once)."""
    param_numels: list[int]
    """Element count of every parameter tensor in one copy (drives 8-bit state: small tensors stay 32-bit)."""
    embedding_numels: list[int] = []
    """The subset of `param_numels` that are nn.Embedding weights (8-bit AdamW keeps them at 32-bit state)."""
    param_bytes: int
    """Bytes of one copy's parameters in their storage dtype."""
    tied_embedding_bytes: int = 0
    """Head only: bytes of embedding weights the head uses too (a tied LM head). The head's share of their
    gradient waits in autograd until the embeddings' backward: the layers' measured backward transients
    hold it, unless the embeddings are frozen."""
    flops_forward: ShapeFit
    """Forward FLOPs of one copy (backward is ~2x for trainable blocks, ~1x when only input grads flow)."""
    activations: dict[str, BlockActivations]
    """Keyed by precision name ("fp32", "bf16", "fp16")."""
    time: dict[str, TimeFit] = {}
    """Measured times keyed by precision; empty when profiled on the meta device."""
    linears: list[LinearLayer] = []
    """Layers only: the block's linear layers (nn.Linear, GPT-2's Conv1D), in module order."""
    task_head_numels: list[int] = []
    """Head only: the task layer's tensors (`classifier`, `score`), which LoRA trains in full as a copy."""
    adapted: dict[str, BlockActivations] = {}
    """The same fits measured with LoRA adapters of rank `Profile.lora_profile_rank` attached to the twin (base
    frozen), keyed by `techniques.lora.activation_key` (targets, plain or NF4 base, precision). Empty when the
    profile was made without adapters."""

    @property
    def numel(self) -> int:
        return sum(self.param_numels)


class FitCheck(BaseModel):
    """A held-out shape: what the fits predicted against what was measured there."""

    batch: int
    seq: int
    precision: str
    quantity: str = "layer.saved"
    """Which fit was checked: "<block kind>.<quantity>"."""
    predicted_bytes: float
    measured_bytes: float

    @property
    def error(self) -> float:
        return abs(self.predicted_bytes - self.measured_bytes) / max(self.measured_bytes, 1.0)


class Profile(BaseModel):
    """Everything later stages need to know about a model, gathered once."""

    model_id: str
    model_type: str
    task: str
    """"classification", "causal-lm", ... (decides the head and loss that were profiled)."""
    num_layers: int
    hidden_size: int
    vocab_size: int
    max_positions: int | None = None
    attn_implementation: str
    device: Literal["cpu", "cuda", "meta"]
    """Where the times were measured. On "meta" nothing ran: times are estimates from FLOPs."""
    device_name: str = ""
    """The card the times were measured on (`torch.cuda.get_device_name()`); "" on the CPU and meta."""
    kernel_correction: str = ""
    """The card whose kernels' saved bytes corrected the layers' `saved` fits (calibration.corrected);
    "" when uncorrected (the fake twin's CPU kernels stand)."""
    blocks: list[BlockProfile]
    """In execution order: embeddings, layer (count = num_layers), head."""
    optimizer_transient_per_param: dict[str, float] = {}
    """Temporary bytes per trainable parameter during optimizer.step(), keyed by "32"/"8" (measured)."""
    lora_profile_rank: int = 0
    """The LoRA rank the `adapted` fits were measured at (0: not measured); other ranks add
    `techniques.lora.rank_activation_bytes` per rank of difference."""
    profile_shapes: list[tuple[int, int]] = []
    """(batch, seq) shapes that were measured to fit the ShapeFits."""
    fit_checks: list[FitCheck] = []
    """Held-out shapes checking the fits."""
    seconds: float = 0.0
    """Wall time the profiling took."""
    versions: dict[str, str] = {}

    def block(self, kind: BlockKind) -> BlockProfile:
        return next(b for b in self.blocks if b.kind == kind)

    @property
    def num_params(self) -> int:
        return sum(b.numel * b.count for b in self.blocks)
