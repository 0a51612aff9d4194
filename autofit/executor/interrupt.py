"""How a run stops early without losing what it finished: Ctrl-C, and a loss that diverged."""

from __future__ import annotations

import signal
import threading


class TrainingInterruptedError(RuntimeError):
    """Ctrl-C: the step in progress finished, a checkpoint was saved (with an output_dir), the run stopped."""


class TrainingDivergedError(ValueError):
    """The loss or the gradients became inf/NaN outside fp16; the weights were not updated with them."""


class GracefulInterrupt:
    """While open, a first Ctrl-C only sets `requested` (the loop finishes its step, saves and stops); a
    second one interrupts at once. Outside the main thread signals cannot be caught: it does nothing."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> GracefulInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
