"""What a resumed run must match: the same data, the same plan and the same run settings.

A checkpoint records fingerprints of what it was trained with. A resume that changes any of them would
continue a different run while printing the new one's numbers, so it is refused, naming what differs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from autofit.data import TokenizedData
from autofit.executor import checkpoint as ckpt
from autofit.executor.validate import ExecutorInputError
from autofit.plan import Plan

RUN_SETTINGS = ("seed", "lr", "weight_decay", "max_grad_norm", "drop_last")
"""Run options that shape every step (the step order, the update): they must not change on resume."""


def data_fingerprint(data: TokenizedData) -> str:
    """A digest of the examples (ids, token types, labels) and their order: same digest, same data."""
    digest = hashlib.sha256()
    for field in ("input_ids", "token_type_ids", "labels"):
        digest.update(f"{field}={getattr(data, field)!r};".encode())
    return f"{len(data)} examples, sha256 {digest.hexdigest()[:16]}"


BASE_SAMPLE = 64
"""Leading elements of each tensor a LoRA base's digest reads: enough to tell two sets of weights apart, few
enough to cost nothing on a 7B model."""


def base_fingerprint(model: nn.Module) -> str:
    """A digest of the first BASE_SAMPLE elements of every parameter and buffer, by name: LoRA checkpoints hold
    only the adapters, so a resume must find the same frozen base under them."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted([*model.named_parameters(), *model.named_buffers()], key=lambda item: item[0]):
            sample = tensor.detach().reshape(-1)[:BASE_SAMPLE].contiguous().cpu()
            digest.update(name.encode() + sample.view(torch.uint8).numpy().tobytes())
    return f"sha256 {digest.hexdigest()[:16]}"


def run_fingerprint(plan: Plan, model: nn.Module | None = None, **settings: object) -> dict[str, str]:
    """What defines the run's steps, as text: the model, the effective batch, every knob, the settings; under
    LoRA, the frozen base's weights (`model`)."""
    found = {"model": f"{plan.model_type} {plan.num_params:,} parameters, {plan.num_layers} layers",
             "task": plan.task, "batch_size": str(plan.batch_size), "device": plan.device.kind}
    if plan.cluster.processes > 1:  # (absent for one process, as in checkpoints from before multi-process runs)
        found["processes"] = str(plan.cluster.processes)
    found.update({f"knobs.{name}": repr(value) for name, value in plan.knobs.model_dump(mode="json").items()})
    found.update({name: repr(settings[name]) for name in RUN_SETTINGS if name in settings})
    if plan.knobs.adapter == "lora" and model is not None:
        found["base_weights"] = base_fingerprint(model)
    return found


def resume_point(output_dir: str, data: str, run: dict[str, str]) -> tuple[Path, Plan, ckpt.TrainerState] | None:
    """The newest checkpoint in `output_dir` with the plan in force and the counters, or None when there is
    none yet (the run starts fresh). Raises ExecutorInputError when it was trained with other data, another
    plan or other settings."""
    path = ckpt.latest_checkpoint(output_dir)
    if path is None:
        return None
    plan, state = ckpt.load_plan_and_state(path)
    if state.data_fingerprint != data:
        raise ExecutorInputError(f"cannot resume from {path}: it was trained on other data "
                                 f"({state.data_fingerprint or 'unknown'}; this data: {data})")
    changed = [f"{name} {state.run_fingerprint.get(name, '(unset)')} -> {value}" for name, value in run.items()
               if state.run_fingerprint.get(name) != value
               and not (name == "base_weights" and name not in state.run_fingerprint)]  # older checkpoints
    if changed:
        raise ExecutorInputError(f"cannot resume from {path}: it was trained with another plan or settings "
                                 f"({'; '.join(changed)})")
    return path, plan, state


def resume_noting(output_dir: str | None, data_print: str, run_print: dict[str, str], epochs: int,
                  max_steps: int | None, notes: list[str], epoch_steps: int | None = None
                  ) -> tuple[Path, Plan, ckpt.TrainerState] | None:
    """The checkpoint to go on from (resume_point's), saying in `notes` where the run goes on (`epoch_steps`:
    steps per epoch), or that there is none or it is finished."""
    saved = resume_point(output_dir, data_print, run_print)
    if saved is None:
        notes.append(f"no checkpoint in {output_dir} yet: starting from the first step")
    elif saved[2].epoch >= epochs or (max_steps is not None and saved[2].step >= max_steps):
        notes.append(f"the run in {output_dir} already finished ({_steps(saved[2].step)}): nothing left "
                     "to train; what follows is that run's (ask for more --epochs or --max-steps to go on)")
    else:
        state = saved[2]
        epoch, position = state.epoch, state.position
        if epoch_steps is not None and position >= epoch_steps:  # saved after an epoch's last step, before its end
            epoch, position = epoch + 1, 0
        where = f"{position} of its steps done" if position else "at its start"
        notes.append(f"resuming from {saved[0]}: {_steps(state.step)} done; epoch {epoch + 1} goes on {where}")
    return saved


def _steps(count: int) -> str:
    return f"{count} optimizer step{'' if count == 1 else 's'}"
