"""train(): plan (or check a given plan on the data), then run the executor. The planning steps live in
autofit.api; this adds what training needs: tokenizing the data, loading the model (4-bit where the plan says),
planning once for several launched processes, and the evaluation's predicted peak."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Any

import torch
from accelerate.utils import set_seed
from torch import nn
from transformers import PretrainedConfig

from autofit.api import (DEFAULT_MAX_LENGTH, ModelSpec, _config, _profile, _search_lazily, check_batch_size,
                         inferred_task, make_workload, note_unused_labels, plan_from_search, resolve_tokenizer,
                         spec_with_labels, target_device)
from autofit.arguments import check_output_dir_arg, check_plan_choices, check_train_values, given_plan
from autofit.budget import format_bytes, parse_budget
from autofit.cluster import Cluster, make_cluster
from autofit.cost import predict_time
from autofit.data import DataError, TokenizedData, min_tokens, prepare_examples, without_untrainable
from autofit.data_files import eval_split, read_data
from autofit.devices import DeviceSpec
from autofit.labels import config_label_names, label_kind
from autofit.limits import check_seq_len, max_sequence_length
from autofit.memory import offloaded_bytes_per_machine, peak_over_shapes, predict_eval_peak, predict_peak
from autofit.models import build_model, head_task, load_model
from autofit.notes import noted, transformers_quiet
from autofit.plan import MemoryBreakdown, Plan
from autofit.policy import Policy, check_adapter_choice, load_policy
from autofit.processes import launched_processes, main_process_first, on_main_process
from autofit.profiler import Profile
from autofit.search.space import PAD_MULTIPLE, adapted_keys
from autofit.techniques import lora
from autofit.techniques.accumulation import eval_micro_batches
from autofit.techniques.bucketing import padded_length
from autofit.techniques.optimizer import default_learning_rate
from autofit.workload import TOKEN_LEVEL_TASKS, Workload

log = logging.getLogger("autofit")


def replan_for_data(plan: Plan, profile: Profile, lengths: list[int], max_length: int) -> Plan:
    """`plan` with its workload replaced by the data it will train on (cut at `max_length`), and its memory and
    time predicted again from its knobs: what a plan file claims about its peak is not believed. Raises
    PlanNoLongerFitsError when the knobs' peak on this data is over the plan's budget less its headroom (an
    edited file, or longer data): the search kept the peak under that, and the headroom is what covers the
    memory model's errors."""
    workload = make_workload(plan.task, seq_len=max_length, batch_size=plan.batch_size, lengths=lengths)
    memory = predict_peak(profile, plan.knobs, workload, plan.device, cluster=plan.cluster)
    if memory.peak_bytes > plan.budget_bytes - plan.headroom_bytes:
        raise PlanNoLongerFitsError(
            f"this plan's knobs need {format_bytes(memory.peak_bytes)} on this data cut at {max_length} tokens "
            f"(predicted again from them), over its {format_bytes(plan.budget_bytes)} budget less its "
            f"{format_bytes(plan.headroom_bytes)} headroom: plan again for this data and budget")
    time = predict_time(profile, plan.knobs, workload, plan.device, cluster=plan.cluster)
    # what the file says of its adapters and offloaded shards follows its knobs too (an edited rank or base)
    return plan.model_copy(update=dict(workload=workload, predicted=memory, time=time,
                                       adapter=lora.weights_summary(profile, plan.knobs),
                                       offloaded_bytes=offloaded_bytes_per_machine(profile, plan.knobs, plan.cluster)))


class PlanNoLongerFitsError(ValueError):
    """A plan whose knobs, predicted again on the data it is given, do not fit its own budget (less its
    headroom)."""


DEFAULT_BATCH_SIZE = 32
"""Examples per optimizer step when training without a plan and none is asked for (plan()'s default)."""


@noted
def train(model: ModelSpec, data: Any, budget: str | int | None = None, *,
          plan: Plan | str | os.PathLike | None = None,
          tokenizer: Any = None, epochs: int = 1, max_steps: int | None = None, lr: float | None = None,
          batch_size: int | None = None, eval_data: Any = None, policy: str | None = None, task: str | None = None,
          max_length: int | None = None, text_column: str | None = None, label_column: str | None = None,
          device: str | None = None,
          output_dir: str | None = None, checkpoint_every: int | None = None, resume: bool = False,
          seed: int = 0, quiet: bool = False, num_labels: int | None = None, adapter: str = "auto",
          gpus: int | None = None, machines: int = 1, interconnect: str | None = None, network: str = "ethernet",
          measure_memory: bool = True):
    """Plan (unless `plan` is given) and train `model` on `data`; returns an executor.TrainResult with the
    plan, the measured peak next to the predicted one, and the loss/eval history. `data` and `eval_data` may
    be paths, read as the CLI reads --data and --eval-data.

    `plan` is a Plan or a saved plan's file. A given plan's peak is predicted again from its knobs on this
    data (its profile is cached), and a plan that no longer fits its budget is refused; what it fixes
    (`batch_size`, default 32; `policy`, default balanced; `task`; `device`) may be left out or repeated, not
    changed. `label_column` names the labels (default: "label" or "labels"). Everything random (a new head,
    the steps' order, dropout) follows `seed`: the same seed, data and plan give the same losses. `adapter` is
    plan()'s; with a plan it must be auto or what the plan chose. Under a launcher (`accelerate launch`,
    `torchrun`) every process calls train: the main process plans (for `gpus` processes, default: as many as
    were launched on `machines` machines) and the others train its plan. `measure_memory=False` skips
    measuring the peak: free on a GPU (the allocator counts it), it makes a CPU run 2-7x slower (every op's
    tensors are tracked). What it infers or changes about its input is shown as `note:` lines on stderr
    (none when `quiet`, or when your logging setup shows the "autofit" logger) and kept in `result.notes`."""
    from autofit.executor import run_plan  # the executor is the last stage: imported only to train

    if (plan is None) == (budget is None):
        raise ValueError("give a memory budget (e.g. budget='16GB') or a plan" + (", not both" if plan else ""))
    budget_bytes = parse_budget(budget) if budget is not None else None  # a bad budget fails before any work
    data, eval_data = read_data(data), read_data(eval_data, evaluation=True)
    plan = given_plan(plan)
    chosen = _policy_or_plan_choices(plan, adapter, batch_size=batch_size, policy=policy, task=task, device=device,
                                     gpus=gpus)
    if batch_size is None:
        batch_size = plan.batch_size if plan is not None else DEFAULT_BATCH_SIZE
    policy = "balanced" if policy is None else policy
    check_batch_size(batch_size, (gpus or launched_processes()) if plan is None else 1)
    check_train_values(data=data, eval_data=eval_data, tokenizer=tokenizer, text_column=text_column,
                       label_column=label_column, device=device, gpus=gpus, num_labels=num_labels, seed=seed,
                       lr=lr, resume=resume, quiet=quiet, measure_memory=measure_memory)
    check_output_dir_arg(output_dir, resume)
    seed = int(seed)  # a numpy integer too: Python's random.seed takes only int
    config = _config(model)
    if task is None:
        task = plan.task if plan is not None else inferred_task(model, config, data, label_column)
    note_unused_labels(task, data, label_column)
    note_unused_labels(task, eval_data, label_column, what="evaluation data")
    head = head_task(model) if isinstance(model, nn.Module) else None
    if head not in (None, task):
        raise ValueError(f"the task is {task}, but this model ({type(model).__name__}) has a {head} head: pass a "
                         "model with the task's head, or the task its head trains")
    tokenizer = resolve_tokenizer(tokenizer, model)
    multiple = plan.knobs.pad_to_multiple_of if plan is not None else PAD_MULTIPLE
    # default: where the plan cut its examples, else all the positions the model takes, less what padding
    # to `multiple` would push past them
    planned = plan.workload.max_length if plan is not None else None
    asked = max_length if max_length is not None else planned or max_sequence_length(config) or DEFAULT_MAX_LENGTH
    max_length = check_seq_len(config, asked, explicit=max_length is not None, multiple=multiple, flag="max_length")
    train_data = _tokenized(data, tokenizer, task, max_length, (text_column, label_column),
                            model_names=config_label_names(config))
    _say_label_note(train_data)
    eval_tokens = _tokenized(eval_data, tokenizer, task, max_length, (text_column, label_column),
                             train=train_data) if eval_data is not None else None
    set_seed(seed)  # before the model exists: a new head's random weights follow the seed too
    source, nf4 = model, _nf4_loading(plan)
    resumed = _resumed_plan(output_dir) if resume else None
    if isinstance(model, PretrainedConfig):  # a config asks for a model with random weights
        model = build_model(config, task, num_labels=num_labels or train_data.num_labels or 2)
    elif not isinstance(model, nn.Module):
        with _weights_from_checkpoint(resumed), transformers_quiet() if quiet else contextlib.nullcontext():
            model = load_model(model, task=task, num_labels=num_labels or train_data.num_labels or 2, nf4=nf4)
    _name_classes(model, train_data.label_names)
    spec = plan.device if plan is not None else target_device(device, train=True)
    if plan is None and resumed is not None:
        plan = _plan_in_force(resumed, budget_bytes, batch_size, spec, policy, adapter)
    adapters = plan.knobs.adapter == "lora" if plan is not None else chosen.adapters.mode == "always"
    # a model built here from an id, a path or a config is profiled from that, with the head the data gave it,
    # as plan() profiles it, so one cached profile serves both (in 4 bits too: the profiler measures a
    # full-precision twin)
    classes = model.config.num_labels if task == "classification" and not nf4 else None
    profiled = spec_with_labels(source, config, classes) if model is not source else model
    with main_process_first(cpu=spec.kind == "cpu"):  # several processes: one profiles, the rest read its cache
        profile = _profile(profiled, task, spec, adapters=adapters)
    if plan is None:
        workload = make_workload(task, seq_len=max_length, batch_size=batch_size,
                                 lengths=train_data.lengths)
        cluster = make_cluster(gpus or launched_processes(), machines, interconnect=interconnect, network=network,
                               device_kind=spec.kind)
        plan = on_main_process(lambda: _search_plan(profiled, profile, workload, spec, budget_bytes, chosen,
                                                    cluster), cpu=spec.kind == "cpu")
        if plan.knobs.adapter == "lora" and not adapted_keys(profile):  # measured into the cache by the search
            profile = _profile(profiled, task, spec, adapters=True)
    else:
        plan = replan_for_data(plan, profile, train_data.lengths, max_length)
    eval_prediction = None if eval_tokens is None else predict_evaluation(profile, plan, eval_tokens.lengths)
    if lr is None and plan.knobs.adapter == "lora":
        log.info(f"the LoRA adapters train at learning rate {default_learning_rate(plan.knobs):g}, ten times full "
                 "fine-tuning's (lr / --lr sets another)")
    result = run_plan(model, plan, train_data, eval=eval_tokens, epochs=epochs, max_steps=max_steps, lr=lr,
                      seed=seed, output_dir=output_dir, checkpoint_every=checkpoint_every, resume=resume,
                      quiet=quiet, pad_token_id=getattr(tokenizer, "pad_token_id", None),
                      measure_memory=measure_memory, eval_prediction=eval_prediction,
                      price_shapes=lambda knobs, shapes: peak_over_shapes(profile, knobs, shapes, plan.device,
                                                                          plan.cluster)[0])
    if plan.knobs.adapter == "lora" and source is model:
        log.info(f"{type(model).__name__} you passed now holds peft's LoRA layers (base stored as "
                 f"{plan.knobs.base_dtype}): save the adapters with result.model.save_pretrained (or find them in "
                 "result.adapter_dir), or a plain model with techniques.lora.export_merged, not with "
                 "model.save_pretrained")
    return result


def _policy_or_plan_choices(plan: Plan | None, adapter: str, **choices: Any) -> Policy | None:
    """The policy to plan with (None with a plan); with a plan, a one-line error for what it did not choose."""
    if plan is None:
        policy = choices["policy"]
        return load_policy("balanced" if policy is None else policy).with_adapter(adapter)
    if check_adapter_choice(adapter) not in ("auto", plan.knobs.adapter):
        raise ValueError(f"the plan was made with adapter={plan.knobs.adapter}, not {adapter}: plan again with "
                         f"adapter={adapter}, or leave adapter=auto")
    if choices["batch_size"] is not None:
        check_batch_size(choices["batch_size"])  # its type, before it is compared with the plan's
    check_plan_choices(plan, **choices)
    if plan.knobs.cpu_offload and plan.device.kind == "cpu":
        # the memory model counts offloaded shards off the device: on the CPU they stay in the same memory
        raise ValueError("this plan offloads FSDP's shards to the CPU, and it is a plan for the CPU: there is "
                         "nowhere to offload to (set knobs.cpu_offload to false, or plan again)")
    return None


def _name_classes(model: nn.Module, names: list[str] | None) -> None:
    """Write the class names string labels were numbered by into the model's config (id2label, label2id), so
    the trained model, saved or in a pipeline, answers "positive" rather than "LABEL_2"."""
    config = getattr(model, "config", None)
    if not names or config is None or getattr(config, "num_labels", None) != len(names):
        return
    before = config_label_names(config)
    if before == names:
        return
    if before is not None:
        log.info(f"the model's config named its classes {before}, which do not name every label of the data: "
                 f"they are now the data's, {names}")
    config.id2label = dict(enumerate(names))
    config.label2id = {name: i for i, name in enumerate(names)}


def predict_evaluation(profile: Profile, plan: Plan, lengths: list[int]) -> MemoryBreakdown:
    """The predicted peak of evaluating examples of `lengths` under `plan`: the micro-batches the executor
    cuts them into (none larger than a training micro-batch), each priced by the memory model."""
    largest = max(b.micro_batch_size * b.upper_length for b in plan.step.buckets)
    pieces = eval_micro_batches(lengths, plan.knobs, largest)
    shapes = sorted({(len(p), padded_length(max(lengths[i] for i in p), plan.knobs.pad_to_multiple_of))
                     for p in pieces})
    return predict_eval_peak(profile, plan.knobs, shapes, plan.device, plan.cluster)


def _search_plan(model: ModelSpec, profile: Profile, workload: Workload, device: DeviceSpec, budget_bytes: int,
                 policy: Policy, cluster: Cluster) -> Plan:
    profile, found = _search_lazily(model, profile, workload, device, budget_bytes, policy, measure=True,
                                    cluster=cluster)
    return plan_from_search(profile, workload, budget_bytes, device, found, cluster)


def _nf4_loading(plan: Plan | None) -> dict | None:
    """How to load a model by id for a plan that stores its base in NF4 (else None: loaded as it is)."""
    if plan is None or not plan.knobs.quantized:
        return None
    from autofit.techniques.precision import autocast_dtype

    return {"double_quant": plan.knobs.double_quant, "compute_dtype": autocast_dtype(plan.knobs.precision)
            or torch.float32}


def _resumed_plan(output_dir: str | None) -> Plan | None:
    """The plan of the newest checkpoint in `output_dir` (the run a resume continues), None without one."""
    from autofit.executor.checkpoint import latest_checkpoint, load_plan_and_state

    path = latest_checkpoint(output_dir) if output_dir is not None and os.path.isdir(output_dir) else None
    return load_plan_and_state(path)[0] if path is not None else None


@contextlib.contextmanager
def _weights_from_checkpoint(resumed: Plan | None):
    """A resume whose checkpoint holds every weight (a full fine-tune's, `resumed` its plan) overwrites whatever
    load_model built: a model folder without weights is then no reason to warn of random weights. A LoRA
    checkpoint holds only the adapters: its base is loaded as usual, and the warning stands."""
    from autofit.models import RandomWeightsWarning

    if resumed is None or resumed.knobs.adapter == "lora":
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        yield


def _plan_in_force(found: Plan, budget_bytes: int, batch_size: int, device: DeviceSpec,
                   policy: str, adapter: str) -> Plan | None:
    """The plan of the run being resumed (`found`), when it was asked for with the same budget, batch, device
    and policy, and an adapter choice it meets: planning again could choose other knobs (a CPU target's block
    times are measured, not looked up), and a resume must continue the run it finished, not refuse it."""
    same = (found.budget_bytes, found.batch_size, found.device, found.policy) == \
        (budget_bytes, batch_size, device, policy) and adapter in ("auto", found.knobs.adapter)
    return found if same else None  # asked differently: plan anew, and the resume names what changed


def _say_label_note(data: TokenizedData) -> None:
    """What the labels asked for (the head's classes): a regression head is worth a warning."""
    if data.label_note:
        (log.warning if data.num_labels == 1 else log.info)(data.label_note)


def _tokenized(data: Any, tokenizer: Any, task: str, max_length: int, columns: tuple[Any, str | None],
               train: TokenizedData | None = None, model_names: list[str] | None = None) -> TokenizedData:
    """Tokenized training data, or (given `train`) evaluation data, the (text, label) `columns` named or None
    (found): evaluation data may hold a single class, and its string labels take the training data's class
    ids. Training data's string labels all named by the model's config (`model_names`) take the config's ids."""
    if not isinstance(data, TokenizedData):
        data = _prepared(data, tokenizer, task, max_length, columns, train, model_names)
    data, dropped = without_untrainable(data)
    kind = "training" if train is None else "evaluation"
    if dropped:
        least = {1: "no token", 2: "fewer than two tokens"}[min_tokens(task)]
        unscored = " or no token label but -100" if data.labels is not None and task in TOKEN_LEVEL_TASKS else ""
        log.info(f"{dropped} {kind} example{'s' * (dropped != 1)} had {least}{unscored} and "
                 f"{'were' if dropped != 1 else 'was'} left out: nothing can be learnt from them")
    if train is not None and train.text_columns is None and data.text_columns is not None:
        log.info(f"evaluation examples are tokenized from their text ({', '.join(data.text_columns)}) while training "
                 "read token ids: they must come from the same tokenizer")
    if data.num_truncated:
        log.info(f"{data.num_truncated} of {len(data)} {'evaluation ' if train is not None else ''}examples were "
                 f"longer than {max_length} tokens and were truncated")
    return data


def _prepared(data: Any, tokenizer: Any, task: str, max_length: int, columns: tuple[Any, str | None],
              train: TokenizedData | None, model_names: list[str] | None) -> TokenizedData:
    text_column, label_column = columns
    if train is None:
        return prepare_examples(data, tokenizer, task=task, max_length=max_length, text_column=text_column,
                                label_column=label_column, model_names=model_names)
    try:
        return prepare_examples(eval_split(data, "eval_data"), tokenizer, task=task, max_length=max_length,
                                text_column=text_column, label_column=label_column, min_classes=1,
                                label_names=train.label_names, train_kind=label_kind(train),
                                train_text_columns=train.text_columns)
    except DataError as error:  # the training data passed the same checks: say which data this is
        raise DataError(f"eval_data (--eval-data): {error}") from None
