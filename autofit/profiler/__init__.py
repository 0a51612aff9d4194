"""The profiler: per-block parameter, activation and time figures of a model, fit over micro-batch shapes."""

from autofit.profiler.profile import profile_model
from autofit.profiler.schema import BlockActivations, BlockProfile, FitCheck, Profile, ShapeFit, TimeFit

__all__ = ["profile_model", "Profile", "BlockProfile", "BlockActivations", "ShapeFit", "TimeFit", "FitCheck"]
