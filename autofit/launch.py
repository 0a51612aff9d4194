"""From a plan to processes: accelerate's config file for it, and the command that starts them.

autofit trains under `accelerate launch` (or `torchrun`): the launcher starts one process per GPU on each
machine and sets up the process group; the executor then applies the plan's DDP or FSDP2 itself
(techniques/sharding.py). The config's FSDP section says what the plan does, in accelerate's words, so the
file reads true to anyone who opens it; autofit takes the knobs from the plan, not from the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from autofit.knobs import Knobs

DEFAULT_PORT = 29500


def distributed_type(knobs: Knobs, processes: int) -> str:
    """accelerate's name for how the processes share the work. Replicas are MULTI_GPU even for CPU processes:
    `accelerate launch` starts several processes (through torchrun) for it, while MULTI_CPU wants mpirun;
    `use_cpu` and autofit's executor join them with gloo."""
    if knobs.strategy == "fsdp":
        return "FSDP"
    return "NO" if processes == 1 else "MULTI_GPU"


def accelerate_config(knobs: Knobs, *, processes: int, machines: int, device_kind: str) -> dict[str, Any]:
    """The contents of an accelerate config file (`accelerate config` writes the same keys)."""
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": distributed_type(knobs, processes),
        "mixed_precision": "no" if knobs.precision.value == "fp32" else knobs.precision.value,
        "num_processes": processes,
        "num_machines": machines,
        "machine_rank": 0,
        "use_cpu": device_kind == "cpu",
        "rdzv_backend": "static",
        "same_network": True,
        "main_training_function": "main",
        "downcast_bf16": "no",
    }
    if machines > 1:  # each machine runs the launch with its own --machine_rank and the first one's address
        config.update(main_process_ip="MAIN_MACHINE_IP", main_process_port=DEFAULT_PORT)
    if knobs.strategy == "fsdp":
        config["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # the model's own layer class
            "fsdp_reshard_after_forward": knobs.reshard_after_forward,
            "fsdp_offload_params": knobs.cpu_offload,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_cpu_ram_efficient_loading": False,
            "fsdp_activation_checkpointing": False,  # autofit checkpoints the plan's layers itself
        }
    return config


def write_accelerate_config(path: str | Path, knobs: Knobs, *, processes: int, machines: int,
                            device_kind: str) -> Path:
    path = Path(path)
    config = accelerate_config(knobs, processes=processes, machines=machines, device_kind=device_kind)
    try:
        path.write_text(yaml.safe_dump(config, sort_keys=False))
    except OSError as error:
        raise ValueError(f"cannot write the accelerate config {path}: {error.strerror or error}") from None
    return path


def launch_command(config_path: str | Path, plan_path: str | Path, data: str = "DATA", *,
                   machines: int = 1) -> str:
    """The command that trains a saved plan on every process of one machine (run on each machine, with its
    own --machine_rank, when there are several)."""
    rank = " --machine_rank N --main_process_ip MAIN_MACHINE_IP" if machines > 1 else ""
    return (f"accelerate launch --config_file {config_path}{rank} -m autofit train --plan {plan_path} "
            f"--data {data}")
