"""Shared helpers of the benchmark scripts: where results go and what describes the run."""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def environment() -> dict[str, Any]:
    """Date, machine and versions: what a reader needs to judge a number."""
    import torch
    import transformers

    try:
        from importlib.metadata import version
        autofit_version = version("autofit")
    except Exception:  # not installed as a distribution
        autofit_version = "unknown"
    return {
        **git_state(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
        },
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "autofit": autofit_version,
        "command": " ".join(shlex.quote(a) for a in ["python", *getattr(sys, "orig_argv", sys.argv)[1:]]),
    }


def git_state() -> dict[str, Any]:
    """The commit the numbers were made at, and which tracked files differed from it (read-only git calls)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
        return {"git_commit": commit or None, "git_modified": [line[3:] for line in dirty if line.strip()]}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_modified": []}


def machine_info(threads: int, module: str, quick: bool) -> dict[str, Any]:
    """environment(), the load on the machine, and the command that reproduces the result (the real argv
    too): what the timing benchmarks record."""
    return {
        **environment(), "torch_threads": threads,
        "load_average_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "command": f"python -m {module}" + (" --quick" if quick else ""), "argv": sys.argv,
    }


def write_result(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain markdown table (right-aligned numbers are not worth the complexity here)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run with `count` intra-op threads, then restore the previous setting. One thread makes CPU timings
    of small models steadier on a shared machine and changes no byte count."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def quiet_libraries() -> None:
    """Silence the warnings random-weight models and CPU autocast print on every run."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("transformers", "accelerate", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
    except Exception:
        pass


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Rank correlation of two series (ties share their mean rank); None under three points or with a constant
    side, where it is undefined. The benchmarks compare predicted with measured step times by it: the CPU's
    live-tensor meter slows every step, so the order is what counts."""
    def ranks(values):
        ordered = sorted(values)
        return [ordered.index(v) + (ordered.count(v) - 1) / 2 for v in values]

    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    return round(statistics.correlation(ranks(xs), ranks(ys)), 3)
