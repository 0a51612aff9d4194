"""Checkpoints of a multi-process run: the same folders as checkpoint.py, written together.

- FSDP: every process writes its shards of the weights and optimizer state with torch.distributed.checkpoint
  (`get_state_dict` / `dcp.save`) into `sharded/` of the one temporary folder process 0 made; a LoRA run
  stores only what trains. A resume loads them back into the freshly sharded model (`dcp.load` /
  `set_state_dict`), so it must run on as many processes (the plan says so).
- DDP: every process holds the same weights and optimizer state; process 0 writes them as a one-process run
  does (from the unwrapped module), and every process reads them back.

Either way process 0 writes the scaler, counters and plan, and `rng.pt` holds every process's generators
(each draws its own dropout masks), so each process resumes exactly where it stopped. Everything here is a
collective: every process calls it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from autofit.executor import checkpoint as ckpt
from autofit.executor.distributed import World
from autofit.plan import Plan
from autofit.techniques import sharding


def save(world: World, output_dir: str, *, wrapped: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
         scaler: torch.amp.GradScaler, plan: Plan, state: ckpt.TrainerState, lora: bool) -> Path:
    """Write `checkpoint-<step>` from all processes; returns its path (on every process)."""
    rng = {"ranks": world.gather(ckpt.rng_state())}
    if not sharding.is_fsdp(wrapped):
        saved = world.first(lambda: ckpt.save_checkpoint(output_dir, model=model, optimizer=optimizer,
                                                         scaler=scaler, plan=plan, state=state,
                                                         trainable_only=lora, rng=rng), None)
        return world.broadcast(saved)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp, final = world.broadcast(ckpt.begin_checkpoint(output_dir, state.step) if world.main else None)
    model_state, optimizer_state = get_state_dict(wrapped, optimizer, options=sharding.state_dict_options(lora))
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp / ckpt.SHARDED)
    world.first(lambda: ckpt.finish_checkpoint(tmp, final, scaler=scaler, plan=plan, state=state, rng=rng), None)
    return final


def load(world: World, path: Path, *, wrapped: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
         scaler: torch.amp.GradScaler, lora: bool) -> None:
    """Restore what `save` wrote into the wrapped model, optimizer and scaler, and this process's generators."""
    if not sharding.is_fsdp(wrapped):
        ckpt.load_tensors(path, model=model, optimizer=optimizer, scaler=scaler, trainable_only=lora,
                          rank=world.rank)
        return
    if not (path / ckpt.SHARDED).is_dir():
        raise ckpt.CheckpointError(f"{path} holds no FSDP shards (was it saved by a DDP or 1-process run?)")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    options = sharding.state_dict_options(lora)
    try:
        model_state, optimizer_state = get_state_dict(wrapped, optimizer, options=options)
        states = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(states, checkpoint_id=path / ckpt.SHARDED)
        set_state_dict(wrapped, optimizer, model_state_dict=states["model"],
                       optim_state_dict=states["optimizer"], options=options)
    except Exception as error:  # noqa: BLE001 - torch.distributed.checkpoint raises its own kinds
        raise ckpt.damaged(path, error) from None
    ckpt.load_scaler_and_rng(path, scaler, world.rank)
