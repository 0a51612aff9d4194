"""Several processes share a step: DDP replicas, or FSDP2 shards (`torch.distributed.fsdp.fully_shard`).

Each process trains its share of the step's examples (accumulation.deal_step); gradients are averaged over
the processes, so the step still trains exactly the effective batch.

- DDP: every process keeps the whole model, its gradients and optimizer state. Gradients live in DDP's
  buckets (`gradient_as_bucket_view`: they are the buckets), which exist for the whole run, and are
  all-reduced once a step, in the last micro-batch's backward.
- FSDP: weights, gradients and optimizer state are split evenly (each tensor by rows) over the processes.
  A unit (one transformer layer, or `fsdp_unit_layers` of them) is all-gathered just before its forward and
  freed after it, gathered again for its backward, and its gradients are reduce-scattered to their shards
  after every micro-batch (skipping that sync would hold the whole model's gradients unsharded). The root
  unit (embeddings and head) is gathered once a micro-batch and kept until its backward.

Trade-off: FSDP divides the model's states by the number of processes, at the price of moving every weight
(twice a micro-batch) and every gradient over the interconnect; DDP moves only the gradients, once a step,
but needs a full replica on each device. CPU offload moves the shards to CPU RAM (every gather crosses PCIe,
AdamW runs on the CPU); keeping units gathered after forward saves the backward's all-gathers for memory.

What is gathered at each moment (measured with 2 processes on the CPU, tests/techniques/test_sharding.py):
  forward of unit u   the root, unit u, and the flat all-gather buffer kept until the next gather (or, on
                      a GPU, the next unit being prefetched): 2 units;
  backward of the head  the root and the top unit being prefetched;
  backward of unit u  the root, unit u, unit u-1 being prefetched, and unit u+1's reduce-scatter input (its
                      gradients, flat, kept until the next reduce-scatter);
  kept after forward  every unit gathered so far stays until its backward.
"""

from __future__ import annotations

from dataclasses import dataclass

from autofit.cluster import Cluster
from autofit.intmath import ceil_div
from autofit.knobs import Knobs
from autofit.profiler.schema import BlockProfile, Profile
from autofit.techniques import freeze, lora, quantization

ROOT_KINDS = ("embeddings", "head")
"""Blocks FSDP keeps in the root unit (everything outside the transformer layers)."""


# ---- pure side -------------------------------------------------------------------------------------------


def is_sharded(knobs: Knobs, cluster: Cluster) -> bool:
    """Whether weights, gradients and optimizer state are split over processes (FSDP, even on one)."""
    return knobs.strategy == "fsdp"


def shard(nbytes: float, processes: int) -> float:
    """One process's share of `nbytes` split evenly (FSDP pads each tensor's rows: a few rows at most)."""
    return nbytes / processes


def block_weight_bytes(block: BlockProfile, knobs: Knobs) -> int:
    """One copy of `block`'s weights as stored under `knobs`: what FSDP gathers for it. Full fine-tuning keeps
    fp32; an adapter plan stores the base at its dtype and adds the adapters (and head copy) in fp32."""
    if knobs.adapter == "none":
        return block.param_bytes
    element = quantization.BYTES_PER_ELEMENT.get(knobs.base_dtype)
    base = block.param_bytes if knobs.base_dtype == "fp32" or element is None else block.numel * element
    return base + lora.ADAPTER_BYTES * sum(lora.block_trainable_numels(block, knobs))


def block_grad_bytes(block: BlockProfile, knobs: Knobs) -> int:
    """One copy's gradients when it trains: every weight's, or under LoRA its adapters' and head copy's."""
    if knobs.adapter == "none":
        return block.param_bytes
    return lora.ADAPTER_BYTES * sum(lora.block_trainable_numels(block, knobs))


@dataclass(frozen=True)
class Gathered:
    """Bytes FSDP holds gathered from shards on one process at each moment of a micro-batch."""

    root: float
    """The root unit's weights (embeddings and head), gathered from the micro-batch's start to its end."""
    unit: float
    """One layer unit's weights."""
    unit_grads: float
    """One layer unit's gradients, flat: the reduce-scatter input kept until the next one."""
    unit_layers: int
    """Layers per unit."""
    num_layers: int
    keep: bool
    """Units stay gathered from their forward to their backward (reshard_after_forward off)."""

    def _unit_of(self, layer: int) -> int:
        return layer // self.unit_layers

    @property
    def _last_unit(self) -> int:
        return self._unit_of(self.num_layers - 1)

    def forward(self, layer: int | None) -> float:
        """Gathered while layer `layer`'s forward runs (None: the embeddings or head)."""
        if layer is None:
            return self.root + (self._last_unit + 1) * self.unit * self.keep
        unit = self._unit_of(layer)
        earlier = unit * self.unit if self.keep else 0.0
        return self.root + earlier + 2 * self.unit

    def backward(self, layer: int | None, head: bool = False) -> float:
        """Gathered while layer `layer`'s backward runs (None: the head's, `head`, or the embeddings')."""
        if layer is None:  # the head's backward prefetches the top unit; all units are freed by the embeddings'
            return self.root + ((self._last_unit + 1) * self.keep + (not self.keep)) * self.unit if head else self.root
        unit = self._unit_of(layer)
        earlier = (unit - 1) * self.unit if self.keep and unit > 0 else 0.0
        prefetched = self.unit if unit > 0 else 0.0
        reducing = self.unit_grads if unit < self._last_unit else 0.0
        return self.root + self.unit + prefetched + earlier + reducing


NONE_GATHERED = Gathered(root=0.0, unit=0.0, unit_grads=0.0, unit_layers=1, num_layers=1, keep=False)


def gathered(profile: Profile, knobs: Knobs, cluster: Cluster) -> Gathered:
    """What FSDP gathers under `knobs` (nothing without FSDP)."""
    if not is_sharded(knobs, cluster):
        return NONE_GATHERED
    layer = next(b for b in profile.blocks if b.kind == "layer")
    root = sum(block_weight_bytes(b, knobs) * b.count for b in profile.blocks if b.kind in ROOT_KINDS)
    units = knobs.fsdp_unit_layers
    return Gathered(root=float(root), unit=float(units * block_weight_bytes(layer, knobs)),
                    unit_grads=float(units * block_grad_bytes(layer, knobs)), unit_layers=units,
                    num_layers=profile.num_layers, keep=not knobs.reshard_after_forward)


@dataclass(frozen=True)
class Share:
    """What one process holds of the model's states under a strategy: the memory model's view of it."""

    processes: int = 1
    sharded: bool = False
    offload: bool = False
    grads_resident: bool = False
    """DDP with several processes: the gradients are DDP's buckets, allocated for the whole run."""
    gathered: Gathered = NONE_GATHERED

    def on_device(self, nbytes: float) -> float:
        """One process's device bytes of a state that totals `nbytes` on one process: its shard under FSDP,
        nothing when offloaded to CPU RAM."""
        if self.offload:
            return 0.0
        return shard(nbytes, self.processes) if self.sharded else nbytes

    def fresh_grad_bytes(self, nbytes: float, root: bool, grads_held: bool) -> float:
        """Device bytes a trainable block's backward leaves: its gradients (`nbytes`) added to the step's,
        which the caller counts apart when earlier micro-batches left them (`grads_held`). Under FSDP a layer
        leaves its shard, the root its unsharded gradients until the root's reduce-scatter ends backward."""
        if self.sharded and root:
            return nbytes
        return 0.0 if grads_held else self.on_device(nbytes)


ALONE = Share()
"""One process, or DDP as far as a single moment of a step is concerned."""


def share(profile: Profile, knobs: Knobs, cluster: Cluster) -> Share:
    """How one of `cluster`'s processes holds the model under `knobs`."""
    if is_sharded(knobs, cluster):
        return Share(processes=cluster.processes, sharded=True, offload=knobs.cpu_offload,
                     gathered=gathered(profile, knobs, cluster))
    return Share(grads_resident=cluster.distributed)


# ---- communication (the time model's input) ---------------------------------------------------------------


@dataclass(frozen=True)
class Traffic:
    """Bytes one process sends per micro-batch and per step, and how many collectives carry them."""

    micro_batch_bytes: float
    micro_batch_collectives: int
    step_bytes: float
    step_collectives: int
    offload_bytes: float = 0.0
    """Per micro-batch: shards copied between CPU RAM and the device (offload), over PCIe."""


def traffic(profile: Profile, knobs: Knobs, cluster: Cluster) -> Traffic:
    """What the processes exchange: ring collectives send (n-1)/n of their data from each process."""
    n = cluster.processes
    ring = (n - 1) / n if n > 1 else 0.0
    trainable = sum(block_grad_bytes(c.block, knobs) for c in freeze.block_copies(profile.blocks, knobs) if c.trains)
    if not is_sharded(knobs, cluster):
        return Traffic(0.0, 0, 2 * ring * trainable, 1 if n > 1 else 0)  # all-reduce: reduce-scatter + gather
    g = gathered(profile, knobs, cluster)
    units = ceil_div(profile.num_layers, knobs.fsdp_unit_layers)
    weights = g.root + units * g.unit
    backward = 0.0 if g.keep else units * g.unit  # the root stays gathered for its backward
    gathers = 1 + units + (0 if g.keep else units)
    offload = 0.0
    if knobs.cpu_offload:  # each gather copies the shard in, each reduce-scatter copies its output out
        offload = (weights + backward + trainable) / n
    return Traffic(ring * (weights + backward + trainable), gathers + 1 + units, 0.0, 0, offload)

