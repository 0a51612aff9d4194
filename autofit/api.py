"""plan() and train(): profile -> search -> Plan -> executor. Each step lives in its own module; this only
wires them together."""

from __future__ import annotations

import copy
import logging
import os
from datetime import datetime, timezone
from typing import Any, NamedTuple

from torch import nn
from transformers import PretrainedConfig

from autofit.arguments import check_columns, check_columns_are_lists, check_device, check_tokenizer
from autofit.budget import parse_budget
from autofit.card import card_profile, card_spec, on_card, visible_as
from autofit.cluster import SINGLE, Cluster, make_cluster
from autofit.columns import column_names, default_label_column
from autofit.data import DataError, TokenizedData, class_count, min_tokens, text_lengths
from autofit.data_files import read_data
from autofit.devices import DeviceSpec, get_device
from autofit.intmath import check_whole
from autofit.memory import offloaded_bytes_per_machine
from autofit.limits import check_config, check_seq_len
from autofit.models import check_module, infer_task, load_tokenizer, resolve_config
from autofit.notes import noted
from autofit.plan import Plan
from autofit.policy import Policy, load_policy
from autofit.profiler import Profile
from autofit.profiler.cache import cached_profile
from autofit.profiler.profile import PRECISIONS, package_versions
from autofit.search import NoPlanFitsError, SearchResult, alternatives, search
from autofit.search.adapter_bound import adapters_could_win
from autofit.search.space import adapted_keys
from autofit.search.space import PAD_MULTIPLE
from autofit.techniques import lora
from autofit.techniques.accumulation import process_batch_size
from autofit.workload import MAX_BATCH_SIZE, LengthHistogram, Workload

log = logging.getLogger("autofit")
ModelSpec = str | os.PathLike | PretrainedConfig | nn.Module
DEFAULT_MAX_LENGTH = 512
"""Tokens kept per example when the model sets no position limit and none is asked for."""
DEFAULT_NUM_SAMPLES = 10_000
"""Examples per epoch assumed when planning without data (only the epoch time depends on it)."""


def target_device(device: str | DeviceSpec | None, *, train: bool = False) -> DeviceSpec:
    """The device a plan is for: a name from autofit.devices, the visible GPU (with its calibration, measured
    on first use), or (no GPU) a generic CUDA card when planning and the CPU when training."""
    check_device(device)
    if isinstance(device, DeviceSpec):
        return device
    if device is not None:  # the visible card when it is the one named: measured, not the spec sheet
        return visible_as(device) or get_device(device)
    visible = card_spec()  # calibrated on first use of the card
    return visible if visible is not None else get_device("cpu" if train else "cuda")


def check_batch_size(batch_size: int, processes: int = 1) -> None:
    """A one-line ValueError for an effective batch no plan can have, or that cannot give each of `processes`
    an example."""
    check_whole("batch_size", batch_size, least=None)  # the type; the range below
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ValueError(f"batch_size must be from 1 to {MAX_BATCH_SIZE}, not {batch_size}")
    if batch_size < processes:
        raise ValueError(f"a batch of {batch_size} examples cannot give each of {processes} processes one: "
                         f"use --batch-size {processes} or more")


def make_workload(task: str, *, seq_len: int, batch_size: int, lengths: list[int] | None,
                  num_samples: int | None = None) -> Workload:
    """The training job: the data's real lengths (cut at `seq_len`) when given, else `num_samples` examples of
    `seq_len`."""
    if lengths is not None:
        if not lengths:
            raise ValueError("the data has no examples")
        return Workload(task=task, lengths=LengthHistogram.from_lengths([max(1, n) for n in lengths]),
                        batch_size=batch_size, from_data=True, max_length=seq_len)
    hist = LengthHistogram.fixed(seq_len, num_samples or DEFAULT_NUM_SAMPLES)
    return Workload(task=task, lengths=hist, batch_size=batch_size, from_data=False, max_length=seq_len)


@noted
def plan(model: ModelSpec, budget: str | int, *, seq_len: int | None = None, batch_size: int = 32,
         data: Any = None, policy: str = "balanced", task: str | None = None,
         device: str | DeviceSpec | None = None, tokenizer: Any = None, text_column: str | None = None,
         label_column: str | None = None, num_samples: int | None = None, n_trials: int | None = None,
         storage: str | None = None, profile: Profile | None = None, adapter: str = "auto", gpus: int = 1,
         machines: int = 1, interconnect: str | None = None, network: str = "ethernet",
         host_memory: str | int | None = None, quiet: bool = False) -> Plan:
    """The fastest plan whose predicted peak fits `budget` (e.g. "16GB"; GB = 2**30 bytes, as nvidia-smi).

    `data` (examples with text, or tokenized; or a file's path, read as the CLI's --data) gives the real
    length distribution, cut at `seq_len`, and a label column (`label_column`, default "label" or "labels")
    makes a decoder a classifier, with a head of as many classes as it holds; without data every example is
    `seq_len` tokens (default: the model's limit, at most 512; a longer `seq_len` than the model takes is
    refused). `adapter` (auto | none | lora) overrides when the policy trains LoRA adapters: auto lets it
    decide, none searches full fine-tuning only, lora adapter plans only.
    `gpus` processes on `machines` machines (linked by `interconnect`: nvlink | pcie, and `network`:
    infiniband | ethernet) plan DDP or FSDP, and `budget` is each GPU's; `host_memory` (each machine's CPU RAM,
    e.g. "512GB") rules out CPU offload that needs more. Raises search.NoPlanFitsError (with the smallest
    budget that fits) when nothing does. What it infers about its input (the task, the text column, examples
    cut) is shown as `note:` lines on stderr unless `quiet` or your logging setup shows the "autofit" logger."""
    return plan_and_search(model, budget, seq_len=seq_len, batch_size=batch_size, data=data, policy=policy,
                           task=task, device=device, tokenizer=tokenizer, text_column=text_column,
                           label_column=label_column, num_samples=num_samples, n_trials=n_trials,
                           storage=storage, profile=profile, adapter=adapter, gpus=gpus, machines=machines,
                           interconnect=interconnect, network=network, host_memory=host_memory).plan


class Planned(NamedTuple):
    """A plan with what made it, for pictures and diagnosis: none of it is in the plan's JSON."""

    plan: Plan
    profile: Profile
    """The profile the plan was searched on."""
    search: SearchResult
    """The search that chose it; `search.evaluated` holds every configuration it predicted."""


def plan_and_search(model: ModelSpec, budget: str | int, *, seq_len: int | None = None, batch_size: int = 32,
                    data: Any = None, policy: str = "balanced", task: str | None = None,
                    device: str | DeviceSpec | None = None, tokenizer: Any = None,
                    text_column: str | None = None, label_column: str | None = None,
                    num_samples: int | None = None, n_trials: int | None = None,
                    storage: str | None = None, profile: Profile | None = None, adapter: str = "auto",
                    gpus: int = 1, machines: int = 1, interconnect: str | None = None,
                    network: str = "ethernet", host_memory: str | int | None = None) -> Planned:
    """`plan`, returning the profile and the search result with the plan."""
    data = read_data(data)
    chosen = load_policy(policy).with_adapter(adapter)
    budget_bytes = parse_budget(budget)
    check_batch_size(batch_size)
    check_tokenizer(tokenizer)
    check_columns_are_lists(data)
    check_columns(data, text_column, label_column)
    for name, value in (("n_trials", n_trials), ("num_samples", num_samples)):
        if value is not None:
            check_whole(name, value)
    spec = target_device(device)
    cluster = make_cluster(gpus, machines, interconnect=interconnect, network=network, device_kind=spec.kind,
                           host_memory_bytes=None if host_memory is None else parse_budget(host_memory))
    check_batch_size(batch_size, cluster.processes)
    config = _config(model)
    seq_len = check_seq_len(config, seq_len, explicit=seq_len is not None, multiple=PAD_MULTIPLE, flag="seq_len")
    given, profiled = profile is not None, model
    if profile is None:  # the task spelled out, as train() asks for it: one cached profile serves both
        task = task or inferred_task(model, config, data, label_column)
        classes = class_count(data, label_column) if data is not None and task == "classification" else None
        if data is not None and task == "classification" and classes is None:  # train refuses such data
            named = repr(label_column) if label_column else "'label' or 'labels'"
            log.warning(f"the data has no label column ({named}): training a classifier on it needs one "
                        "(label_column / --label-column)")
        profiled = spec_with_labels(model, config, classes)
        profile = _profile(profiled, task, spec, adapters=chosen.adapters.mode == "always")
    lengths = None
    if data is not None:
        note_unused_labels(profile.task, data, label_column)
        columns = (text_column, label_column)
        lengths = [n for n in _lengths(data, resolve_tokenizer(tokenizer, model), columns, seq_len)
                   if n >= min_tokens(profile.task)]  # what training keeps (data.without_untrainable)
    workload = make_workload(profile.task, seq_len=seq_len, batch_size=batch_size, lengths=lengths,
                             num_samples=num_samples)
    profile, found = _search_lazily(profiled, profile, workload, spec, budget_bytes, chosen, measure=not given,
                                    n_trials=n_trials, storage=storage, cluster=cluster)
    return Planned(plan_from_search(profile, workload, budget_bytes, spec, found, cluster), profile, found)


def note_unused_labels(task: str, data: Any, label_column: str | None = None, what: str = "data") -> None:
    """A causal LM learns from the text alone: text data's labels go unused, with a note; a label column named
    for it contradicts the task. (Pre-tokenized data's `labels` are token labels, which it does train on.)"""
    names = column_names(data) if task == "causal-lm" and data is not None else []
    if not names or "input_ids" in names:
        return
    if label_column is not None:
        raise ValueError(f"the task is causal-lm, but label_column (--label-column) names labels "
                         f"({label_column!r}): a causal LM trains on the text alone")
    found = default_label_column(names)
    if found is not None:
        log.info(f"the task is causal-lm: the {what}'s labels (column {found!r}) are not used, a causal LM "
                 "trains on the text alone")


def inferred_task(model: ModelSpec, config: PretrainedConfig, data: Any, label_column: str | None = None) -> str:
    """models.infer_task, saying so when the data's labels (`label_column`, else a LABEL_COLUMNS one) made a
    decoder a classifier."""
    labelled = data is not None and (label_column is not None
                                     or default_label_column(column_names(data)) is not None)
    task = infer_task(model, config, labelled=labelled)
    if task == "classification" and infer_task(model, config) == "causal-lm":
        log.info(f"the data has labels: training {config.model_type} as a classifier, not a causal LM "
                 "(for that, say task='causal-lm' / --task causal-lm: the labels then go unused)")
    return task


def _search_lazily(model: ModelSpec, profile: Profile, workload: Workload, device: DeviceSpec, budget_bytes: int,
                   policy: Policy, *, measure: bool, **options: Any) -> tuple[Profile, SearchResult]:
    """(the profile, the search on it). A profile without adapter fits is searched first; the fits are
    measured (`measure`), and the search run again, only when adapters could beat what it found or nothing
    fits (search/adapter_bound.py): measuring them is most of a cold profile's time."""
    found, failure = None, None
    try:
        found = search(profile, workload, device, budget_bytes, policy, **options)
    except NoPlanFitsError as error:
        failure = error
    best = found.best if found is not None else None
    if measure and not adapted_keys(profile) and adapters_could_win(profile, workload, device, policy, best,
                                                                    options.get("cluster", SINGLE)):
        profile = _profile(model, profile.task, device, adapters=True)
        return profile, search(profile, workload, device, budget_bytes, policy, **options)
    if found is None:
        raise failure
    return profile, found


def spec_with_labels(model: ModelSpec, config: PretrainedConfig, num_labels: int | None) -> ModelSpec:
    """What to profile for a classifier of `num_labels` outputs: `model`, or when it is named by id or path
    (or is a config) whose head has another size, its config with that many labels, the head training
    builds. plan() and train() both ask this, so one cached profile serves both."""
    if num_labels is None or isinstance(model, nn.Module) or num_labels == config.num_labels:
        return model
    labelled = copy.deepcopy(config)
    labelled.num_labels = num_labels
    return labelled


def _profile(model: ModelSpec, task: str, device: DeviceSpec, *, adapters: bool) -> Profile:
    """The model's cached profile, with LoRA fits when the search may choose adapters (they cost profiling
    time, so only then). Block times are measured when planning for the CPU or for the visible GPU (whose
    kernels then correct the layers' saved bytes too); for another card they are estimated from FLOPs."""
    if on_card(device):
        return card_profile(model, task, device, adapters=adapters)
    timing = PRECISIONS if device.kind == "cpu" else ()
    return cached_profile(model, task=task, timing=timing, adapters=adapters)


def _lengths(data: Any, tokenizer: Any, columns: tuple[str | None, str | None], seq_len: int) -> list[int]:
    """The examples' token lengths cut at `seq_len`, as training will cut them (the text found, or named with
    the label, in `columns`); says how many were longer."""
    if isinstance(data, TokenizedData):
        lengths = data.lengths
    elif tokenizer is None and "input_ids" not in column_names(data):
        raise DataError("text data needs a tokenizer (or pass examples that already hold input_ids)")
    else:
        lengths = text_lengths(data, tokenizer, columns[0], label_column=columns[1])
    longer = sum(n > seq_len for n in lengths)
    if longer:
        log.info(f"{longer} of {len(lengths)} examples are longer than {seq_len} tokens: planned cut at {seq_len}, "
                 "as training this plan cuts them")
    return [min(n, seq_len) for n in lengths]


def resolve_tokenizer(tokenizer: Any, model: ModelSpec) -> Any:
    """The tokenizer to read text with: the one given (an object, a directory, or a bare
    `tokenizers.Tokenizer`), else the model's own when the model is an id or a path (None if it has none)."""
    check_tokenizer(tokenizer)
    if tokenizer is None:
        return load_tokenizer(model) if isinstance(model, str | os.PathLike) else None
    if isinstance(tokenizer, str | os.PathLike):
        found = load_tokenizer(tokenizer)
        if found is None:
            raise ValueError(f"no tokenizer found at {str(tokenizer)!r}")
        return found
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):  # the `tokenizers` library's own: wrapped as transformers does
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    return tokenizer


def plan_from_profile(profile: Profile, workload: Workload, budget_bytes: int, device: DeviceSpec,
                      policy: str | Policy = "balanced", *, n_trials: int | None = None,
                      storage: str | None = None) -> Plan:
    """Search the policy's knobs for `profile` on `workload` and wrap the answer as a Plan."""
    result = search(profile, workload, device, budget_bytes, policy, n_trials=n_trials, storage=storage)
    return plan_from_search(profile, workload, budget_bytes, device, result)


def plan_from_search(profile: Profile, workload: Workload, budget_bytes: int, device: DeviceSpec,
                     result: SearchResult, cluster: Cluster = SINGLE) -> Plan:
    """The Plan a search's answer makes."""
    return Plan(
        model_id=profile.model_id, model_type=profile.model_type, num_layers=profile.num_layers,
        num_params=profile.num_params, task=profile.task, budget_bytes=budget_bytes, device=device,
        cluster=cluster, offloaded_bytes=offloaded_bytes_per_machine(profile, result.knobs, cluster),
        policy=result.policy + (" (relaxed)" if result.relaxed else ""), headroom_bytes=result.headroom_bytes,
        knobs=result.knobs, predicted=result.memory, time=result.time, workload=workload,
        alternatives=alternatives(result, share=process_batch_size(workload.batch_size, cluster.processes)),
        search=result.info(), profile_device=profile.device,
        profile_device_name=profile.device_name,
        adapter=lora.weights_summary(profile, result.knobs),
        versions=package_versions(), created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _config(model: ModelSpec) -> PretrainedConfig:
    if isinstance(model, nn.Module):
        check_module(model)
        return check_config(model.config)
    return check_config(model) if isinstance(model, PretrainedConfig) else resolve_config(model)[1]
