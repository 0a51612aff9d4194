"""One micro-batch replayed block by block on paper: every moment of its forward and backward that can be
the peak, with the bytes live then. Pure; memory.py adds weights, optimizer state and the batch.

Glossary (the profile's BlockActivations fields carry the same names):
  kept       bytes a block's forward saves for its backward (autograd's saved tensors; fits `saved`,
             `saved_first_trainable`); they stay until the block's backward.
  live       the running total of kept bytes at a moment of the step.
  held       the embeddings' output, which the model's code references until its forward returns.
  resident   bytes alive at a block's end that no op saved and that are not its output (earlier hidden
             states the model's code still references).
  leftover   what a checkpointed layer's forward leaves beyond its output until the forward returns
             (autocast's weight copies).
  transient  temporaries above the running total while one block's forward or backward runs.
  grads_held gradients of earlier micro-batches of the step already exist when this one runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from autofit.knobs import Knobs
from autofit.profiler.schema import BlockActivations, BlockProfile, Profile
from autofit.techniques import checkpointing, freeze, lora, sharding


@dataclass
class Block:
    """One executed block of the model (layers expanded), with what the knobs make of it."""

    profile: BlockProfile
    trainable: bool
    needs_input_grad: bool
    checkpointed: bool
    keeps_checkpoint_args: bool = False
    """The lowest checkpointed layer: the arguments all checkpointed layers share live until its recompute."""
    fits: BlockActivations | None = None
    """Its activation fits under the knobs' precision (and adapters): what every memory term reads."""
    grad_bytes: int = 0
    """Bytes of the gradients one copy has when it trains: its parameters', or under LoRA its adapters' and
    task head copy's."""
    layer: int | None = None
    """Its index in the layer stack (None for the embeddings and the head)."""
    frozen_tied_bytes: int = 0
    """A layer below a tied LM head whose embeddings are frozen: the head's share of the tied weight's
    gradient, which autograd holds pending from the head's backward until the embeddings' (a live tensor in
    every layer's measured backward), does not exist."""


def expand_blocks(profile: Profile, knobs: Knobs) -> list[Block]:
    recomputed = set(checkpointing.recomputed_layers(knobs, profile.num_layers))
    # under LoRA the adapted fits were measured with the embeddings frozen: the tied share is already out
    head_tied = profile.blocks[-1].tied_embedding_bytes if knobs.adapter == "none" else 0
    fits = {block.name: lora.block_fits(block, knobs, profile.lora_profile_rank) if knobs.adapter == "lora"
            else block.activations[knobs.precision.value] for block in profile.blocks}
    grad_bytes = {block.name: lora.block_grad_bytes(block, knobs) for block in profile.blocks}
    blocks: list[Block] = []
    for copy in freeze.block_copies(profile.blocks, knobs):
        is_layer = copy.block.kind == "layer"
        tied = head_tied if knobs.freeze_embeddings and is_layer else 0
        blocks.append(Block(copy.block, copy.trains, copy.needs_input_grad, is_layer and copy.index in recomputed,
                             fits=fits[copy.block.name], grad_bytes=grad_bytes[copy.block.name],
                             layer=copy.index if is_layer else None, frozen_tied_bytes=tied))
    lowest = next((b for b in blocks if b.checkpointed), None)
    if lowest is not None:
        lowest.keeps_checkpoint_args = True
    return blocks


def _kept_bytes(block: Block, previous_output: float, acts: BlockActivations, batch: int, seq: int) -> float:
    """Bytes this block keeps alive from its forward until its backward."""
    if not block.trainable and not block.needs_input_grad:
        return 0.0  # frozen below the boundary: autograd records nothing
    if block.checkpointed:  # non-reentrant checkpoint keeps only the block's arguments
        shared = acts.checkpoint_args(batch, seq) if block.keeps_checkpoint_args and acts.checkpoint_args else 0.0
        return checkpointing.kept_bytes(previous_output, shared)
    fit = acts.saved if block.needs_input_grad else acts.saved_first_trainable
    return fit(batch, seq)


EMBEDDINGS, FIRST_LAYER = 0, 1
"""Positions in the expanded block list: the embeddings come first, layer 0 right after them."""


def _held_bytes(blocks: list[Block], batch: int, seq: int, padded: bool, adapter: str) -> float:
    """The embeddings' output the model's code keeps through the forward, when a frozen layer 0 does not save
    it. None under LoRA: its fits were measured with the embeddings frozen, as it trains, so the layers'
    `resident` already holds that output when no adapter saves it (Llama's normed inputs), and their `saved`
    when one does (BERT's attention adapters read the layer's input itself)."""
    if len(blocks) <= FIRST_LAYER or adapter != "none":
        return 0.0
    layer0 = blocks[FIRST_LAYER]
    if layer0.profile.kind != "layer" or layer0.needs_input_grad or layer0.trainable:
        return 0.0
    return blocks[EMBEDDINGS].fits.at(batch, padded).held(batch, seq)


def _forward_transient(block: Block, acts: BlockActivations, batch: int, seq: int) -> float:
    if not (block.trainable or block.needs_input_grad):
        return 0.0
    if block.checkpointed:
        return checkpointing.forward_transient_bytes(acts, batch, seq)
    return acts.forward_transient(batch, seq)


def _backward_transient(block: Block, acts: BlockActivations, grad_out: float, batch: int, seq: int) -> float:
    """Bytes above what is kept while the block's backward runs. Measured transients already hold the gradient
    flowing in (it is live in the window); a checkpointed block's also hold its recompute."""
    if not block.checkpointed:
        return max(0.0, acts.backward_transient(batch, seq) - block.frozen_tied_bytes)
    return checkpointing.backward_transient_bytes(acts, batch, seq, needs_input_grad=block.needs_input_grad,
                                                  grad_out=grad_out, frozen_tied_bytes=block.frozen_tied_bytes)


@dataclass(frozen=True)
class PeakMoment:
    """The bytes beyond weights and optimizer state at one moment of the step: a candidate for its peak."""

    activations: float
    """Kept bytes live at this moment."""
    temporaries: float
    """Transient bytes on top (the running block's output, workspaces, gradients flowing through)."""
    gradients: float
    """Parameter gradients that exist at this moment."""
    phase: str
    """"forward" or "backward"."""
    gathered: float = 0.0
    """FSDP: weights gathered from shards and gradients waiting for their reduce-scatter (sharding.py)."""


def _block_names(blocks: list[Block]) -> list[str]:
    """"embeddings", "layer 0", "layer 1", ..., "head": a label for each executed block."""
    names, copies = [], {}
    for b in blocks:
        copies[b.profile.name] = copies.get(b.profile.name, -1) + 1
        names.append(b.profile.name if b.profile.count == 1 else f"{b.profile.name} {copies[b.profile.name]}")
    return names


def step_moments(blocks: list[Block], adapter: str, batch: int, seq: int, padded: bool, grads_held: bool,
                  share: sharding.Share = sharding.ALONE) -> list[tuple[str, PeakMoment]]:
    """Replay forward then backward: every moment that can be the peak, labelled, in the order they happen.
    A moment's `gradients` are those its micro-batch made so far (none of the gradients kept from earlier
    micro-batches, `grads_held`: the caller adds those), plus, under FSDP, the root's unsharded ones."""
    names = _block_names(blocks)
    kept, outputs, forward = _forward_walk(blocks, adapter, batch, seq, padded)
    moments = [("start", forward[0])]
    for block, name, m in zip(blocks, names, forward[1:]):
        moments.append((f"forward {name}", replace(m, gathered=share.gathered.forward(
            block.layer, head=block.profile.kind == "head"))))
    live, grads = sum(kept), 0.0
    for i in range(len(blocks) - 1, -1, -1):
        block = blocks[i]
        if not block.trainable and not block.needs_input_grad:
            break  # nothing below the boundary runs backward
        acts = block.fits.at(batch, padded)
        # grads: those that exist before the block's backward; its transient includes the ones it makes (its
        # .grad, or, accumulating, fresh gradients waiting to be added in place)
        moments.append((f"backward {names[i]}", PeakMoment(
            live, _backward_transient(block, acts, outputs[i], batch, seq), grads, "backward",
            share.gathered.backward(block.layer, head=block.profile.kind == "head"))))
        if block.trainable:
            grads += share.fresh_grad_bytes(block.grad_bytes, block.layer is None, grads_held)
        live -= kept[i]
    return moments


def _forward_walk(blocks: list[Block], adapter: str, batch: int, seq: int,
                  padded: bool) -> tuple[list[float], list[float], list[PeakMoment]]:
    """(bytes each block keeps for backward, each block's output, the forward's peak candidates)."""
    kept: list[float] = []
    outputs: list[float] = []
    moments = [PeakMoment(0.0, 0.0, 0.0, "forward")]
    held = _held_bytes(blocks, batch, seq, padded, adapter)
    live = previous_output = shared = 0.0
    for position, block in enumerate(blocks):
        acts = block.fits.at(batch, padded)
        k = _kept_bytes(block, previous_output, acts, batch, seq)
        if block.keeps_checkpoint_args and acts.checkpoint_args is not None:
            shared = acts.checkpoint_args(batch, seq)
        # live until the model's forward returns: autocast's weight copies of a checkpointed layer
        leftover = checkpointing.forward_leftover_bytes(acts, batch, seq) if block.checkpointed else 0.0
        out = acts.output(batch, seq)
        # a frozen block's input is live while it runs though nothing keeps it (layer 0's may be `held`)
        runs_autograd = block.trainable or block.needs_input_grad
        input_held = held if position == FIRST_LAYER else 0.0
        unkept_input = 0.0 if runs_autograd else max(0.0, previous_output - input_held)
        # at the block's end: everything kept so far, its output, its resident bytes; its transient sits on
        # top. The arguments checkpointing keeps (masks) are what the model's code references anyway until
        # its forward returns: counted once.
        resident = max(0.0, acts.resident(batch, seq) - shared)
        k_forward = k + leftover
        moments.append(PeakMoment(live + k_forward, out + _forward_transient(block, acts, batch, seq)
                                  + resident + unkept_input, 0.0, "forward"))
        live += k_forward + (held if position == EMBEDDINGS else 0.0)
        kept.append(k)
        outputs.append(out)
        previous_output = out
    return kept, outputs, moments
