"""Run every benchmark and print the README's summary table.

    python -m benchmarks.run --quick        # about 10 minutes on a 2-core CPU
    python -m benchmarks.run                # full runs (much longer)
    python -m benchmarks.run --quick --only accuracy,planning
    python -m benchmarks.run --summarize    # the table again from the saved results, each row with its commit

Each module in MODULES that exists exposes `main(quick: bool) -> dict` and writes its own JSON to
benchmarks/results/. This script runs them in sequence, one failure not stopping the others, pulls a few
headline metrics out of each result, writes benchmarks/results/summary.json and prints a markdown table
(metric | value | target). A module not written yet (convergence, accuracy_e2e) is listed as missing and
skipped; one without a summary extractor here shows its result's `headline` dict, if it has one.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))

from benchmarks._common import environment, table, write_result

MODULES = ("accuracy", "planning", "padding", "overhead", "plan_quality", "reliability", "convergence",
           "accuracy_e2e", "accuracy_ranks")

Row = tuple[str, str, str]  # metric, value, target


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}%"


def _accuracy(r: dict[str, Any]) -> list[Row]:
    h = r["headline"]
    s = r["summary"]
    worst_knob = max((k for k in s if k.startswith("knobs=")), key=lambda k: s[k]["autofit"]["median_abs_pct"])
    worst_arch = max((k for k in s if k.startswith("arch=")), key=lambda k: s[k]["autofit"]["max_abs_pct"])
    return [
        (f"peak-memory prediction error, median over {h['cells']} runs (autofit)",
         _pct(h["autofit_median_abs_error_pct"]), "≤ 3%"),
        ("peak-memory prediction error, worst run (autofit)", _pct(h["autofit_max_abs_error_pct"]), "≤ 8%"),
        ("  same, `accelerate estimate-memory` rule (no activations): median / worst",
         f"{_pct(h['accelerate_median_abs_error_pct'])} / {_pct(h['accelerate_max_abs_error_pct'])}", "baseline"),
        ("  same, DeepSpeed-autotuner rule (one measured activation slope): median / worst",
         f"{_pct(h['deepspeed_median_abs_error_pct'])} / {_pct(h['deepspeed_max_abs_error_pct'])}", "baseline"),
        *([("  on padded batches: median / worst",
             f"{_pct(s['data=padded']['autofit']['median_abs_pct'])} / {_pct(s['data=padded']['autofit']['max_abs_pct'])}",
             "≤ 3% / ≤ 8%")] if "data=padded" in s else []),
        (f"  worst architecture ({worst_arch[5:]}): median / worst",
         f"{_pct(s[worst_arch]['autofit']['median_abs_pct'])} / {_pct(s[worst_arch]['autofit']['max_abs_pct'])}",
         "≤ 3% / ≤ 8%"),
        (f"  worst knob set ({worst_knob[6:]}): median / worst",
         f"{_pct(s[worst_knob]['autofit']['median_abs_pct'])} / {_pct(s[worst_knob]['autofit']['max_abs_pct'])}",
         "≤ 3% / ≤ 8%"),
        *_adapter_rows(r),
    ]


def _adapter_rows(r: dict[str, Any]) -> list[Row]:
    """The LoRA (fp32 or half base) and QLoRA (4-bit base) cells on their own: median / worst |error|."""
    rows = []
    for label, prefix in (("LoRA", "lora"), ("QLoRA", "qlora")):
        errors = [abs(c["error"]) * 100 for c in r["cells"] if c["knobs"].startswith(prefix + "-")]
        if errors:
            archs = sorted({c["arch"] for c in r["cells"] if c["knobs"].startswith(prefix + "-")})
            rows.append((f"  {label} cells ({len(errors)}, {', '.join(archs)}): median / worst",
                         f"{_pct(statistics.median(errors))} / {_pct(max(errors))}", "≤ 3% / ≤ 8%"))
    return rows


def _planning(r: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for m in r["models"]:
        name = m["model"].split("/")[-1]
        if m.get("trials") is not None:
            value = (f"{m['cold_wall_seconds']:.1f} s cold ({m['profile_seconds']:.1f} s profile + "
                     f"{m['cold_search_seconds']:.1f} s search, {m['trials']} trials); {m['warm_wall_seconds']:.1f} s cached")
        else:
            error = m["error"] or ""
            if "smallest budget that fits is" in error:
                error = "no plan fits; needs " + error.split("smallest budget that fits is")[1].split("(")[0].strip()
            value = f"{m['cold_wall_seconds']:.1f} s cold, {m['warm_wall_seconds']:.1f} s cached ({error[:70]})"
        rows.append((f"`autofit plan` {name}, 16GB, seq 512, batch 32", value, "≤ 30 s cold, ≤ 5 s cached"))
    return rows


def _padding(r: dict[str, Any]) -> list[Row]:
    """The headline table (steps of 16, a micro-batch each unless the token budget cuts it), then the one
    whose steps of 64 are sorted and cut into micro-batches (absent from results made before it existed)."""
    rows: list[Row] = []
    for key in ("variants", "cut_variants"):
        v = r.get(key)
        if not v:
            continue
        best = max((k for k in v if k != "fixed"), key=lambda k: v[k]["throughput_ratio_vs_fixed"])
        first = next(iter(v.values()))
        if key == "variants":
            label = "padding efficiency: fixed-length / dynamic / best bucketing"
            speed = f"throughput vs fixed-length padding ({best})"
        else:
            cut = f"  steps of {first['batch_size']} cut into micro-batches of ≤ {first['knobs']['micro_batch_size']}"
            label, speed = f"{cut}: padding efficiency, same", f"{cut}: throughput vs fixed-length ({best})"
        rows += [(label, " / ".join(f"{v[k]['padding_efficiency']:.2f}" for k in ("fixed", "dynamic", best) if k in v),
                  "higher"),
                 (speed, f"{v[best]['throughput_ratio_vs_fixed']:.2f}x", "> 1x")]
    return rows


def _overhead(r: dict[str, Any]) -> list[Row]:
    return [
        ("executor throughput vs a hand-written loop (CPU time)", f"{r['autofit_vs_hand']:.3f}x", "≥ 0.97x"),
        ("HF Trainer throughput vs a hand-written loop (CPU time)", f"{r['trainer_vs_hand']:.3f}x", "reference"),
    ]


def _plan_quality(r: dict[str, Any]) -> list[Row]:
    summary = r["summary"]
    policies = [p for p, s in summary.items() if any(v is not None for v in s["ratio_vs_grid_best"].values())]
    names = "/".join(policies)
    rows: list[Row] = [
        (f"plan throughput / best point of the measured grid, worst budget ({names})",
         " / ".join(f"{min(v for v in summary[p]['ratio_vs_grid_best'].values() if v is not None):.2f}"
                    for p in policies), "≥ 0.95"),
        (f"speed-up over the safe default, median over budgets ({names})",
         " / ".join(f"{statistics.median(summary[p]['speedup_vs_safe_default'].values()):.2f}x" for p in policies),
         "> 1x"),
        ("measured peak over the budget, any policy or budget",
         "yes" if any(s["any_measured_peak_over_budget"] for s in summary.values()) else "no", "no"),
    ]
    if "cost_model_rank_correlation" in r:
        rows.append(("time model rank correlation with measured throughput",
                     str(r['cost_model_rank_correlation']), "≥ 0.8"))
    return rows


def _reliability(r: dict[str, Any]) -> list[Row]:
    h = r["headline"]
    rows: list[Row] = []
    for channel in ("cli", "api"):
        rows.append((f"reliability ({h['cases']} cases) through the {channel.upper()}: ok / clean error / unclean "
                     "error / wrong success / traceback / crash / hang",
                     " / ".join(str(h.get(f"{channel}_{o}", 0)) for o in ("ok", "clean_error", "unclean_error",
                                                                        "wrong_success", "traceback", "crash", "hang")),
                     "no traceback, crash, hang"))
    if h.get("resume_bit_identical"):
        rows.append(("crash-resume runs bit-identical to an uninterrupted run", h["resume_bit_identical"], "all"))
    return rows


def _headline(name: str) -> Callable[[dict[str, Any]], list[Row]]:
    """A module without its own extractor: each entry of its result's `headline` dict, as it is."""
    def extract(r: dict[str, Any]) -> list[Row]:
        headline = r.get("headline")
        if not isinstance(headline, dict) or not headline:
            return [(f"{name}: see benchmarks/results/{name}*.json", "—", "—")]
        return [(f"{name}: {key.replace('_', ' ')}", f"{value:.3g}" if isinstance(value, float) else str(value), "—")
                for key, value in headline.items()]
    return extract


def _convergence(r: dict[str, Any]) -> list[Row]:
    v, s = r["verdict"], r["sides"]
    return [
        (f"held-out loss, autofit plan / plain fixed-batch loop, mean of {len(r['seeds'])} seeds (MiniLM)",
         f"{v['loss_ratio_autofit_over_plain']:.3f} ({s['autofit']['held_out_loss_mean']:.4f} / "
         f"{s['plain']['held_out_loss_mean']:.4f}): {'PASS' if v['pass'] else 'FAIL'}",
         f"≤ 1 + {v['loss_tolerance']:.3f} (2 x plain seed SD)"),
        ("  held-out accuracy, autofit plan / plain loop",
         f"{v['accuracy_autofit_mean']:.1%} / {v['accuracy_plain_mean']:.1%}",
         f"≥ plain - {v['accuracy_tolerance']:.1%}"),
    ]


def _accuracy_ranks(r: dict[str, Any]) -> list[Row]:
    s = r["summary"]
    return [
        (f"per-process peak prediction, 2 processes (DDP/FSDP2), {s['trained']} runs: median / worst error",
         f"{_pct(s['median_abs_error_pct'])} / {_pct(s['max_abs_error_pct'])}", "≤ 3% / ≤ 8%"),
        ("  measured peak over the budget (any process)", str(s["over_budget"]), "0"),
    ]


EXTRACTORS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "accuracy": _accuracy, "planning": _planning, "padding": _padding, "overhead": _overhead,
    "plan_quality": _plan_quality, "reliability": _reliability, "convergence": _convergence,
    "accuracy_ranks": _accuracy_ranks,
}


def _available(name: str) -> bool:
    return importlib.util.find_spec(f"benchmarks.{name}") is not None


def main(quick: bool = True, only: list[str] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    modules: dict[str, Any] = {}
    rows: list[Row] = []
    for name in only or MODULES:
        if not _available(name):
            modules[name] = {"status": "missing"}
            rows.append((f"{name}", "not run: no module benchmarks/" + name + ".py", "—"))
            print(f"\n=== benchmarks.{name}: missing, skipped ===", flush=True)
            continue
        print(f"\n=== benchmarks.{name} ({'quick' if quick else 'full'}) ===", flush=True)
        t = time.perf_counter()
        try:
            result = importlib.import_module(f"benchmarks.{name}").main(quick=quick)
            status = "ok"
        except Exception as error:  # one broken benchmark must not hide the others' numbers
            traceback.print_exc()
            result, status = None, f"failed: {type(error).__name__}: {error}"
        seconds = time.perf_counter() - t
        entry: dict[str, Any] = {"status": status, "seconds": round(seconds, 1)}
        if result is not None:
            try:
                metrics = EXTRACTORS.get(name, _headline(name))(result)
            except Exception as error:  # a module changed its result format: say so, keep going
                metrics = [(f"{name}: see benchmarks/results/{name}*.json", "—",
                            f"(summary unavailable: {type(error).__name__} {error})")]
            entry["metrics"] = [{"metric": m, "value": v, "target": g} for m, v, g in metrics]
            rows.extend(metrics)
        else:
            rows.append((f"{name}", status, "—"))
        modules[name] = entry
    total = time.perf_counter() - started
    rows.append((f"time for `python -m benchmarks.run{' --quick' if quick else ''}`", f"{total / 60:.1f} min",
                 "≤ 10 min" if quick else "—"))
    markdown = table(["metric", "value", "target"], [list(r) for r in rows])
    print("\nseconds per module: " + ", ".join(f"{name} {entry['seconds']:.0f}" for name, entry in modules.items()
                                               if "seconds" in entry), flush=True)
    env = environment()
    summary = {"benchmark": "summary", "mode": "quick" if quick else "full", **env, "seconds": round(total, 1),
               "modules": modules, "markdown": markdown}
    path = write_result(("summary" if only is None else "summary_partial") + ("_quick" if quick else ""), summary)
    print(f"\n{markdown}\n\n{env['date']}, {env['machine']['cpu_count']} CPUs ({env['machine']['processor']}), "
          f"torch {env['torch']}; wrote {path}")
    return summary


def summarize(quick: bool = False) -> dict[str, Any]:
    """The summary table rebuilt from the results already saved, without running anything: each row names
    the commit and date its benchmark ran at, so benchmarks run apart can be reported together honestly."""
    import json

    from benchmarks._common import RESULTS

    rows: list[Row] = []
    modules: dict[str, Any] = {}
    for name in MODULES:
        path = RESULTS / f"{name}{'_quick' if quick else ''}.json"
        if not path.is_file():
            rows.append((name, f"no {path.name}", "—"))
            continue
        result = json.loads(path.read_text())
        ran = f"{str(result.get('git_commit', '?'))[:7]}, {str(result.get('date', '?'))[:10]}"
        metrics = EXTRACTORS.get(name, _headline(name))(result)
        modules[name] = {"ran_at": ran, "seconds": result.get("seconds"),
                         "metrics": [{"metric": m, "value": v, "target": g} for m, v, g in metrics]}
        rows.extend((m, v, g) for m, v, g in metrics)
        rows.append((f"  ({name}: commit {ran}, {result.get('seconds', 0) / 60:.0f} min)", "", ""))
    markdown = table(["metric", "value", "target"], [list(r) for r in rows])
    summary = {"benchmark": "summary", "mode": "quick" if quick else "full", "rebuilt_from_results": True,
               **environment(), "modules": modules, "markdown": markdown}
    path = write_result("summary_quick" if quick else "summary", summary)
    print(f"{markdown}\n\nwrote {path}")
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every benchmark's quick mode (≈10 min on 2 cores)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(MODULES)}")
    parser.add_argument("--summarize", action="store_true",
                        help="rebuild summary.json from the saved results (each row names its commit), run nothing")
    args = parser.parse_args()
    if args.summarize:
        summarize(args.quick)
        raise SystemExit(0)
    main(args.quick, args.only.split(",") if args.only else None)
