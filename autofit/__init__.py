"""autofit: plan and run memory-efficient fine-tuning of Hugging Face transformers on a small GPU.

    plan = autofit.plan("microsoft/deberta-v3-base", budget="16GB", seq_len=512, batch_size=32)
    result = autofit.train(model, data, budget="16GB", tokenizer=tok, epochs=1)
"""

import os
import signal
import sys


def _as_command() -> bool:
    """Imported by the `autofit` command (or `python -m autofit`), not as a library."""
    argv = getattr(sys, "orig_argv", [])
    return sys.argv[0].rsplit("/", 1)[-1] == "autofit" or any(
        flag == "-m" and name == "autofit" for flag, name in zip(argv, argv[1:]))


def _stopped_while_starting(signum, frame) -> None:
    sys.stderr.write("stopped: interrupted\n")
    sys.stderr.flush()
    # nothing has started, so nothing to save; an exception raised here lands inside some import and can
    # leave a half-made module behind (numpy's then recursed into a traceback after all)
    os._exit(130)


if _as_command():  # Ctrl-C while the command imports torch (seconds): no traceback; cli.main restores Python's
    signal.signal(signal.SIGINT, _stopped_while_starting)

from autofit.api import plan  # noqa: E402
from autofit.training import train  # noqa: E402
from autofit.budget import BudgetError, format_bytes, parse_budget  # noqa: E402
from autofit.knobs import Knobs, Precision  # noqa: E402
from autofit.plan import MemoryBreakdown, Plan, TimePrediction  # noqa: E402
from autofit.policy import Policy, load_policy  # noqa: E402
from autofit.profiler import Profile, profile_model  # noqa: E402
from autofit.search import NoPlanFitsError  # noqa: E402

__version__ = "0.1.0"
"""The one place the version is written: pyproject.toml reads it from here."""
__all__ = ["plan", "train", "Plan", "Knobs", "Precision", "MemoryBreakdown", "TimePrediction", "TrainResult",
           "Profile", "profile_model", "Policy", "load_policy", "NoPlanFitsError", "BudgetError", "parse_budget",
           "format_bytes"]


def __getattr__(name: str):
    """TrainResult comes from the executor, the last stage: imported when first asked for, not with autofit."""
    if name == "TrainResult":
        from autofit.executor.result import TrainResult

        return TrainResult
    raise AttributeError(f"module 'autofit' has no attribute {name!r}")
