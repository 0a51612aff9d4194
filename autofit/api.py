"""plan() and train(): profile -> search -> Plan -> executor. Each step lives in its own module; this only
wires them together."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from autofit.budget import parse_budget
from autofit.data import TokenizedData, prepare_examples, text_lengths
from autofit.devices import DEVICES, DeviceSpec, get_device
from autofit.models import default_task, load_model, load_tokenizer, max_sequence_length, resolve_config
from autofit.plan import Plan
from autofit.profiler import Profile, profile_model
from autofit.profiler.cache import cached_profile
from autofit.profiler.profile import PRECISIONS, package_versions
from autofit.search import alternatives, search
from autofit.workload import LengthHistogram, Workload

ModelSpec = str | os.PathLike | PretrainedConfig | nn.Module
DEFAULT_NUM_SAMPLES = 10_000
"""Examples per epoch assumed when planning without data (only the epoch time depends on it)."""


def target_device(device: str | DeviceSpec | None, *, train: bool = False) -> DeviceSpec:
    """The device a plan is for: a name from autofit.devices, the visible GPU, or (no GPU) a generic CUDA
    card when planning and the CPU when training."""
    if isinstance(device, DeviceSpec):
        return device
    if device is not None:
        return get_device(device)
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name().lower()
        known = next((spec for key, spec in DEVICES.items() if key != "cuda" and key in name), DEVICES["cuda"])
        return known.model_copy(update={"memory_bytes": torch.cuda.get_device_properties(0).total_memory})
    return get_device("cpu" if train else "cuda")


def make_workload(task: str, *, seq_len: int, batch_size: int, lengths: list[int] | None,
                  num_samples: int | None = None) -> Workload:
    """The training job: the data's real lengths when given, else `num_samples` examples of `seq_len`."""
    if lengths is not None:
        if not lengths:
            raise ValueError("the data has no examples")
        return Workload(task=task, lengths=LengthHistogram.from_lengths([max(1, n) for n in lengths]),
                        batch_size=batch_size, from_data=True)
    hist = LengthHistogram.fixed(seq_len, num_samples or DEFAULT_NUM_SAMPLES)
    return Workload(task=task, lengths=hist, batch_size=batch_size, from_data=False)


def plan(model: ModelSpec, budget: str | int = "16GB", *, seq_len: int = 512, batch_size: int = 32,
         data: Any = None, policy: str = "balanced", task: str | None = None,
         device: str | DeviceSpec | None = None, tokenizer: Any = None, text_column: str | None = None,
         num_samples: int | None = None, n_trials: int | None = None, storage: str | None = None,
         profile: Profile | None = None) -> Plan:
    """The fastest plan whose predicted peak fits `budget` (e.g. "16GB"; GB = 2**30 bytes, as nvidia-smi).

    `data` (examples with text, or tokenized) gives the real length distribution, cut at `seq_len`;
    without it every example is `seq_len` tokens. Raises search.NoPlanFitsError (with the smallest budget
    that fits) when nothing does."""
    budget_bytes = parse_budget(budget)
    spec = target_device(device)
    if profile is None:
        timing = PRECISIONS if spec.kind == "cpu" else ()
        profile = profile_model(model, task=task, timing=timing) if isinstance(model, nn.Module) \
            else cached_profile(model, task=task, timing=timing)
    lengths = None
    if data is not None:
        if tokenizer is None and not isinstance(model, nn.Module | PretrainedConfig):
            tokenizer = load_tokenizer(model)
        lengths = _lengths(data, tokenizer, text_column, seq_len)
    workload = make_workload(profile.task, seq_len=seq_len, batch_size=batch_size, lengths=lengths,
                             num_samples=num_samples)
    return plan_from_profile(profile, workload, budget_bytes, spec, policy, n_trials=n_trials, storage=storage)


def _lengths(data: Any, tokenizer: Any, text_column: str | None, seq_len: int) -> list[int]:
    if isinstance(data, TokenizedData):
        return [min(n, seq_len) for n in data.lengths]
    return text_lengths(data, tokenizer, text_column, max_length=seq_len)


def plan_from_profile(profile: Profile, workload: Workload, budget_bytes: int, device: DeviceSpec,
                      policy: str = "balanced", *, n_trials: int | None = None,
                      storage: str | None = None) -> Plan:
    """Search the policy's knobs for `profile` on `workload` and wrap the answer as a Plan."""
    result = search(profile, workload, device, budget_bytes, policy, n_trials=n_trials, storage=storage)
    return Plan(
        model_id=profile.model_id, model_type=profile.model_type, num_layers=profile.num_layers,
        num_params=profile.num_params, task=profile.task, budget_bytes=budget_bytes, device=device,
        policy=result.policy + (" (relaxed)" if result.relaxed else ""), headroom_bytes=result.headroom_bytes,
        knobs=result.knobs, predicted=result.memory, time=result.time, workload=workload,
        alternatives=alternatives(result), search=result.info(), profile_device=profile.device,
        versions=package_versions(), created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def train(model: ModelSpec, data: Any, budget: str | int | None = None, *, plan: Plan | None = None,
          tokenizer: Any = None, epochs: int = 1, max_steps: int | None = None, lr: float = 2e-5,
          batch_size: int = 32, eval_data: Any = None, policy: str = "balanced", task: str | None = None,
          max_length: int | None = None, text_column: str | None = None, device: str | None = None,
          output_dir: str | None = None, checkpoint_every: int | None = None, resume: bool = False,
          seed: int = 0, quiet: bool = False, num_labels: int | None = None):
    """Plan (unless `plan` is given) and train `model` on `data`; returns an executor.TrainResult with the
    plan, the measured peak next to the predicted one, and the loss/eval history."""
    from autofit.executor import run_plan  # the executor is the last stage: imported only to train

    if plan is None and budget is None:
        raise ValueError("give a memory budget (e.g. budget='16GB') or a plan")
    config = _config(model)
    if task is None:
        task = plan.task if plan is not None else default_task(config)
    if tokenizer is None and isinstance(model, str | os.PathLike):
        tokenizer = load_tokenizer(model)
    limit = max_sequence_length(config)
    max_length = min(max_length or limit or 512, limit or 10**9)
    train_data = _tokenized(data, tokenizer, task, max_length, text_column)
    eval_tokens = _tokenized(eval_data, tokenizer, task, max_length, text_column) if eval_data else None
    if not isinstance(model, nn.Module):
        model = load_model(model, task=task, num_labels=num_labels or train_data.num_labels or 2)
    if plan is None:
        spec = target_device(device, train=True)
        profile = profile_model(model, task=task, timing=PRECISIONS if spec.kind == "cpu" else ())
        workload = make_workload(task, seq_len=max(train_data.lengths), batch_size=batch_size,
                                 lengths=train_data.lengths)
        plan = plan_from_profile(profile, workload, parse_budget(budget), spec, policy)
    return run_plan(model, plan, train_data, eval=eval_tokens, epochs=epochs, max_steps=max_steps, lr=lr,
                    seed=seed, output_dir=output_dir, checkpoint_every=checkpoint_every, resume=resume,
                    quiet=quiet, pad_token_id=getattr(tokenizer, "pad_token_id", None))


def _tokenized(data: Any, tokenizer: Any, task: str, max_length: int, text_column: str | None) -> TokenizedData:
    if isinstance(data, TokenizedData):
        return data
    return prepare_examples(data, tokenizer, task=task, max_length=max_length, text_column=text_column)


def _config(model: ModelSpec) -> PretrainedConfig:
    if isinstance(model, nn.Module):
        return model.config
    return model if isinstance(model, PretrainedConfig) else resolve_config(model)[1]
