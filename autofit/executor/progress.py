"""A rich progress bar for training: steps, loss, tokens/s, peak memory. Silent when quiet."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from autofit.budget import format_bytes


class TrainingProgress:
    """`with TrainingProgress(total_steps, quiet) as bar: bar.update(step, loss=..., ...)`."""

    def __init__(self, total_steps: int, *, quiet: bool = False, completed: int = 0) -> None:
        self.total_steps, self.quiet, self.completed = total_steps, quiet, completed
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> TrainingProgress:
        if not self.quiet:
            self._progress = Progress(
                TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), transient=False)
            self._progress.__enter__()
            self._task = self._progress.add_task("train", total=self.total_steps, completed=self.completed,
                                                 stats="")
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def update(self, step: int, *, loss: float, tokens_per_second: float, peak_bytes: int | None) -> None:
        if self._progress is None:
            return
        stats = f"loss {loss:.4f}  {tokens_per_second:,.0f} tok/s"
        if peak_bytes is not None:
            stats += f"  peak {format_bytes(peak_bytes)}"
        self._progress.update(self._task, completed=step, stats=stats)
