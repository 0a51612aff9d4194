"""Planning overhead: wall time of `autofit.plan(...)` for real model sizes, split into profiling and search.

    python -m benchmarks.planning [--quick]

For microsoft/deberta-v3-base, microsoft/deberta-v3-large and meta-llama/Llama-2-7b-hf (catalog configs, no
network, no weights) at budget 16GB, seq 512, batch 32, planned for a generic CUDA card:

  cold   autofit.plan with an empty profile cache (AUTOFIT_CACHE pointed at a fresh directory): profiling on
         fake tensors + the Optuna search;
  warm   the same call again: the profile comes from the cache, only the search runs.

Profile seconds are the Profile's own `seconds`; search seconds and trials are `plan.search`. Full mode repeats
each measurement three times and reports the median.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))

from benchmarks._common import environment, quiet_libraries, table, write_result

MODELS = ("microsoft/deberta-v3-base", "microsoft/deberta-v3-large", "meta-llama/Llama-2-7b-hf")
BUDGET, SEQ_LEN, BATCH = "16GB", 512, 32


def _one(model: str, cache: str) -> dict[str, Any]:
    import autofit
    from autofit.profiler.cache import cached_profile
    from autofit.search import NoPlanFitsError

    os.environ["AUTOFIT_CACHE"] = cache
    started = time.perf_counter()
    try:
        plan = autofit.plan(model, budget=BUDGET, seq_len=SEQ_LEN, batch_size=BATCH)
        error = None
    except NoPlanFitsError as e:
        plan, error = None, str(e).splitlines()[0]
    wall = time.perf_counter() - started
    profile = cached_profile(model)  # read back from the cache: its `seconds` is the cold profiling time
    seconds = profile.seconds
    if plan is not None and plan.knobs.adapter == "lora":  # the adapters' fits were measured too (cached now):
        seconds = cached_profile(model, adapters=True).seconds  # its seconds include the plain profile's
    row: dict[str, Any] = {"model": model, "wall_seconds": round(wall, 3), "profile_seconds": round(seconds, 3),
                           "num_params": profile.num_params, "error": error}
    if plan is not None:
        k = plan.knobs
        row.update({
            "search_seconds": round(plan.search.seconds, 3), "trials": plan.search.trials,
            "space_size": plan.search.space_size, "policy": plan.policy,
            "predicted_peak_gib": round(plan.predicted.peak_bytes / 2**30, 2),
            "knobs": k.model_dump(mode="json"),
            "micro_batches_per_step": list(plan.step.micro_batches_per_step),
            "knobs_summary": knobs_summary(plan),
        })
    return row


def knobs_summary(plan) -> str:
    """e.g. "mb 4 (x8/step of 32), bf16, 8-bit, ckpt 6/12, freeze emb+2": the micro-batch cap and the
    micro-batches a full step of the plan's batch is cut into (a range when its buckets differ)."""
    k = plan.knobs
    low, high = plan.step.micro_batches_per_step
    per_step = f"x{low}" if low == high else f"x{low}-{high}"
    adapter = f", LoRA r{k.lora_rank} {k.lora_targets} on a {k.base_dtype} base" if k.adapter == "lora" else ""
    return (f"mb {k.micro_batch_size} ({per_step}/step of {plan.batch_size}), {k.precision.value}, "
            f"{k.optimizer_bits}-bit, ckpt {len(k.checkpoint_layers)}/{plan.num_layers}, "
            f"freeze {'emb+' if k.freeze_embeddings else ''}{k.freeze_layers}{adapter}")


def measure(model: str, repeats: int) -> dict[str, Any]:
    cold, warm = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="autofit-bench-cache-") as cache:
            cold.append(_one(model, cache))
            warm.append(_one(model, cache))
    median = lambda rows, key: round(statistics.median(r[key] for r in rows), 3) if key in rows[0] else None  # noqa: E731
    last = cold[-1]
    return {
        **{k: v for k, v in last.items() if k not in ("wall_seconds", "profile_seconds", "search_seconds")},
        "cold_wall_seconds": median(cold, "wall_seconds"),
        "profile_seconds": median(cold, "profile_seconds"),
        "cold_search_seconds": median(cold, "search_seconds"),
        "warm_wall_seconds": median(warm, "wall_seconds"),
        "warm_search_seconds": median(warm, "search_seconds"),
        "repeats": repeats,
        "runs": {"cold": cold, "warm": warm},
    }


def _short(error: str) -> str:
    """'no plan fits in 16.0 GB; the smallest budget that fits is 79.8 GB (...)' -> 'no fit; needs 79.8 GB'."""
    if "smallest budget that fits is" in error:
        return "no fit; needs " + error.split("smallest budget that fits is")[1].split("(")[0].strip()
    return error[:60]


def main(quick: bool = False) -> dict[str, Any]:
    quiet_libraries()
    previous = os.environ.get("AUTOFIT_CACHE")
    started = time.perf_counter()
    try:
        import autofit  # noqa: F401  (import time is not planning time)
        rows = [measure(model, 1 if quick else 3) for model in MODELS]
    finally:
        if previous is None:
            os.environ.pop("AUTOFIT_CACHE", None)
        else:
            os.environ["AUTOFIT_CACHE"] = previous
    seconds = time.perf_counter() - started
    print(table(["model", "params", "cold plan s", "profile s", "search s", "warm plan s", "trials", "plan",
                 "peak GiB"],
                [[r["model"], f"{r['num_params'] / 1e6:.0f}M", r["cold_wall_seconds"], r["profile_seconds"],
                  r["cold_search_seconds"], r["warm_wall_seconds"], r.get("trials"),
                  r.get("knobs_summary") or _short(r["error"]), r.get("predicted_peak_gib")] for r in rows]))
    payload = {"benchmark": "planning", "mode": "quick" if quick else "full", **environment(),
               "setup": {"budget": BUDGET, "seq_len": SEQ_LEN, "batch_size": BATCH, "device": "generic cuda (no GPU here)",
                         "policy": "balanced", "cache": "fresh temporary AUTOFIT_CACHE per repeat"},
               "seconds": round(seconds, 1), "models": rows}
    path = write_result("planning_quick" if quick else "planning", payload)
    print(f"\nwrote {path} ({seconds:.0f}s)")
    return payload


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repeat per model instead of three")
    main(parser.parse_args().quick)
