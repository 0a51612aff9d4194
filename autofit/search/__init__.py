"""Search the knobs a policy allows for the fastest plan that fits a memory budget (Optuna)."""

from autofit.search.result import (
    Candidate,
    NoPlanFitsError,
    SearchResult,
    alternatives,
    changed_techniques,
    rank,
)
from autofit.search.space import SearchSpace, enumerate_space, micro_batch_sizes
from autofit.search.study import Evaluator, exhaustive_best, minimal_memory, search

__all__ = [
    "Candidate", "Evaluator", "NoPlanFitsError", "SearchResult", "SearchSpace", "alternatives",
    "changed_techniques", "enumerate_space", "exhaustive_best", "micro_batch_sizes", "minimal_memory", "rank",
    "search",
]
