"""Where a plan runs when it outgrows one device: how many processes (one per GPU), on how many machines, and
how fast they talk. Pure data, like DeviceSpec: the memory model reads the world size, the time model the
bandwidths.

Bandwidths are per process and per direction, as sold (the time model applies its own efficiency):
NVLink 3 moves 300 GB/s per GPU, PCIe 4.0 x16 32 GB/s, an InfiniBand NDR port 400 Gb/s = 50 GB/s, 100 Gb
Ethernet 12.5 GB/s. Processes on one CPU machine talk through shared memory (gloo): a few GB/s.
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger("autofit")

Interconnect = Literal["nvlink", "pcie", "shared-memory"]
"""How the processes of one machine reach each other."""

Network = Literal["infiniband", "ethernet"]
"""How machines reach each other."""

INTERCONNECT_GBS: dict[str, float] = {"nvlink": 300.0, "pcie": 32.0, "shared-memory": 4.0}
NETWORK_GBS: dict[str, float] = {"infiniband": 50.0, "ethernet": 12.5}

MAX_PROCESSES = 4096
"""A sanity bound on plan files, far above any real job."""


class Cluster(BaseModel):
    """The processes a plan trains on: `processes` in all (one per GPU), spread evenly over `machines`."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    processes: int = Field(1, ge=1, le=MAX_PROCESSES)
    """The world size: GPUs (or CPU processes) in all."""
    machines: int = Field(1, ge=1, le=MAX_PROCESSES)
    interconnect: Interconnect = "pcie"
    network: Network = "ethernet"
    """Only read when there are several machines."""
    host_memory_bytes: int | None = Field(None, ge=0)
    """CPU RAM of one machine, when given: a plan whose offloaded shards need more is not chosen."""

    @model_validator(mode="after")
    def _even(self) -> Cluster:
        if self.machines > self.processes:
            raise ValueError(f"{self.machines} machines need at least as many processes, not {self.processes}")
        if self.processes % self.machines:
            raise ValueError(f"{self.processes} processes do not spread evenly over {self.machines} machines")
        return self

    @property
    def per_machine(self) -> int:
        return self.processes // self.machines

    @property
    def distributed(self) -> bool:
        return self.processes > 1

    @property
    def bandwidth_gbs(self) -> float:
        """The slowest link a ring collective crosses: between machines when there are several."""
        inside = INTERCONNECT_GBS[self.interconnect]
        return inside if self.machines == 1 else min(inside, NETWORK_GBS[self.network])

    def describe(self) -> str:
        """"4 processes on 1 machine (pcie)", for people."""
        if not self.distributed:
            return "1 process"
        where = f"{self.machines} machine{'s' if self.machines > 1 else ''}"
        links = self.interconnect + (f", {self.network} between machines" if self.machines > 1 else "")
        return f"{self.processes} processes on {where} ({links})"


SINGLE = Cluster()
"""One process on one device: every plan before multi-GPU planning."""


def make_cluster(gpus: int = 1, machines: int = 1, *, interconnect: str | None = None, network: str = "ethernet",
                 device_kind: str = "cuda", host_memory_bytes: int | None = None) -> Cluster:
    """A Cluster from user input, with one-line errors: `interconnect` defaults to PCIe between GPUs and to
    shared memory between CPU processes."""
    given_interconnect = interconnect
    if interconnect is None:
        interconnect = "shared-memory" if device_kind == "cpu" else "pcie"
    if interconnect not in INTERCONNECT_GBS:
        raise ValueError(f"unknown interconnect {interconnect!r}; known: {', '.join(INTERCONNECT_GBS)}")
    if network not in NETWORK_GBS:
        raise ValueError(f"unknown network {network!r}; known: {', '.join(NETWORK_GBS)}")
    for name, value in (("gpus", gpus), ("machines", machines)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PROCESSES:
            raise ValueError(f"{name} must be a whole number from 1 to {MAX_PROCESSES}, not {value!r}")
    if machines > gpus:
        raise ValueError(f"{machines} machines need at least {machines} GPUs, not {gpus}")
    if gpus % machines:
        raise ValueError(f"{gpus} GPUs do not spread evenly over {machines} machines")
    unused = [flag for flag, idle in (("--interconnect", given_interconnect is not None and gpus == 1),
                                      ("--network", network != "ethernet" and machines == 1),
                                      ("--host-memory", host_memory_bytes is not None and gpus == 1)) if idle]
    if unused:  # they describe how several GPUs share a model: said, not silently dropped
        where = "one GPU" if gpus == 1 else "one machine"
        log.info(f"{', '.join(unused)} change{'s' if len(unused) == 1 else ''} nothing on {where}")
    return Cluster(processes=gpus, machines=machines, interconnect=interconnect, network=network,
                   host_memory_bytes=host_memory_bytes)
