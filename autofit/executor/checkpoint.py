"""Save and resume a run: weights (safetensors), optimizer, GradScaler, data position, RNG, counters, plan.

A LoRA run saves only what trains (adapters, the task-head copy): its frozen base is the model the caller
passes again, rebuilt the same way (same base storage, adapters put on), so a checkpoint stays small.

Each checkpoint is written into a temporary directory and renamed into place (`checkpoint-<step>`), so a
kill during a save leaves the previous checkpoint whole; older checkpoints are removed only after the new
one exists. A resumed run restores every random generator, so it continues exactly where it stopped.

A multi-process run (dist_checkpoint.py) stores every process's generators in `rng.pt`, and under FSDP
its weights and optimizer state as torch.distributed.checkpoint shards in `sharded/` instead of the two
tensor files.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError
from safetensors.torch import load_file, load_model, save_file, save_model

from autofit.executor.result import EvalRecord, FallbackRecord, StepRecord
from autofit.plan import Plan

PREFIX = "checkpoint-"
TMP_PREFIX, OLD_PREFIX = ".tmp-", ".old-"
"""A checkpoint being written, and one being replaced by a save of the same step."""
TRAINABLE_ONLY = {"autofit_tensors": "trainable"}
"""safetensors metadata of a checkpoint that holds only the trainable tensors (a LoRA run)."""
FILES = ("model.safetensors", "optimizer.pt", "scaler.pt", "rng.pt", "trainer_state.json", "plan.json")
SHARDED = "sharded"
"""The folder of an FSDP checkpoint's weights and optimizer state (torch.distributed.checkpoint)."""
SHARDED_FILES = (f"{SHARDED}/.metadata",) + FILES[2:]


class CheckpointError(ValueError):
    """A checkpoint that is missing or does not belong to this run."""


class TrainerState(BaseModel):
    """Counters and records of a run: everything but tensors. Saved with every checkpoint; a file whose
    fields are not these (an edit, a damaged copy) does not load, rather than being read as a run on other
    data."""

    model_config = ConfigDict(extra="forbid")

    step: NonNegativeInt = 0
    """Optimizer steps completed."""
    epoch: NonNegativeInt = 0
    """The epoch being trained (0-based)."""
    position: NonNegativeInt = 0
    """Steps of `epoch` already trained: a resumed run continues with the next one."""
    data_fingerprint: str = Field(min_length=1)
    """`fingerprint(training data)`: a resume on other data is refused."""
    run_fingerprint: dict[str, str] = {}
    """What must not change across a resume (the plan's knobs and batch, seed, lr, ...), each as text."""
    history: list[StepRecord] = []
    eval: list[EvalRecord] = []
    fallbacks: list[FallbackRecord] = []
    real_tokens: int = 0
    computed_tokens: int = 0
    train_seconds: float = 0.0
    samples: int = 0


def save_checkpoint(output_dir: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, plan: Plan, state: TrainerState, keep: int = 1,
                    trainable_only: bool = False, rng: dict | None = None) -> Path:
    """Write `checkpoint-<step>` atomically and keep only the newest `keep` checkpoints; with `trainable_only`
    the weights are only the tensors that train. `rng`: the generators to store (default: this process's)."""
    tmp, final = begin_checkpoint(output_dir, state.step)
    if trainable_only:
        save_file({name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad},
                  str(tmp / "model.safetensors"), metadata=TRAINABLE_ONLY)
    else:
        save_model(model, str(tmp / "model.safetensors"))  # tied weights are stored once
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    return finish_checkpoint(tmp, final, scaler=scaler, plan=plan, state=state, keep=keep, rng=rng)


def begin_checkpoint(output_dir: str | Path, step: int) -> tuple[Path, Path]:
    """(an empty temporary folder to write the checkpoint of `step` into, its final name)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"{PREFIX}{step:08d}"
    tmp = output_dir / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp, final


def finish_checkpoint(tmp: Path, final: Path, *, scaler: torch.amp.GradScaler, plan: Plan, state: TrainerState,
                      keep: int = 1, rng: dict | None = None) -> Path:
    """Write the rest (scaler, generators, counters, plan) beside the tensors in `tmp`, rename it into place
    and drop all but it and the newest `keep - 1` others."""
    output_dir = final.parent
    torch.save(scaler.state_dict(), tmp / "scaler.pt")
    torch.save(rng if rng is not None else rng_state(), tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(state.model_dump_json(indent=1))
    plan.save(tmp / "plan.json")
    if final.exists():  # the same step saved again (e.g. at the end, after evaluation)
        old = output_dir / f"{OLD_PREFIX}{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    older = [path for path in list_checkpoints(output_dir) if path != final]  # never the save just written
    for stale in older[:max(0, len(older) - (keep - 1))]:
        shutil.rmtree(stale)
    return final


def complete(path: Path) -> bool:
    """Whether `path` holds every file of a checkpoint (single-process or sharded)."""
    return path.is_dir() and any(all((path / f).exists() for f in files) for files in (FILES, SHARDED_FILES))


def numbered_checkpoints(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-<step>` folders in `output_dir`, complete or not, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
             and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    return [p for p in numbered_checkpoints(output_dir) if complete(p)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint in `output_dir`, or None when there is none. Saves land whole (a folder renamed
    into place), so a newest `checkpoint-<step>` folder that lacks a file was damaged after it was written:
    a CheckpointError names what it lacks, instead of a resume quietly starting from an older step."""
    numbered = numbered_checkpoints(output_dir)
    if numbered and not complete(numbered[-1]):
        newest = numbered[-1]
        missing = min(([f for f in files if not (newest / f).exists()] for files in (FILES, SHARDED_FILES)), key=len)
        before = [c.name for c in numbered[:-1] if complete(c)]
        then = f"resume from {before[-1]}" if before else "start from the first step"
        raise CheckpointError(f"{newest} is incomplete (it lacks {', '.join(missing)}): remove it to {then}, "
                              "or use another output_dir")
    return numbered[-1] if numbered else None


def load_plan_and_state(path: str | Path) -> tuple[Plan, TrainerState]:
    """The plan in force and the counters of checkpoint `path` (before the model is set up)."""
    path = Path(path)
    if not complete(path):
        raise CheckpointError(f"{path} is not a complete autofit checkpoint")
    try:
        state = TrainerState.model_validate_json((path / "trainer_state.json").read_text())
    except (ValidationError, OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is damaged: its trainer_state.json does not read "
                              f"({str(error).splitlines()[0]})") from None
    return Plan.load(path / "plan.json"), state


def load_tensors(path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, trainable_only: bool = False, rank: int = 0) -> None:
    """Restore weights (with `trainable_only`: only the trainable ones, which must be all there), optimizer and
    scaler state, then every RNG (last, so nothing consumes it; `rank`'s of a multi-process checkpoint)."""
    path = Path(path)
    device = next(model.parameters()).device
    try:
        if trainable_only:
            _load_trainable(model, path / "model.safetensors", device)
        else:
            load_model(model, path / "model.safetensors", device=str(device))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    except Exception as error:  # noqa: BLE001 - safetensors, pickle and torch each raise their own kinds
        raise damaged(path, error) from None
    load_scaler_and_rng(path, scaler, rank)


def damaged(path: Path, error: BaseException) -> CheckpointError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return CheckpointError(f"{path} is damaged: {type(error).__name__}: {first}")


def load_scaler_and_rng(path: str | Path, scaler: torch.amp.GradScaler, rank: int = 0) -> None:
    """Restore the GradScaler, then this process's generators (last, so nothing consumes them)."""
    path = Path(path)
    try:
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
        rng = torch.load(path / "rng.pt", weights_only=True)
        if "ranks" in rng:  # a multi-process checkpoint: every process's generators
            rng = rng["ranks"][rank]
    except Exception as error:  # noqa: BLE001
        raise damaged(path, error) from None
    _set_rng_state(rng)


def _load_trainable(model: torch.nn.Module, file: Path, device: torch.device) -> None:
    """Copy a trainable-only checkpoint into `model`'s trainable parameters; other names, or missing ones,
    mean it was saved from another model or plan."""
    tensors = load_file(file, device=str(device))
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if tensors.keys() != trainable.keys():
        odd = sorted(tensors.keys() ^ trainable.keys())
        raise ValueError(f"its trainable tensors are not this model's ({len(odd)} differ, e.g. {odd[0]})")
    with torch.no_grad():
        for name, tensor in tensors.items():
            trainable[name].copy_(tensor)


def rng_state() -> dict:
    version, keys, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [version, list(keys), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
