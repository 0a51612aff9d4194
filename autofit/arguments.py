"""One-line checks of what autofit.plan and autofit.train are given. A wrong type failed deep inside (an int
device in `.lower()`, an int tokenizer "not callable") or passed unnoticed (a string taken as True, a dict's
string column read one character per example). Messages name the argument, and its `autofit` flag where the
CLI passes it through."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from autofit.columns import column_names
from autofit.data import DataError
from autofit.devices import DeviceSpec
from autofit.intmath import check_whole
from autofit.labels import short_repr as shown
from autofit.plan import Plan
from autofit.policy import load_policy
from autofit.processes import launched_processes


def check_device(device: object) -> None:
    if device is not None and not isinstance(device, str | DeviceSpec):
        raise TypeError(f"device must be a device name such as 'cpu' or 'a100', or a DeviceSpec, not {shown(device)}")


def check_tokenizer(tokenizer: object) -> None:
    """A tokenizer (transformers' are callable), a `tokenizers.Tokenizer`, or the directory of one."""
    from tokenizers import Tokenizer

    if tokenizer is None or isinstance(tokenizer, str | os.PathLike | Tokenizer) or callable(tokenizer):
        return
    raise TypeError(f"tokenizer must be a tokenizer or its directory, not {shown(tokenizer)}")


def check_flags(**flags: object) -> None:
    """Each of `flags` True or False: "no" or 0 would be taken for what it is not."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, not {shown(value)}")


def check_columns(data: Any, text_column: object, label_column: object) -> None:
    """`text_column` a column name (or a pair), `label_column` a name; both need data, and a label column the
    data lacks is named now, not after the model is profiled or loaded."""
    names = (text_column,) if isinstance(text_column, str) else text_column
    if text_column is not None and not (isinstance(names, list | tuple) and 1 <= len(names) <= 2
                                        and all(isinstance(name, str) for name in names)):
        raise TypeError(f"text_column (--text-column) must be a column name or a pair of them, not "
                        f"{shown(text_column)}")
    if label_column is not None and not isinstance(label_column, str):
        raise TypeError(f"label_column (--label-column) must be a column name, not {shown(label_column)}")
    given = [name for name, value in (("text_column", text_column), ("label_column", label_column))
             if value is not None]
    if given and data is None:
        flag = "--" + given[0].replace("_", "-")
        raise ValueError(f"{given[0]} ({flag}) names a column of the data: give the data (--data)")
    present = column_names(data) if label_column is not None else []
    if present and label_column not in present:
        raise DataError(f"label column {label_column!r} not found; the data has columns {sorted(present)}")


def check_columns_are_lists(data: Any, name: str = "data") -> None:
    """A dict of columns holds one list per column: {"text": "a", "label": 1} (one example written as a dict)
    failed deep inside, and its string would have been read as one example per character."""
    if not isinstance(data, Mapping) or hasattr(data, "column_names"):  # (a DatasetDict is a Mapping)
        return
    for column, values in data.items():
        if isinstance(values, str | bytes) or not hasattr(values, "__len__"):
            raise DataError(f"{name} is a dict of columns, but column {column!r} holds {shown(values)}, not a "
                            "list of values: give lists, or a list of dicts such as [{'text': ..., 'label': ...}]")


def given_plan(plan: object) -> Plan | None:
    """A Plan, read from its file when `plan` is a path."""
    if isinstance(plan, str | os.PathLike):
        return Plan.load(plan)
    if plan is not None and not isinstance(plan, Plan):
        raise TypeError(f"plan must be a Plan or a saved plan's file, not {shown(plan)}"
                        + (" (Plan.model_validate makes one from a dict)" if isinstance(plan, dict) else ""))
    return plan


def check_plan_choices(plan: Plan, *, batch_size: int | None, policy: Any, task: str | None,
                       device: object, gpus: int | None = None) -> None:
    """With a plan, what it fixes (its batch, policy, task, processes, device) may be left out or repeated:
    another value was silently ignored."""
    check_device(device)
    asked = {"batch_size": batch_size, "policy": None if policy is None else load_policy(policy).name,
             "task": task, "gpus": gpus}
    fixed = {"batch_size": plan.batch_size, "policy": plan.policy.removesuffix(" (relaxed)"), "task": plan.task,
             "gpus": plan.cluster.processes}
    for name, value in asked.items():
        if value is not None and value != fixed[name]:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"the plan fixes {name} ({flag}) at {fixed[name]}, not {value}: leave it out with a "
                             f"plan, or plan again with {value}")
    same = device == plan.device or (isinstance(device, str) and device.lower() == plan.device.name.lower())
    if device is not None and not same:
        raise ValueError(f"the plan is for its device ({plan.device.name}): leave device out with a plan, or plan "
                         f"again with device={shown(device)}")


def check_train_values(*, data: Any, eval_data: Any, tokenizer: Any, text_column: Any, label_column: Any,
                       device: Any, gpus: Any, num_labels: Any, seed: Any, lr: Any, **flags: Any) -> None:
    """train()'s one-line errors for arguments no run can have, before any work."""
    check_flags(**flags)
    check_device(device)
    check_tokenizer(tokenizer)
    check_columns_are_lists(data)
    check_columns_are_lists(eval_data, "eval_data")
    check_columns(data, text_column, label_column)
    check_whole("seed", seed, least=0)  # a number, never None: everything random follows it
    for name, value in (("gpus", gpus), ("num_labels", num_labels)):
        if value is not None:  # (0 gpus or labels read as "not given" further on)
            check_whole(name, value, least=1)
    if seed >= 2**32:  # numpy's seeds are 32-bit: its own error would not name the argument
        raise ValueError(f"seed (--seed) must be below 2**32 ({2**32}), not {seed}")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr)
                           or lr <= 0):  # None: the plan's default (default_learning_rate)
        raise ValueError(f"the learning rate must be a positive number, not {lr!r}")


def check_output_dir_arg(output_dir: Any, resume: bool) -> None:
    """A bad --output-dir fails now, not after profiling and training."""
    from autofit.executor.output_dir import check_no_earlier_run, check_output_dir, check_output_dir_free

    if output_dir is None:
        return
    if not isinstance(output_dir, str | os.PathLike):
        raise TypeError(f"output_dir must be a folder's path, not {shown(output_dir)}")
    if not os.fspath(output_dir).strip():  # Path("") is ".": the checkpoints would land where it runs
        raise ValueError(f"output_dir (--output-dir) is {shown(output_dir)}: name a folder ('.' for this one)")
    check_output_dir(output_dir)
    if launched_processes() == 1:  # (launched ones would race for the probe: run_plan holds it for them)
        check_output_dir_free(output_dir)
    if not resume:
        check_no_earlier_run(output_dir)
