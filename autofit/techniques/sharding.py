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

import copy
import inspect
import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from autofit.cluster import Cluster
from autofit.intmath import ceil_div
from autofit.knobs import Knobs
from autofit.layers import find_layout
from autofit.profiler.schema import BlockProfile, Profile
from autofit.techniques import freeze, lora, quantization

ROOT_KINDS = ("embeddings", "head")
"""Blocks FSDP keeps in the root unit (everything outside the transformer layers)."""


# ---- pure side -------------------------------------------------------------------------------------------


def is_sharded(knobs: Knobs, cluster: Cluster) -> bool:
    """Whether weights, gradients and optimizer state are split over processes: FSDP with several of them
    (the executor applies no FSDP to a one-process run, so neither does the model)."""
    return knobs.strategy == "fsdp" and cluster.distributed


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


@dataclass(frozen=True)
class Gathered:
    """Bytes FSDP holds gathered from shards on one process at each moment of a micro-batch."""

    root: float
    """The root unit's weights (embeddings and head), gathered from the micro-batch's start to its end."""
    layer: float
    """One layer's weights (a unit holds `unit_layers` of them; the top unit what is left)."""
    layer_grads: float
    """One layer's gradients: a unit's, flat, are the reduce-scatter input kept until the next one."""
    unit_layers: int
    num_layers: int
    keep: bool
    """Units stay gathered from their forward to their backward (reshard_after_forward off)."""

    def _unit_of(self, layer: int) -> int:
        return layer // self.unit_layers

    @property
    def _last_unit(self) -> int:
        return self._unit_of(self.num_layers - 1)

    def _layers_in(self, unit: int) -> int:
        return min(self.num_layers, (unit + 1) * self.unit_layers) - unit * self.unit_layers

    def _size(self, unit: int) -> float:
        return self._layers_in(unit) * self.layer

    def _below(self, unit: int) -> float:
        """Every unit under `unit`, gathered (units kept after their forward)."""
        return min(unit * self.unit_layers, self.num_layers) * self.layer if self.keep and unit > 0 else 0.0

    def forward(self, layer: int | None, head: bool = False) -> float:
        """Gathered while layer `layer`'s forward runs (None: the embeddings', or the head's with `head`).
        A gather's flat buffer stays until the next gather: the root's own through the embeddings, the top
        unit's through the head (and the loss) until the backward's first gather."""
        if layer is None:
            if not head:
                return 2 * self.root
            return self.root + self._size(self._last_unit) + (self.num_layers * self.layer if self.keep else 0.0)
        unit = self._unit_of(layer)
        return self.root + self._below(unit) + 2 * self._size(unit)

    def between_blocks(self) -> float:
        """Gathered outside the layers once the forward passed them (evaluation's head, the head's backward):
        the root and the last gather's unit, or with units kept, every unit."""
        return self.root + (self.num_layers * self.layer if self.keep else self._size(self._last_unit))

    def backward(self, layer: int | None, head: bool = False) -> float:
        """Gathered while layer `layer`'s backward runs (None: the head's, `head`, or the embeddings')."""
        if layer is None:  # the head's backward prefetches the top unit; all units are freed by the embeddings'
            return self.between_blocks() if head else self.root
        unit = self._unit_of(layer)
        prefetched = self._size(unit - 1) if unit > 0 else 0.0
        earlier = self._below(unit - 1) if unit > 0 else 0.0
        reducing = self._layers_in(unit + 1) * self.layer_grads if unit < self._last_unit else 0.0
        # the unit's layers above `layer` ran their backward already: their gradients stay unsharded (on the
        # unit's parameters) until the unit's reduce-scatter, after its lowest layer's backward
        top = min((unit + 1) * self.unit_layers, self.num_layers) - 1
        pending = (top - layer) * self.layer_grads
        return self.root + self._size(unit) + prefetched + earlier + reducing + pending


NONE_GATHERED = Gathered(root=0.0, layer=0.0, layer_grads=0.0, unit_layers=1, num_layers=1, keep=False)


def gathered(profile: Profile, knobs: Knobs, cluster: Cluster) -> Gathered:
    """What FSDP gathers under `knobs` (nothing without FSDP)."""
    if not is_sharded(knobs, cluster):
        return NONE_GATHERED
    layer = next(b for b in profile.blocks if b.kind == "layer")
    root = sum(block_weight_bytes(b, knobs) * b.count for b in profile.blocks if b.kind in ROOT_KINDS)
    return Gathered(root=float(root), layer=float(block_weight_bytes(layer, knobs)),
                    layer_grads=float(lora.block_grad_bytes(layer, knobs)), unit_layers=knobs.fsdp_unit_layers,
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
    trainable = sum(lora.block_grad_bytes(c.block, knobs) for c in freeze.block_copies(profile.blocks, knobs)
                    if c.trains)
    if not is_sharded(knobs, cluster):
        return Traffic(0.0, 0, 2 * ring * trainable, 1 if n > 1 else 0)  # all-reduce: reduce-scatter + gather
    g = gathered(profile, knobs, cluster)
    units = ceil_div(profile.num_layers, knobs.fsdp_unit_layers)
    layers = profile.num_layers * g.layer
    weights = g.root + layers
    backward = 0.0 if g.keep else layers  # the root stays gathered for its backward
    gathers = 1 + units + (0 if g.keep else units)
    offload = 0.0
    if knobs.cpu_offload:  # each gather copies the shard in, each reduce-scatter copies its output out
        offload = (weights + backward + trainable) / n
    return Traffic(ring * (weights + backward + trainable), gathers + 1 + units, 0.0, 0, offload)



# ---- apply side ------------------------------------------------------------------------------------------
# Why not `accelerator.prepare(model)` for FSDP (measured with accelerate 1.15, /tmp/fsdp_research): on the CPU
# it silently falls back to independent processes (a FSDP config with use_cpu trains full replicas that never
# talk); where it does shard, it wraps differently from what the memory model counts (input embeddings as a
# unit of their own), and under mixed precision it replaces autocast by a bf16 parameter/reduce policy, which
# is not what the profiler measured. accelerate still launches and sets up the processes; the wrapping is ours.


_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})
"""DDP's switch for the buffer broadcast in forward, by its name in this torch (renamed in 2.13)."""


def wrap(model: nn.Module, knobs: Knobs, processes: int, device: torch.device) -> nn.Module:
    """The module that trains `model` on `processes` processes (the default process group): DDP around it,
    or FSDP2 shards of a twin of it. Apply freezing, adapters and checkpointing to `model` first.

    FSDP shards a twin (same modules, its parameters new Parameter objects aliasing `model`'s tensors), since
    fully_shard rebuilds in place every module it touches: `model` itself stays an ordinary module, and
    `gather_into` copies the trained weights back into it. Weights are broadcast from process 0 first (as DDP
    does), so every shard comes from the same model."""
    if knobs.strategy == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        # gradients as views of DDP's buckets: one resident copy of the gradients, not two; no buffer broadcast
        # in forward (a collective every process would have to reach, evaluation included)
        return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True, **_NO_BUFFER_SYNC)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    twin = _twin(model)
    _broadcast_from_first(twin, device)
    mesh = init_device_mesh(device.type, (processes,))
    # pinned host memory needs CUDA (pin_memory fails on a CPU-only machine)
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if knobs.cpu_offload else OffloadPolicy()
    for unit in units(find_layout(twin).layers, knobs.fsdp_unit_layers):
        fully_shard(unit if len(unit) > 1 else unit[0], mesh=mesh, offload_policy=offload,
                    reshard_after_forward=knobs.reshard_after_forward)
    # the root (embeddings, head) stays gathered from the forward's start to the backward's end, as the
    # memory model's Gathered.root counts it (fully_shard's default for the root)
    fully_shard(twin, mesh=mesh, offload_policy=offload, reshard_after_forward=False)
    return twin


def units(layers: nn.ModuleList, unit_layers: int) -> list[list[nn.Module]]:
    """The layers in FSDP units of `unit_layers` consecutive layers (the last may hold fewer)."""
    layers = list(layers)
    return [layers[start:start + unit_layers] for start in range(0, len(layers), unit_layers)]


def _twin(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose parameters and buffers alias `model`'s tensors (no weight is copied; tied
    weights stay tied): what fully_shard may rebuild while `model` stays as it is."""
    memo: dict[int, torch.Tensor] = {}
    for param in model.parameters():
        memo[id(param)] = nn.Parameter(param.detach(), requires_grad=param.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = buffer.detach()
    return copy.deepcopy(model, memo)


@torch.no_grad()
def _broadcast_from_first(model: nn.Module, device: torch.device) -> None:
    """Make every process's weights and buffers process 0's (a head initialised with another seed on one
    process would otherwise be sharded from different models)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        moved = tensor.detach().to(device)
        dist.broadcast(moved, src=0)
        if moved is not tensor:
            tensor.copy_(moved)


def is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def unwrapped(wrapped: nn.Module) -> nn.Module:
    """DDP's own module; an FSDP twin is itself (its weights are sharded: see `gather_into`)."""
    return wrapped.module if isinstance(wrapped, DistributedDataParallel) else wrapped


@torch.no_grad()
def gather_into(wrapped: nn.Module, model: nn.Module) -> None:
    """Copy an FSDP twin's trained weights, gathered whole, into `model` on every process (a collective: every
    process calls it). Only what trains changes, so frozen weights are not gathered. DDP trained `model`
    itself: nothing to do."""
    if not is_fsdp(wrapped):
        return
    from torch.distributed.tensor import DTensor

    targets = dict(model.named_parameters())
    for name, param in wrapped.named_parameters():
        if param.requires_grad:
            full = param.full_tensor() if isinstance(param, DTensor) else param
            targets[name].copy_(full)


def state_dict_options(lora: bool):
    """torch.distributed.checkpoint's options: sharded tensors; a LoRA run keeps only what trains."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=lora, strict=not lora)
