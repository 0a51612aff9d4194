"""Several processes train one plan (`plan.cluster.processes` > 1): who they are, what each trains of a step,
and the few numbers they exchange.

The launcher (`torchrun --nproc_per_node N`, or `accelerate launch`) starts one process per device;
accelerate's PartialState joins them into a process group from the launcher's environment (gloo on the CPU,
nccl on CUDA). Every process draws the same steps (StepSampler is seeded), deals each step's examples out
(accumulation.deal_step) and cuts its share as one process would (cut_step). Each micro-batch's loss is
weighted by its share of the *whole* step's units, which every process can count (each has all the data),
so the gradient DDP or FSDP averages over the processes is exactly the whole step's. FSDP's all-gathers are
collectives, so every process runs as many forward/backward passes as the busiest one this step; the others
make up the difference with one-example passes at loss weight 0 (also when a step has fewer examples than
processes). Everything a process decides alone is deterministic, so they all agree without talking.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from autofit.executor.validate import ExecutorInputError
from autofit.knobs import Knobs
from autofit.plan import Plan
from autofit.techniques.accumulation import AccumulationError, cut_step, deal_step

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process among the run's processes."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Where collectives put their tensors (nccl needs them on this process's GPU)."""

    @property
    def main(self) -> bool:
        """Process 0: the one that writes (checkpoint files, adapters, logs, the progress bar)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the processes (one all-reduce)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """Whether `flag` is set on any process (so all of them stop together)."""
        return bool(self.sum(float(flag))[0]) if self.distributed else flag

    def gather(self, value: T) -> list[T]:
        """Every process's `value`, in rank order, on every process."""
        if not self.distributed:
            return [value]
        found: list[Any] = [None] * self.size
        dist.all_gather_object(found, value)
        return found

    def broadcast(self, value: T) -> T:
        """Process 0's `value` on every process."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def first(self, work: Callable[[], T], default: T) -> T:
        """`work()` on process 0 while the others wait (they get `default`): a file-system change made once.
        A ValueError it raises (a one-line refusal) is raised on every process, which would otherwise wait
        for ever on the next collective."""
        result, error = default, None
        if self.main:
            try:
                result = work()
            except ValueError as raised:
                error = raised
        error = self.broadcast(error)  # a collective: the others wait here for process 0
        if error is not None:
            raise error
        return result


SINGLE_WORLD = World()


def launch_hint(plan: Plan) -> str:
    cluster = plan.cluster
    nodes = f" --nnodes {cluster.machines}" if cluster.machines > 1 else ""
    return (f"launch it with torchrun{nodes} --nproc_per_node {cluster.per_machine} "
            f"(or accelerate launch --num_processes {cluster.processes})")


def check_world(plan: Plan, running: int) -> None:
    """Refuse a run whose process count is not the plan's, in one line."""
    wanted = plan.cluster.processes
    if running == wanted:
        return
    are = "is" if running == 1 else "are"
    if wanted == 1:
        raise ExecutorInputError(f"this plan is for 1 process and {running} {are} running: launch it without "
                                 f"torchrun, or plan again for {running} processes")
    raise ExecutorInputError(f"this plan is for {wanted} processes and {running} {are} running: {launch_hint(plan)}")


def start(plan: Plan, device_type: str) -> World:
    """Join the processes the launcher started (a plan for one process: nothing to join) and check there are
    as many as the plan is for."""
    if plan.cluster.processes == 1:
        return SINGLE_WORLD  # today's path; build() refuses a 1-process plan run by several processes
    from accelerate.state import PartialState

    state = PartialState(cpu=device_type == "cpu")  # MULTI_CPU with gloo on the CPU, nccl on GPUs
    check_world(plan, state.num_processes)
    return World(rank=state.process_index, size=state.num_processes, device=state.device)


def check_same_run(world: World, data_print: str, run_print: dict[str, str], epochs: int,
                   max_steps: int | None) -> None:
    """Every process must train the same data with the same plan and settings: with another seed its steps
    would differ (DDP would average gradients of different examples, FSDP would wait for ever on a collective
    the others never make). Refused on every process at once, in one line."""
    if not world.distributed:
        return
    runs = world.gather((data_print, sorted(run_print.items()), epochs, max_steps))
    differs = [name for k, name in enumerate(("data", "plan or settings (seed, lr, ...)", "epochs", "max_steps"))
               if any(run[k] != runs[0][k] for run in runs)]
    if differs:
        raise ExecutorInputError(f"the {len(runs)} processes were given different {' and '.join(differs)}: every "
                                 "process must call train with the same model, data and settings")


def check_plan(plan: Plan) -> None:
    """Multi-process plans the executor cannot run, refused before anything changes."""
    k = plan.knobs
    if plan.cluster.processes == 1 or k.strategy != "fsdp" or k.adapter == "none":
        return
    if k.base_dtype == "nf4":
        raise ExecutorInputError("FSDP cannot shard a 4-bit (nf4) base: its packed weights and quantization "
                                 "state would be split and gathered as plain bytes; use strategy=ddp")
    if k.base_dtype != "fp32":
        raise ExecutorInputError(f"FSDP cannot shard a {k.base_dtype} base with fp32 adapters: it gathers one "
                                 "dtype per unit; use strategy=ddp or base_dtype=fp32")


# ---- a step's share --------------------------------------------------------------------------------------


@dataclass
class Share:
    """One process's part of a step: its micro-batches (example indices), the zero-weight passes last."""

    pieces: list[list[int]]
    weights: list[float] | None
    """Each micro-batch's units over the whole step's (all processes'); 0 for a pass that only keeps counts
    equal. None for a one-process run: the executor weighs its micro-batches by their examples' units
    (loop.unit_weights)."""
    padding: int
    """How many of the pieces, at the end, are such passes."""


def share_step(step: Sequence[int], lengths: Sequence[int], units: Callable[[int], int], knobs: Knobs,
               uppers: dict[int, int], exact: frozenset[int], world: World) -> Share:
    """This process's share of `step` among `world.size` processes: its dealt examples cut into micro-batches
    (those without a unit dropped, as one process skips them), then zero-weight passes of the step's shortest
    example with a unit, up to the most micro-batches any process runs. One process: the step cut as is."""
    if not world.distributed:
        return Share(pieces=cut_step(step, lengths, knobs, uppers, exact), weights=None, padding=0)
    total = sum(units(i) for i in step)
    if total < 1:
        raise AccumulationError("an optimizer step must hold at least one unit, got 0")
    cuts = [[piece for piece in cut_step(share, lengths, knobs, uppers, exact) if sum(map(units, piece))]
            for share in deal_step(step, lengths, world.size)]
    most = max(len(cut) for cut in cuts)
    mine = cuts[world.rank]
    filler = [min((i for i in step if units(i)), key=lambda i: (lengths[i], i))]
    padding = most - len(mine)
    return Share(pieces=mine + [filler] * padding,
                 weights=[sum(map(units, piece)) / total for piece in mine] + [0.0] * padding, padding=padding)
