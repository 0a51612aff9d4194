"""The executor: trains a model with a Plan (accelerate underneath), measures its peak memory, falls back
to smaller knobs on out-of-memory, and checkpoints/resumes exactly."""

from autofit.executor.checkpoint import CheckpointError, latest_checkpoint
from autofit.executor.fallback import FallbackError, TrainingOutOfMemoryError, default_fallback
from autofit.executor.interrupt import TrainingDivergedError, TrainingInterruptedError
from autofit.executor.result import EvalRecord, FallbackRecord, StepRecord, TrainResult
from autofit.executor.run import run_plan
from autofit.executor.validate import ExecutorInputError

__all__ = ["run_plan", "TrainResult", "StepRecord", "EvalRecord", "FallbackRecord", "ExecutorInputError",
           "FallbackError", "TrainingOutOfMemoryError", "TrainingDivergedError", "TrainingInterruptedError",
           "CheckpointError", "default_fallback", "latest_checkpoint"]
