"""What autofit inferred or changed about its input (the task, the text column, examples truncated or left
out, a head's classes renamed): said at INFO on the "autofit" logger, collected here for the caller and
shown once each as `note:` lines. The CLI and the Python API (`plan`, `train`) share it: Python leaves INFO
records unseen by default, and a note that changes what trains must reach the user."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps

log = logging.getLogger("autofit")


def main_process() -> bool:
    """Process 0 of a launch (torchrun and accelerate set RANK), or the only process: under a launcher every
    process infers the same, and the first says it."""
    return os.environ.get("RANK", "0") == "0"


def print_note(message: str, warning: bool = False) -> None:
    print(f"{'warning' if warning else 'note'}: {message}", file=sys.stderr, flush=True)


class _Notes(logging.Handler):
    """Collects each message (INFO and up) once per open `noting` context and shows it once."""

    def __init__(self, show: Callable[[str, bool], None] | None) -> None:
        super().__init__(logging.INFO)
        self.show = show
        self.collected: list[list[str]] = []
        self.said: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        for notes in self.collected:
            if message not in notes:
                notes.append(message)
        if message in self.said:
            return  # the same inference for the evaluation data, or when training re-reads the plan's
        self.said.add(message)
        if self.show is not None and main_process():
            self.show(message, record.levelno >= logging.WARNING)


def _left_to_logging() -> bool:
    """The caller's logging setup decides: it shows autofit's INFO records itself (basicConfig(level=INFO), a
    handler), or it set the "autofit" logger above INFO to silence them."""
    return (log.isEnabledFor(logging.INFO) and log.hasHandlers()) or log.level > logging.INFO


@contextmanager
def noting(show: Callable[[str, bool], None] | None = print_note) -> Iterator[list[str]]:
    """Collect autofit's notes and logged warnings while the block runs (the list it yields fills as they
    come); show each once with `show(message, is_warning)` (None: collect only), unless the caller's own
    logging already shows them or silenced them. Nested blocks, as when the CLI calls the API, collect too;
    the outermost shows."""
    handler = next((h for h in log.handlers if isinstance(h, _Notes)), None)
    outermost = handler is None
    if outermost:
        handler = _Notes(None if _left_to_logging() else show)
        level = log.level
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    notes: list[str] = []
    handler.collected.append(notes)
    try:
        yield notes
    finally:
        handler.collected.remove(notes)
        if outermost:
            log.removeHandler(handler)
            log.setLevel(level)


def noted(function: Callable) -> Callable:
    """`function` (the API's plan and train) shows its notes unless called with quiet=True, and keeps them on
    its result's `notes` when the result has that field."""
    @wraps(function)
    def wrapper(*args, **kwargs):
        with noting(None if kwargs.get("quiet") else print_note) as notes:
            result = function(*args, **kwargs)
        if hasattr(result, "notes"):
            result.notes = list(notes)
        return result
    return wrapper


@contextmanager
def transformers_quiet():
    """transformers' advisory warnings and progress bars ("Loading weights") off for the block: the CLI's
    one-line errors and the API's quiet runs print nothing of theirs."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
