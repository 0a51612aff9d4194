"""The processes a launcher (`accelerate launch`, `torchrun`) started: how many, and doing a thing once.

Planning is done once, by the main process, and handed to the others: each process profiling on its own
would time the same blocks a little differently and could choose other knobs, and processes with different
plans deadlock in their first collective.
"""

from __future__ import annotations

import os
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
    """What the main process failed with, as the other processes hear of it: its message, said as a bad input
    is said (the main process says the same line)."""


def on_main_process(make: Callable[[], T], cpu: bool) -> T:
    """`make()` on the main process, its result (picklable) sent to every process. When it raises, the main
    process raises the error and the others a MainProcessError with its message, instead of waiting forever."""
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
            failure, box[0] = error, ("error", str(error))
    broadcast_object_list(box, from_process=0)
    if failure is not None:
        raise failure
    status, value = box[0]
    if status == "error":
        raise MainProcessError(value)
    return value
