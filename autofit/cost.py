"""The time model: predicted seconds per optimizer step and per epoch of a plan on a target device. Pure.

An epoch is the micro-batches its steps are cut into (each step's examples sorted by length and cut under
the knobs' caps, bucket by bucket, each micro-batch padded to its own longest example:
`techniques.accumulation.epoch_micro_batches`) plus one optimizer step per effective batch. One micro-batch
of shape (B, L) costs, per block copy:

- forward, always (frozen layers still run forward);
- backward: ~2x forward for a trainable block whose input needs a gradient, ~1x for the first trainable
  block above a frozen boundary (weight gradients only), 0 for frozen blocks below the boundary;
- one more forward for each checkpointed trainable layer (the recompute in backward).

Block times come from the profile's measured per-block fits when it was profiled on the target's device
kind (a precision it did not time is scaled from one it did by the device's throughput ratio), else from
FLOPs / (throughput x matmul efficiency x utilisation(B*L)). The optimizer step is bound
by memory bandwidth. The constants below are estimates for FLOP-based (GPU) predictions; no real card has
calibrated them yet (no GPU was lent to this project so far).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from autofit.cluster import SINGLE, Cluster
from autofit.devices import DeviceSpec
from autofit.knobs import Knobs, Precision
from autofit.plan import TimePrediction
from autofit.profiler.schema import BlockProfile, Profile
from autofit.techniques.accumulation import (epoch_micro_batches, padding_efficiency, process_batch_size,
                                             steps_per_epoch)
from autofit.techniques import checkpointing, freeze, lora, sharding
from autofit.techniques.optimizer import state_bytes
from autofit.workload import LengthHistogram, Workload

HALF_UTILISATION_TOKENS = 2048.0
"""Tokens per micro-batch at which a 100-TFLOP device reaches half its large-batch matmul throughput on a
hidden size of 768: utilisation is t / (t + t_half), t_half = this x TFLOPs/100 x 768/hidden. Faster
devices need more work to fill, wider matmuls need fewer tokens; it makes a tiny micro-batch cost about
the same on any GPU (latency-bound), as measured."""
LAUNCH_SECONDS_PER_PASS = {"cuda": 1e-4, "cpu": 2e-5}
"""Kernel-launch and Python overhead of one block copy's forward or backward (FLOP estimates only;
measured block times already include it)."""
MICRO_BATCH_SECONDS = {"cuda": 1e-3, "cpu": 2e-4}
"""Fixed cost of a micro-batch: host-to-device copy, loss scaling, autograd set-up."""
OPTIMIZER_STEP_SECONDS = {"cuda": 2e-3, "cpu": 1e-3}
"""Fixed cost of optimizer.step() + zero_grad() (foreach kernels, grad clipping bookkeeping)."""
BANDWIDTH_EFFICIENCY = 0.7
"""Fraction of the spec-sheet memory bandwidth an elementwise optimizer kernel reaches."""
ADAPTER_KERNEL_SECONDS = {"cuda": 1e-5, "cpu": 5e-6}
"""Launch cost of one of a LoRA adapter's small kernels (an estimate, not calibrated on a card yet)."""
WEIGHT_GRAD_SHARE = 0.5
"""Share of a measured (full) backward spent on weight gradients: what the first trainable block pays."""
COLLECTIVE_EFFICIENCY = 0.7
"""Fraction of a link's spec-sheet bandwidth a ring all-gather / reduce-scatter / all-reduce reaches."""
COLLECTIVE_SECONDS = {"cuda": 5e-5, "cpu": 2e-4}
"""Fixed cost of one collective (launch and synchronisation)."""
PCIE_GBS = 25.0
"""Host-device copies of offloaded shards (PCIe 4.0 x16, pinned)."""
HOST_OPTIMIZER_GBS = 10.0
"""Memory traffic a CPU AdamW over offloaded shards sustains (vectorised, several cores)."""
OVERLAPS_COMMUNICATION = {"cuda": True, "cpu": False}
"""GPUs run collectives on their own streams while compute goes on (FSDP prefetches the next unit, DDP
reduces buckets during backward); gloo on the CPU runs them in line."""
OVERLAP_LEAK = 0.15
"""Share of overlapped communication time that still slows compute (collective kernels take SMs and memory
bandwidth): an estimate, like the other GPU constants."""


@dataclass(frozen=True)
class BlockPasses:
    """How many copies of a block run each kind of pass in one micro-batch."""

    forward: int
    backward_full: int
    """Copies computing input and weight gradients."""
    backward_weights: int
    """Copies computing weight gradients only (their input needs no gradient)."""
    recompute: int
    """Copies recomputing their forward (checkpointed, trainable)."""
    backward_input: int = 0
    """Copies computing input gradients only: a frozen base under LoRA (its weight gradients are skipped;
    the adapters' cost is added apart, `adapter_pass_seconds`)."""
    adapters: int = 0
    """Copies carrying LoRA adapters (each runs their forward and backward)."""

    @property
    def total(self) -> int:
        return self.forward + self.backward_full + self.backward_weights + self.recompute + self.backward_input


def block_passes(profile: Profile, knobs: Knobs) -> list[tuple[BlockProfile, BlockPasses]]:
    """Each block of the profile with the passes it runs under `knobs`."""
    recomputed = set(checkpointing.recomputed_layers(knobs, profile.num_layers))
    copies = freeze.block_copies(profile.blocks, knobs)
    result = []
    for block in profile.blocks:
        mine = [c for c in copies if c.block is block]
        if knobs.adapter == "lora":  # the base never computes weight gradients; only the head's copy trains
            full = block.kind == "head" and any(c.trains for c in mine)
            result.append((block, BlockPasses(
                forward=block.count, backward_full=sum(full and c.needs_input_grad for c in mine), backward_weights=0,
                recompute=sum(block.kind == "layer" and c.index in recomputed for c in mine),
                backward_input=sum(not full and c.needs_input_grad for c in mine),
                adapters=block.count if block.kind == "layer" else 0)))
            continue
        result.append((block, BlockPasses(
            forward=block.count,
            backward_full=sum(c.trains and c.needs_input_grad for c in mine),
            backward_weights=sum(c.trains and not c.needs_input_grad for c in mine),  # ids take no gradient
            recompute=sum(block.kind == "layer" and c.index in recomputed for c in mine),
        )))
    return result


def is_measured(profile: Profile, knobs: Knobs, device: DeviceSpec) -> bool:
    """Measured block times apply when they were taken on the target's device kind at this precision."""
    return timing_source(profile, knobs, device) == knobs.precision.value


def timing_source(profile: Profile, knobs: Knobs, device: DeviceSpec) -> str | None:
    """The precision whose measured block times the estimate starts from: the knobs' own when the profile
    timed it on the target's device kind, else another timed one (scaled by the device's throughput ratio,
    so that measured and estimated precisions stay comparable), else None (FLOPs alone)."""
    if profile.device != device.kind or (device.kind == "cuda" and profile.device_name != (device.hardware or "")):
        return None  # times of another kind of device, or of another card
    timed = [p.value for p in Precision if all(p.value in b.time for b in profile.blocks)]
    if knobs.precision.value in timed:
        return knobs.precision.value
    return timed[0] if timed else None


def matmul_flops_per_second(device: DeviceSpec, precision: Precision, tokens: int, hidden: int) -> float:
    """Achieved FLOP/s for a micro-batch of `tokens` tokens through matmuls `hidden` wide."""
    half = precision == Precision.fp16 or (precision == Precision.bf16 and device.supports_bf16)
    tflops = device.tflops_half if half else device.tflops_fp32
    t_half = HALF_UTILISATION_TOKENS * tflops / 100.0 * 768.0 / max(hidden, 1)
    utilisation = tokens / (tokens + t_half)
    return tflops * 1e12 * device.matmul_efficiency * max(utilisation, 1e-6)


def _pass_seconds(block: BlockProfile, knobs: Knobs, device: DeviceSpec, source: str | None, scale: float,
                  hidden: int, batch: int, seq: int) -> tuple[float, float, float]:
    """(forward, full backward, weight-only backward) seconds of one copy of `block`: its measured times
    at precision `source` times `scale`, or from FLOPs when nothing was measured."""
    if source is not None:
        fit = block.time[source]
        forward, backward = scale * fit.forward(batch, seq), scale * fit.backward(batch, seq)
        # The embeddings' measured backward already is weight-only (ids take no gradient).
        weights = backward if block.kind == "embeddings" else WEIGHT_GRAD_SHARE * backward
        return forward, backward, weights
    forward = block.flops_forward(batch, seq) / matmul_flops_per_second(device, knobs.precision, batch * seq, hidden)
    return forward, 2.0 * forward, forward


def micro_batch_seconds(profile: Profile, knobs: Knobs, device: DeviceSpec, batch: int, seq: int) -> float:
    """Seconds of one forward + backward of a (batch, seq) micro-batch."""
    source = timing_source(profile, knobs, device)
    launch = 0.0 if source is not None else LAUNCH_SECONDS_PER_PASS.get(device.kind, 1e-4)  # measured: included
    scale = 1.0  # a precision timed itself; another one by the device's throughput ratio
    if source is not None and source != knobs.precision.value:
        tokens, hidden = batch * seq, profile.hidden_size
        scale = (matmul_flops_per_second(device, Precision(source), tokens, hidden)
                 / matmul_flops_per_second(device, knobs.precision, tokens, hidden))
    seconds = MICRO_BATCH_SECONDS.get(device.kind, 1e-3)
    for block, passes in block_passes(profile, knobs):
        forward, full, weights = _pass_seconds(block, knobs, device, source, scale, profile.hidden_size, batch, seq)
        seconds += (passes.forward + passes.recompute) * forward
        seconds += passes.backward_full * full + passes.backward_weights * weights
        seconds += passes.backward_input * (full - WEIGHT_GRAD_SHARE * full if source is not None else forward)
        seconds += launch * passes.total
        if passes.adapters:  # a recompute runs the adapters' forward and dequantizes once more
            adapter, dequantize = adapter_pass_seconds(block, knobs, device, batch * seq)
            seconds += passes.adapters * (3 * adapter + 2 * dequantize) + passes.recompute * (adapter + dequantize)
    return seconds


def adapter_pass_seconds(block: BlockProfile, knobs: Knobs, device: DeviceSpec, tokens: int) -> tuple[float, float]:
    """(one pass of one layer copy's LoRA adapters, one dequantization of its NF4 weights) in seconds, for a
    micro-batch of `tokens` tokens. A layer runs the adapters three times (forward, input and weight
    gradients) and dequantizes twice (forward, input gradient). Rank-r matmuls and dequantization are bound
    by memory traffic: an adapter reads its input and writes/reads its rank-r and output tensors; a
    dequantization reads 0.5 B/weight and writes the compute dtype."""
    element = 4 if knobs.precision == Precision.fp32 else 2
    bandwidth = device.memory_bandwidth_gbs * 1e9 * BANDWIDTH_EFFICIENCY
    chosen = lora.targeted_linears(block, knobs.lora_targets)
    traffic = sum(tokens * (x.in_features + 2 * knobs.lora_rank + 2 * x.out_features) * element for x in chosen)
    flops = sum(2 * tokens * knobs.lora_rank * (x.in_features + x.out_features) for x in chosen)
    peak = (device.tflops_fp32 if knobs.precision == Precision.fp32 else device.tflops_half) * 1e12
    launches = 3 * len(chosen) * ADAPTER_KERNEL_SECONDS.get(device.kind, 1e-5)  # A, B, scale-and-add
    adapter = max(traffic / bandwidth, flops / (peak * device.matmul_efficiency)) + launches
    dequantize = sum(x.numel * (0.5 + element) for x in block.linears) / bandwidth if knobs.quantized else 0.0
    return adapter, dequantize


def trainable_tensors(profile: Profile, knobs: Knobs) -> tuple[list[int], list[int]]:
    """(numels of every trainable parameter tensor, the subset that are embedding weights)."""
    if knobs.adapter == "lora":
        return lora.trainable_numels(profile, knobs.lora_rank, knobs.lora_targets), []
    numels: list[int] = []
    embeddings: list[int] = []
    for copy in freeze.block_copies(profile.blocks, knobs):
        if copy.trains:
            numels += copy.block.param_numels
            embeddings += copy.block.embedding_numels
    return numels, embeddings


def optimizer_step_seconds(profile: Profile, knobs: Knobs, device: DeviceSpec, cluster: Cluster = SINGLE) -> float:
    """One AdamW step: read+write fp32 weights, read grads, read+write state (fp16 also unscales grads). Under
    FSDP each process steps its shard; offloaded, on the CPU."""
    numels, embeddings = trainable_tensors(profile, knobs)
    params = sum(numels)
    traffic = params * (8 + 4) + 2 * state_bytes(numels, embeddings, knobs.optimizer_bits)
    if knobs.precision == Precision.fp16:
        traffic += params * 4  # GradScaler's unscale + inf check reads every gradient once more
    bandwidth = device.memory_bandwidth_gbs * 1e9 * BANDWIDTH_EFFICIENCY
    if sharding.is_sharded(knobs, cluster):
        traffic /= cluster.processes
        if knobs.cpu_offload:
            bandwidth = HOST_OPTIMIZER_GBS * 1e9
    return traffic / bandwidth + OPTIMIZER_STEP_SECONDS.get(device.kind, 2e-3)


def epoch_shapes(knobs: Knobs, workload: Workload) -> tuple[tuple[tuple[int, int, float], ...], float]:
    """((micro-batch, expected padded length rounded, count) of an epoch, padding efficiency). They depend
    only on the batching knobs, so a search asks for each batching once."""
    hist = workload.lengths
    return _epoch_shapes(tuple(hist.lengths), tuple(hist.counts), workload.batch_size, knobs.micro_batch_size,
                         knobs.tokens_per_micro_batch, knobs.bucket_boundaries, knobs.pad_to_multiple_of)


@lru_cache(maxsize=4096)
def _epoch_shapes(lengths: tuple[int, ...], counts: tuple[int, ...], batch_size: int, micro_batch: int,
                  tokens: int | None, boundaries: tuple[int, ...], pad: int | None):
    hist = LengthHistogram(lengths=list(lengths), counts=list(counts))
    knobs = Knobs(micro_batch_size=micro_batch, tokens_per_micro_batch=tokens, bucket_boundaries=boundaries,
                  pad_to_multiple_of=pad)
    shapes = epoch_micro_batches(knobs, hist, batch_size)
    return tuple((b, round(length), count) for b, length, count in shapes), padding_efficiency(knobs, hist, batch_size)


def predict_time(profile: Profile, knobs: Knobs, workload: Workload, device: DeviceSpec,
                 cluster: Cluster = SINGLE) -> TimePrediction:
    """Predicted step and epoch time of training `profile`'s model with `knobs` on `workload`; with several
    processes, of the busiest one (each runs its share of every step, `process_batch_size` examples)."""
    knobs.validate_for(profile.num_layers)
    hist = workload.lengths
    share = process_batch_size(workload.batch_size, cluster.processes)
    shapes, efficiency = epoch_shapes(knobs, workload.model_copy(update={"batch_size": share}))
    scale = share / workload.batch_size  # the shapes are of an epoch of all examples in steps of `share`
    seconds = [(count * scale, micro_batch_seconds(profile, knobs, device, batch, seq)) for batch, seq, count in shapes]
    micro_batches = sum(count for count, _ in seconds)
    steps = steps_per_epoch(hist.num_samples, workload.batch_size)
    compute = sum(count * t for count, t in seconds)
    per_micro, per_step = communication_seconds(profile, knobs, device, cluster, compute / max(micro_batches, 1e-9))
    epoch = compute + micro_batches * per_micro + steps * (optimizer_step_seconds(profile, knobs, device, cluster)
                                                          + per_step)
    return TimePrediction(
        step_seconds=epoch / steps,
        epoch_seconds=epoch,
        samples_per_second=hist.num_samples / epoch,
        padding_efficiency=efficiency,
        measured=is_measured(profile, knobs, device),
    )


def communication_seconds(profile: Profile, knobs: Knobs, device: DeviceSpec, cluster: Cluster,
                          micro_batch_compute: float) -> tuple[float, float]:
    """(exposed seconds per micro-batch, per step) of the processes' collectives: bytes over the slowest
    link a ring crosses. On a GPU they overlap compute: FSDP's gathers hide behind a micro-batch's compute but
    the first (the root's and a unit's); DDP's all-reduce behind the last micro-batch's backward."""
    if not cluster.distributed:
        return 0.0, 0.0
    bandwidth = cluster.bandwidth_gbs * 1e9 * COLLECTIVE_EFFICIENCY
    latency = COLLECTIVE_SECONDS.get(device.kind, 1e-4)
    moved = sharding.traffic(profile, knobs, cluster)
    micro = moved.micro_batch_bytes / bandwidth + latency * moved.micro_batch_collectives
    micro += moved.offload_bytes / (PCIE_GBS * 1e9 * COLLECTIVE_EFFICIENCY)
    step = moved.step_bytes / bandwidth + latency * moved.step_collectives
    if OVERLAPS_COMMUNICATION.get(device.kind, False):
        micro = _exposed(micro, micro_batch_compute, micro / max(1, moved.micro_batch_collectives))
        step = _exposed(step, (2 / 3) * micro_batch_compute, 0.1 * step)  # the last bucket waits for backward
    return micro, step


def _exposed(communication: float, window: float, unhidden: float) -> float:
    """Seconds `communication` adds when it overlaps `window` seconds of compute, of which `unhidden` cannot
    overlap at all (the first gather, the last bucket)."""
    hidden = min(communication - unhidden, window)
    return communication - hidden + OVERLAP_LEAK * hidden
