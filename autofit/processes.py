"""The processes a launcher (`accelerate launch`, `torchrun`) started: how many, and doing a thing once.

Planning is done once, by the main process, and handed to the others: each process profiling on its own
would time the same blocks a little differently and could choose other knobs, and processes with different
plans deadlock in their first collective.
"""

from __future__ import annotations

import os
import pickle
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import TypeVar

T = TypeVar("T")


def launched_processes() -> int:
    """Processes the launcher started (its WORLD_SIZE), 1 when run plainly."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _state(cpu: bool):
    from accelerate import PartialState

    return PartialState(cpu=cpu)


@contextmanager
def main_process_first(cpu: bool) -> Iterator[None]:
    """The main process runs the block first (e.g. profiling into the cache), the others after it."""
    context = _state(cpu).main_process_first() if launched_processes() > 1 else nullcontext()
    with context:
        yield


class MainProcessError(ValueError):
    """What the main process failed with, as the other processes hear of it when the error itself cannot be
    sent: its message, said as a bad input is said."""


def said_by_main_process(error: BaseException) -> bool:
    """Whether `error` is the main process's, raised again on another process: the main process says it."""
    return getattr(error, "said_by_main_process", False)


def failed_together(error: BaseException) -> bool:
    """Whether every process raises `error` at the same point (on_main_process's failures): none is left
    waiting in a collective, so the process group may be closed."""
    return getattr(error, "failed_together", False)


def _portable(error: Exception) -> Exception | str:
    """The error itself when it survives pickling (the other processes then raise the same kind: the CLI's
    exit code follows it), else its message."""
    try:
        copy = pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001 - any error that cannot cross goes as its message
        return str(error)
    return copy if type(copy) is type(error) and str(copy) == str(error) else str(error)


def on_main_process(make: Callable[[], T], cpu: bool) -> T:
    """`make()` on the main process, its result (picklable) sent to every process. When it raises, the main
    process raises the error and the others the same error (a MainProcessError with its message when it does
    not pickle), instead of waiting forever."""
    if launched_processes() == 1:
        return make()
    from accelerate.utils import broadcast_object_list

    state = _state(cpu)
    box: list = [None]
    failure: BaseException | None = None
    if state.is_main_process:
        try:
            box[0] = ("ok", make())
        except Exception as error:  # every process must reach the broadcast below
            failure, box[0] = error, ("error", _portable(error))
    broadcast_object_list(box, from_process=0)
    if failure is not None:
        failure.failed_together = True
        raise failure
    status, value = box[0]
    if status == "error":
        heard = value if isinstance(value, Exception) else MainProcessError(value)
        heard.said_by_main_process = heard.failed_together = True
        raise heard
    return value


def close_process_group(error: BaseException) -> None:
    """Close the launcher's process group, if one is open, when every process ends on `error` together: left
    open, gloo's threads can abort the process as it exits ("terminate called without an active exception"),
    and the launcher then reports a signal instead of the command's exit code. An error of one process leaves
    it open: the others wait in a collective, and NCCL's destroy would wait with them."""
    dist = sys.modules.get("torch.distributed")  # not imported: no group (and no torch import for an early error)
    if not failed_together(error) or dist is None or not dist.is_available() or not dist.is_initialized():
        return
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - the command's own error is the one to report
        pass
