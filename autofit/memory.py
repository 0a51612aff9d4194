"""The memory model: (profile, knobs, micro-batch shape) -> predicted peak bytes with a breakdown. Pure.

A training step is replayed block by block on paper, the way the allocator sees it:

  forward    every block adds what it keeps for backward (nothing when frozen below the boundary, only its
             arguments when checkpointed); the running total plus the block's output, transient and
             resident bytes is a candidate peak. Until the forward returns, the model's code also holds
             the embeddings' output, and autocast leaves checkpointed layers' weight copies behind.
  backward   blocks run top-down; the candidate is the running total + the gradients that exist before the
             block + its measured backward transient, which includes the gradient flowing in, the block's
             own fresh gradients and, when checkpointed, its recompute.
  optimizer  weights + grads + state + the optimizer's temporaries.

Batches without pad tokens use the profile's unpadded fits: models skip their attention mask then.

Steady state is assumed: optimizer state exists (after step 1) and, where a step has several micro-batches,
gradients already exist during every micro-batch but its first (`grads_held`).

The walk itself, and the glossary of its terms, is memory_walk.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from autofit.cluster import SINGLE, Cluster
from autofit.devices import DeviceSpec
from autofit.knobs import Knobs
from autofit.memory_walk import expand_blocks, step_moments
from autofit.plan import MemoryBreakdown
from autofit.profiler.schema import BlockActivations, Profile
from autofit.techniques import accumulation, checkpointing, lora, optimizer, sharding
from autofit.workload import Workload

INDEX_BYTES = 8  # input_ids / attention_mask / token labels are int64


def param_state(profile: Profile, knobs: Knobs) -> tuple[int, int, int, int]:
    """(weight bytes, gradient bytes, optimizer-state bytes, trainable parameter count)."""
    if knobs.adapter == "lora":
        numels = lora.trainable_numels(profile, knobs.lora_rank, knobs.lora_targets)
        weights = lora.base_weight_bytes(profile, knobs)
        return (weights, lora.ADAPTER_BYTES * sum(numels), optimizer.state_bytes(numels, [], knobs.optimizer_bits),
                sum(numels))
    weights = grads = state = trainable_numel = 0
    for block in expand_blocks(profile, knobs):
        p = block.profile
        weights += p.param_bytes
        if block.trainable:
            grads += p.param_bytes
            trainable_numel += p.numel
            state += optimizer.state_bytes(p.param_numels, p.embedding_numels, knobs.optimizer_bits)
    return weights, grads, state, trainable_numel


def input_bytes(profile: Profile, batch: int, seq: int) -> int:
    """The micro-batch itself: input_ids, attention_mask and labels (token labels for causal LMs)."""
    label_bytes = batch * seq * INDEX_BYTES if profile.task != "classification" else batch * INDEX_BYTES
    return 2 * batch * seq * INDEX_BYTES + label_bytes


def predict_step_peak(profile: Profile, knobs: Knobs, batch: int, seq: int, device: DeviceSpec,
                      padded: bool = True, grads_held: bool = False, cluster: Cluster = SINGLE) -> MemoryBreakdown:
    """Predicted peak of one steady-state micro-batch of shape (batch, seq), with pad tokens (`padded`) or of
    sequences all exactly `seq` long; `grads_held` when earlier micro-batches of its step left gradients. With
    several processes, one process's peak (the one training this micro-batch)."""
    weights, state, moments = _step_parts(profile, knobs, batch, seq, padded, grads_held, cluster, device)
    peak = max(moments, key=lambda m: m.allocated)  # the first of equal moments: the optimizer only above them
    return peak.breakdown(weights, state, device, (batch, seq))


@dataclass(frozen=True)
class _StepPart:
    """One moment of a step as the breakdown counts it: the batch in its activations, the gradients kept from
    earlier micro-batches in its gradients (a PeakMoment counts neither)."""

    label: str
    activations: float
    temporaries: float
    gradients: float
    gathered: float
    phase: str

    @property
    def allocated(self) -> float:
        return self.activations + self.temporaries + self.gradients + self.gathered

    def breakdown(self, weights: float, state: float, device: DeviceSpec, shape: tuple[int, int]) -> MemoryBreakdown:
        return MemoryBreakdown(
            weights=int(weights), gradients=int(self.gradients), optimizer_state=int(state),
            activations=int(self.activations), temporaries=int(self.temporaries), gathered=int(self.gathered),
            peak_phase=self.phase, peak_shape=shape, **device_terms(device, weights + state + self.allocated))


def _step_parts(profile: Profile, knobs: Knobs, batch: int, seq: int, padded: bool, grads_held: bool,
                cluster: Cluster, device: DeviceSpec) -> tuple[float, float, list[_StepPart]]:
    """(weights, optimizer state, every moment of one micro-batch's step in order, the optimizer step last:
    activations and the batch are gone then, every gradient and the optimizer's temporaries live)."""
    share = sharding.share(profile, knobs, cluster)
    weights, grads, state, opt_temps = _device_states(profile, knobs, share, device)
    grads_held = grads_held or share.grads_resident
    inputs, earlier = input_bytes(profile, batch, seq), grads if grads_held else 0.0
    moments = step_moments(expand_blocks(profile, knobs), knobs.adapter, batch, seq, padded, grads_held, share)
    parts = [_StepPart(label, m.activations + inputs, m.temporaries, m.gradients + earlier, m.gathered, m.phase)
             for label, m in moments]
    parts.append(_StepPart("optimizer step", 0.0, opt_temps, grads, 0.0, "optimizer"))
    return weights, state, parts


def device_terms(device: DeviceSpec, allocated: float) -> dict[str, int]:
    """What the device adds to `allocated` bytes of tensors: library workspaces (allocated too), and the
    overhead no allocation holds: the caching allocator's reserve above what is allocated (a fraction of it
    plus a fixed slack) and the CUDA context."""
    workspace = device.workspace_bytes
    reserve = device.allocator_reserve_fraction * (allocated + workspace) + device.allocator_reserve_bytes
    return {"workspace": int(workspace), "overhead": int(device.context_bytes + reserve),
            "context": int(device.context_bytes)}


def offloaded_bytes_per_machine(profile: Profile, knobs: Knobs, cluster: Cluster) -> int:
    """CPU RAM one machine needs for its processes' offloaded shards (weights, gradients, optimizer state);
    0 without CPU offload."""
    if not (knobs.cpu_offload and sharding.is_sharded(knobs, cluster)):
        return 0
    weights, grads, state, _ = param_state(profile, knobs)
    return int(sharding.shard(weights + grads + state, cluster.processes) * cluster.per_machine)


def _device_states(profile: Profile, knobs: Knobs, share: sharding.Share,
                   device: DeviceSpec) -> tuple[float, float, float, float]:
    """(weights, gradients, optimizer state, optimizer temporaries) one process keeps on its device. FSDP
    shards a twin of the model and the caller's whole model waits in host memory until the trained weights
    are gathered back into it (executor/setup.py): on a CPU device that is the memory the budget counts."""
    weights, grads, state, trainable = param_state(profile, knobs)
    opt_temps = profile.optimizer_transient_per_param.get(str(knobs.optimizer_bits), 0.0) * trainable
    waiting = weights if share.sharded and device.kind == "cpu" else 0.0
    return (share.on_device(weights) + waiting, share.on_device(grads), share.on_device(state),
            share.on_device(opt_temps))


def predict_peak(profile: Profile, knobs: Knobs, workload: Workload, device: DeviceSpec,
                 cluster: Cluster = SINGLE) -> MemoryBreakdown:
    """Predicted peak over every micro-batch these knobs form on this workload: each bucket's largest, with
    the gradients of earlier micro-batches of its step where it can follow them (the worst bucket wins).
    Lengths assumed from --seq-len stand for data of at most that length, so their batches count as padded.
    With several processes: the peak of the process whose share of a step peaks highest."""
    return _worst_micro_batch(profile, knobs, workload, device, cluster)[0]


def _worst_micro_batch(profile: Profile, knobs: Knobs, workload: Workload, device: DeviceSpec,
                       cluster: Cluster = SINGLE) -> tuple[MemoryBreakdown, accumulation.MicroBatchShape]:
    """(its predicted peak, its shape) of the micro-batch that sets the peak: the first of equal peaks. Each
    process cuts its share of a step (at most `process_batch_size` examples) as one process cuts a whole
    step. Lengths assumed from --seq-len count as padded."""
    share = accumulation.process_batch_size(workload.batch_size, cluster.processes)
    shapes = [shape if workload.from_data else shape.model_copy(update={"padded": True})
              for shape in accumulation.memory_shapes(knobs, workload.lengths, share)]
    return peak_over_shapes(profile, knobs, shapes, device, cluster)


def peak_over_shapes(profile: Profile, knobs: Knobs, shapes: list[accumulation.MicroBatchShape], device: DeviceSpec,
                     cluster: Cluster = SINGLE) -> tuple[MemoryBreakdown, accumulation.MicroBatchShape]:
    """(the predicted peak, the shape) of the micro-batch among `shapes` that peaks highest: the first of
    equal peaks."""
    peaks = [(predict_step_peak(profile, knobs, s.batch, s.length, device, s.padded, s.grads_held, cluster), s)
             for s in shapes]
    return max(peaks, key=lambda c: c[0].peak_bytes)


def predict_eval_peak(profile: Profile, knobs: Knobs, shapes: list[tuple[int, int]],
                      device: DeviceSpec, cluster: Cluster = SINGLE) -> MemoryBreakdown:
    """Predicted peak of forward-only evaluation on micro-batches of the given (batch, padded length) shapes.

    No gradients exist (the last step cleared them; DDP's buckets stay) and, under no_grad, nothing is saved
    for backward: a layer's forward is what it is when checkpointed (its measured forward then saves nothing
    either: the same transient, and autocast's weight copies left behind), other blocks are bounded by what
    they would save and their transient; on top come the block's output and unsaved references, its input,
    the embeddings' output the layers' code keeps, and the earlier trainable layers' weight copies (kept until
    the forward returns). Optimizer state stays; under FSDP the root stays gathered, with the running unit and
    the last gather's flat buffer."""
    share = sharding.share(profile, knobs, cluster)
    weights, grads, state, _ = _device_states(profile, knobs, share, device)
    grads = grads if share.grads_resident else 0.0  # DDP's buckets stay through evaluation
    g = share.gathered
    worst, at, worst_gathered = 0.0, (0, 0), 0.0
    for batch, seq in shapes:
        inputs = input_bytes(profile, batch, seq)
        previous = held = casts = 0.0
        for block in expand_blocks(profile, knobs):
            acts, layer = block.fits.at(batch, True), block.layer is not None
            gathered = g.forward(block.layer) if layer else g.between_blocks()
            live = (previous + (held if layer else 0.0) + casts + _unsaved_forward(acts, layer, batch, seq)
                    + acts.output(batch, seq) + acts.resident(batch, seq))
            if inputs + live + gathered > worst:
                worst, at, worst_gathered = inputs + live + gathered, (batch, seq), gathered
            if layer and block.trainable:
                casts += checkpointing.forward_leftover_bytes(acts, batch, seq)
            previous = acts.output(batch, seq)
            held = held or previous  # the embeddings' output stays referenced until the layers' loop ends
    allocated = weights + grads + state + worst
    return MemoryBreakdown(weights=int(weights), gradients=int(grads), optimizer_state=int(state), activations=0,
                           temporaries=int(worst - worst_gathered), gathered=int(worst_gathered),
                           peak_phase="forward", peak_shape=at, **device_terms(device, allocated))


def _unsaved_forward(acts: BlockActivations, layer: bool, batch: int, seq: int) -> float:
    """Bytes above a block's input while its forward runs saving nothing (evaluation, under no_grad)."""
    if layer and acts.checkpointed_forward_transient is not None:
        return checkpointing.forward_transient_bytes(acts, batch, seq) + \
            checkpointing.forward_leftover_bytes(acts, batch, seq)
    return acts.saved(batch, seq) + acts.forward_transient(batch, seq)  # a bound: what it would save


def step_timeline(profile: Profile, knobs: Knobs, workload: Workload, device: DeviceSpec,
                  cluster: Cluster = SINGLE) -> list[tuple[str, MemoryBreakdown]]:
    """Every moment `predict_peak` weighs for the micro-batch that sets its peak, in the order they happen:
    the step's start, the end of each block's forward, each block's backward (top-down, down to the frozen
    boundary), the optimizer step. Each comes with a label ("forward layer 3") and the bytes live then, by
    what holds them; its peak_phase is the moment's own phase. The largest total is predict_peak's
    peak_bytes: these are predict_step_peak's candidates (`_step_parts`), all kept instead of only the largest."""
    _, shape = _worst_micro_batch(profile, knobs, workload, device, cluster)
    batch, seq = shape.batch, shape.length
    weights, state, parts = _step_parts(profile, knobs, batch, seq, shape.padded, shape.grads_held, cluster, device)
    return [(part.label, part.breakdown(weights, state, device, (batch, seq))) for part in parts]
