"""How the `autofit` command fails: one line on stderr and an exit code, never a traceback (AUTOFIT_DEBUG=1
shows it). Exit 2 when no plan fits, 130 when a run was stopped, 1 for any other bad input; what autofit
inferred goes to stderr as `note:` lines."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from functools import wraps

import typer
from rich.console import Console
from typer.core import TyperGroup

from autofit.notes import main_process, noting, transformers_quiet
from autofit.processes import close_process_group, said_by_main_process

err = Console(stderr=True)

try:  # recent typer ships its own copy of click
    from typer._click import exceptions as _click_errors
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click import exceptions as _click_errors
_HELP_ASKED = getattr(_click_errors, "NoArgsIsHelpError", ())  # click >= 8.2: what bare `autofit` raises


class Commands(TyperGroup):
    """Usage errors (a missing or invalid option, an unknown command) are bad input like any other: one
    line and exit 1. click's own exit code for them, 2, is the one that means "no plan fits"."""

    def make_context(self, *args, **kwargs):
        with _usage_errors_as_bad_input():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        # transformers' advisories (e.g. GPT-2's "`loss_type=None` ... unrecognized" on the profiler's first
        # loss) and progress bars would land on stderr next to our one-line error
        with _usage_errors_as_bad_input(), transformers_quiet():
            return super().invoke(ctx)


@contextmanager
def _usage_errors_as_bad_input():
    try:
        yield
    except _HELP_ASKED:
        raise  # bare `autofit`: the help, as no_args_is_help asks
    except _click_errors.UsageError as error:
        command = f"{error.ctx.command_path} --help" if error.ctx is not None else "--help"
        err.print("[red]error:[/] " + escape(f"{error.format_message()} (see {command})"), soft_wrap=True,
                  highlight=False)
        raise typer.Exit(1) from None


def friendly_errors(command: Callable) -> Callable:
    """Turn any error into one line on stderr: exit 2 when no plan fits, else 1."""
    @wraps(command)
    def wrapper(*args, **kwargs):
        from autofit.executor import TrainingInterruptedError
        from autofit.search import NoPlanFitsError

        try:
            with _notes_to_stderr():
                return command(*args, **kwargs)
        except NoPlanFitsError as error:
            if not said_by_main_process(error):
                err.print(f"[red]error:[/] {error}", soft_wrap=True, highlight=False)
            close_process_group(error)
            raise typer.Exit(2) from None
        except (typer.Exit, typer.Abort):
            raise
        except (TrainingInterruptedError, KeyboardInterrupt) as error:
            if main_process():  # every process stopped at the same step: one says so
                err.print("[yellow]stopped:[/] " + escape(str(error) or "interrupted"), soft_wrap=True,
                          highlight=False)
            raise typer.Exit(130) from None
        except Exception as error:  # noqa: BLE001 - the contract is one line, never a traceback
            if os.environ.get("AUTOFIT_DEBUG"):
                raise
            text = one_line(str(error)) or type(error).__name__
            if not isinstance(error, ValueError | OSError | KeyError | ArithmeticError):
                text = f"{type(error).__name__}: {text}"
            if not said_by_main_process(error):  # under a launcher: one line, not one per process
                err.print("[red]error:[/] " + escape(text), soft_wrap=True, highlight=False)
            close_process_group(error)
            raise typer.Exit(1) from None
    return wrapper


MAX_ERROR_CHARS = 300


def one_line(message: str) -> str:
    """A message's first line, with the next one when it only leads into it ("... for field 'x':"), cut to
    MAX_ERROR_CHARS: some libraries' errors carry a page of internals."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 3].rstrip() + "..."


@contextmanager
def _notes_to_stderr():
    """What autofit's logger says at INFO (a fallback, an inferred task, a resumed run) goes to stderr as
    `note:` lines, and its warnings as `warning:` lines, without touching the caller's logging setup."""
    show = warnings.showwarning
    warnings.showwarning = _one_line_warning(show)
    try:
        with noting(_print_note):
            yield
    finally:
        warnings.showwarning = show


def _print_note(message: str, warning: bool) -> None:
    err.print(("[yellow]warning:[/] " if warning else "[dim]note:[/] ") + escape(message), soft_wrap=True,
              highlight=False)


def _one_line_warning(show: Callable) -> Callable:
    """autofit's own warnings (random weights, a fallback to 32-bit AdamW) as `warning:` lines, without the
    source line Python prints under them; other libraries' as Python shows them."""
    package = os.path.dirname(__file__)

    def show_warning(message, category, filename, lineno, file=None, line=None):
        if not str(filename).startswith(package):
            return show(message, category, filename, lineno, file, line)
        if main_process():
            err.print("[yellow]warning:[/] " + escape(str(message)), soft_wrap=True, highlight=False)

    return show_warning


def escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
