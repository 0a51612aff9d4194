"""autofit: plan and run memory-efficient fine-tuning of Hugging Face transformers on a small GPU.

    plan = autofit.plan("microsoft/deberta-v3-base", budget="16GB", seq_len=512, batch_size=32)
    result = autofit.train(model, data, budget="16GB", tokenizer=tok, epochs=1)
"""

from autofit.api import plan
from autofit.training import train
from autofit.budget import BudgetError, format_bytes, parse_budget
from autofit.knobs import Knobs, Precision
from autofit.plan import MemoryBreakdown, Plan, TimePrediction
from autofit.policy import Policy, load_policy
from autofit.profiler import Profile, profile_model
from autofit.search import NoPlanFitsError

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
