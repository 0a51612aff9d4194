"""benchmarks/gpu.py's figures: one line per cell, the summary against the issue's targets, the table."""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks._common import spearman, table

TARGETS = {"allocated_median_abs_pct": 3.0, "allocated_max_abs_pct": 8.0, "time_spearman": 0.8}


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:+.1f}%"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def cell_line(c: dict[str, Any]) -> str:
    head = f"{c['model']:8} {c['knobs']:10}"
    if c.get("skipped") or c.get("error"):
        return f"{head} {'skipped' if c.get('skipped') else 'FAILED'}: {c.get('skipped') or c['error']}"
    hf = f"  hf {c['hf_step_seconds']:.3f}s (x{c['autofit_over_hf']:.2f})" if "hf_step_seconds" in c else \
        f"  hf FAILED: {c['hf_error']}" if "hf_error" in c else ""
    mib = f"{_mib(c['predicted_allocated_bytes']):>9} / {_mib(c['measured_allocated_bytes']):>9} MiB"
    return (f"{head} allocated {mib} {_pct(c['allocated_error']):>7}  reserved {_pct(c['reserved_error']):>7}  step "
            f"{c['predicted_step_seconds']:.3f} / {c['measured_step_seconds']:.3f}s{hf}  [{c['seconds']}s]")


def summarize(cells: list[dict[str, Any]]) -> dict[str, Any]:
    ran = [c for c in cells if "measured_allocated_bytes" in c]

    def stat(key, f):
        return round(100 * f(abs(c[key]) for c in ran), 2) if ran else None
    rho = spearman([c["predicted_step_seconds"] for c in ran], [c["measured_step_seconds"] for c in ran])
    ratios = [c["autofit_over_hf"] for c in ran if "autofit_over_hf" in c]
    s = {"cells": len(cells), "ran": len(ran),
         "failed": [f"{c['model']}/{c['knobs']}: {c['error']}" for c in cells if c.get("error")],
         "skipped": [f"{c['model']}/{c['knobs']}: {c['skipped']}" for c in cells if c.get("skipped")],
         "hf_failed": [f"{c['model']}/{c['knobs']}: {c['hf_error']}" for c in cells if c.get("hf_error")],
         "allocated_median_abs_pct": stat("allocated_error", statistics.median),
         "allocated_max_abs_pct": stat("allocated_error", max),
         "reserved_median_abs_pct": stat("reserved_error", statistics.median),
         "reserved_max_abs_pct": stat("reserved_error", max),
         "reserved_under_predicted": [f"{c['model']}/{c['knobs']}" for c in ran if c["reserved_error"] < 0],
         "over_budget": [f"{c['model']}/{c['knobs']}" for c in ran if c["over_budget"]],
         "time_spearman": rho, "autofit_over_hf_median": round(statistics.median(ratios), 3) if ratios else None}
    ok = bool(ran)
    s["targets"] = {
        f"allocated median abs error <= {TARGETS['allocated_median_abs_pct']}%":
            ok and s["allocated_median_abs_pct"] <= TARGETS["allocated_median_abs_pct"],
        f"allocated worst abs error <= {TARGETS['allocated_max_abs_pct']}%":
            ok and s["allocated_max_abs_pct"] <= TARGETS["allocated_max_abs_pct"],
        "reserved + context within the card": ok and not s["over_budget"],
        f"step-time Spearman >= {TARGETS['time_spearman']}": rho is not None and rho >= TARGETS["time_spearman"],
    }
    return s


def _row(c: dict[str, Any]) -> list[Any]:
    if "measured_allocated_bytes" not in c:
        why = "skipped: " + c["skipped"] if c.get("skipped") else "FAILED: " + c["error"][:80]
        return [c["model"], c["knobs"], why]
    return [c["model"], c["knobs"], c["micro_batch"], _mib(c["measured_allocated_bytes"]),
            _mib(c["predicted_allocated_bytes"]), _pct(c["allocated_error"]), _mib(c["measured_reserved_bytes"]),
            _pct(c["reserved_error"]), f"{c['measured_step_seconds']:.3f}", f"{c['predicted_step_seconds']:.3f}",
            f"{c['hf_step_seconds']:.3f}" if "hf_step_seconds" in c else "—"]


def report(cells: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    headers = ["model", "knobs", "micro", "alloc MiB", "pred MiB", "alloc err", "reserved MiB", "reserved err",
               "step s", "pred step s", "HF step s"]
    rows = [row + [""] * (len(headers) - len(row)) for row in map(_row, cells)]
    targets = table(["target", "met"], [[t, "PASS" if ok else "FAIL"] for t, ok in summary["targets"].items()])
    return table(headers, rows) + "\n\n" + targets
