"""Per-process accuracy: plans for 2 processes under DDP and FSDP2, trained by 2 real processes on the CPU.

    python -m benchmarks.accuracy_ranks [--quick] [--families bert,llama] [--shardings ddp,fsdp]

For each family (benchmarks/accuracy_e2e.py's small random-weight models and ~300 examples of skewed lengths)
and each way of sharing a step (the balanced policy restricted to one `sharding` choice: ddp, fsdp, fsdp:keep
- units kept gathered after forward -, fsdp:2 - two layers per unit), at budgets a point p of the way (log
scale) from the smallest budget any such plan fits on 2 processes to the naive plan's per-process peak:

  plan        the main process plans for the 2 launched processes (autofit.train with a budget, balanced
              policy with that sharding only), the other trains its plan;
  training    `torchrun --nproc_per_node 2` runs autofit.train on both processes for one full epoch (gloo),
              each training its share of every step of 16 examples, evaluation included;
  predicted   TrainResult.predicted_allocated_bytes: one process's peak (the memory model's worst process);
  measured    every process's own peak (autofit/measure.py's live-tensor tracker, which counts FSDP2's DTensor
              shards as their local storage and sees FSDP2's storage resizes), after the first optimizer step.

Each cell records the error (predicted - measured) / measured of the worst process and of every process,
and whether each measured peak stayed within the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import environment, spearman, table, write_result

PROCESSES = 2
SHARDINGS = ("ddp", "fsdp", "fsdp:keep", "fsdp:2")
FULL = dict(families=["bert", "llama", "gpt2"], shardings=SHARDINGS, points=(0.0, 0.5))
QUICK = dict(families=["bert", "llama"], shardings=("ddp", "fsdp"), points=(0.25,))


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:+.1f}%"


def summarize(cells: list[dict[str, Any]]) -> dict[str, Any]:
    ran = [c for c in cells if c.get("measured_bytes")]
    worst = [abs(c["error"]) for c in ran]
    every = [abs(e) for c in ran for e in c["rank_errors"]]
    return {
        "cells": len(cells), "trained": len(ran), "no_plan": len(cells) - len(ran),
        "median_abs_error_pct": round(100 * statistics.median(worst), 2) if ran else None,
        "max_abs_error_pct": round(100 * max(worst), 2) if ran else None,
        "rank_median_abs_error_pct": round(100 * statistics.median(every), 2) if ran else None,
        "rank_max_abs_error_pct": round(100 * max(every), 2) if ran else None,
        "over_budget": sum(1 for c in ran if c["over_budget"]),
        "time_rank_correlation": spearman([c["predicted_step_seconds"] for c in ran],
                                           [c["measured_step_seconds"] for c in ran]),
        "over_3pct": [f"{c['family']}/{c['sharding']}@{c['budget']}" for c in ran if abs(c["error"]) > 0.03],
    }


# ---- inside each of the launched processes ----------------------------------------------------------------


def _policy(sharding: str):
    from autofit.policy import ShardingRule, load_policy

    return load_policy("balanced").model_copy(update={"sharding": ShardingRule(choices=[sharding])})


def _budget_range(family: str, sharding: str, train) -> tuple[int, int]:
    """(smallest budget a plan of this sharding fits on 2 processes, the naive plan's per-process peak)."""
    import autofit
    from autofit.api import make_workload
    from autofit.cluster import Cluster
    from autofit.devices import get_device
    from autofit.knobs import Knobs
    from autofit.memory import predict_peak
    from autofit.profiler.cache import cached_profile
    from autofit.profiler.profile import PRECISIONS
    from autofit.search import NoPlanFitsError
    from benchmarks.accuracy_e2e import BATCH, FAMILIES, MAX_POS, build_model

    _, task, _ = FAMILIES[family]
    model = build_model(family)
    profile = cached_profile(model, task=task, timing=PRECISIONS)
    workload = make_workload(task, seq_len=MAX_POS, batch_size=BATCH, lengths=train.lengths)
    naive = Knobs(micro_batch_size=BATCH)
    hi = predict_peak(profile, naive, workload, get_device("cpu"), Cluster(processes=PROCESSES)).peak_bytes
    try:
        autofit.plan(model, 2**20, data=train, batch_size=BATCH, device="cpu", task=task, policy=_policy(sharding),
                     gpus=PROCESSES, adapter="none")
        return 2**20, hi
    except NoPlanFitsError as error:
        return error.smallest_budget_bytes, hi


def run_cells(family: str, shardings: list[str], points: list[float]) -> list[dict[str, Any]]:
    """Every cell of one family, run by each launched process; the main process returns them."""
    import torch.distributed as dist

    import autofit
    from autofit.processes import on_main_process
    from benchmarks.accuracy_e2e import BATCH, FAMILIES, budget_at, build_model, datasets, knobs_summary

    _, task, _ = FAMILIES[family]
    train, evaluation = datasets(family)
    cells = []
    for sharding in shardings:
        lo, hi = on_main_process(lambda: _budget_range(family, sharding, train), cpu=True)
        for point in points:
            budget = budget_at(point, lo, hi)
            cell: dict[str, Any] = {"family": family, "sharding": sharding, "budget": f"p{point:g}",
                                    "budget_bytes": budget, "smallest_budget_bytes": lo, "naive_bytes": hi}
            t = time.perf_counter()
            result = autofit.train(build_model(family), train, budget=budget, policy=_policy(sharding),
                                   adapter="none", eval_data=evaluation, batch_size=BATCH, task=task, device="cpu",
                                   epochs=1, quiet=True)
            ranks = list(result.rank_peak_bytes)
            predicted = result.predicted_allocated_bytes
            plan = result.plan
            cell.update(knobs=knobs_summary(plan.knobs, plan.num_layers), knob_values=plan.knobs.model_dump(mode="json"),
                        predicted_bytes=predicted, predicted_peak_phase=plan.predicted.peak_phase,
                        predicted_gathered_bytes=plan.predicted.gathered, rank_measured_bytes=ranks,
                        measured_bytes=max(ranks), error=(predicted - max(ranks)) / max(ranks),
                        rank_errors=[(predicted - m) / m for m in ranks], over_budget=max(ranks) > budget,
                        memory_warning=result.memory_warning, steps=len(result.history),
                        predicted_step_seconds=plan.time.step_seconds,
                        measured_step_seconds=statistics.median(r.seconds for r in result.history[1:] or result.history),
                        samples_per_step=[r.samples for r in result.history],
                        seconds=round(time.perf_counter() - t, 1))
            cells.append(cell)
            if dist.get_rank() == 0:
                print(f"{family:7} {sharding:10} {cell['budget']:5} budget {budget / 2**20:6.2f} MiB  "
                      f"{cell['knobs']:28} pred {predicted / 2**20:6.2f}  meas "
                      f"{' / '.join(f'{m / 2**20:.2f}' for m in ranks)} MiB  {_pct(cell['error']):>7}", flush=True)
    return cells


def worker(family: str, shardings: list[str], points: list[float], out: str) -> None:
    import torch

    from benchmarks._common import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(1)
    cells = run_cells(family, shardings, points)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps(cells))
    import torch.distributed as dist

    dist.barrier()  # nobody leaves while another still talks: gloo's threads would abort the exit
    dist.destroy_process_group()


# ---- the driver --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(family: str, shardings: list[str], points: list[float]) -> list[dict[str, Any]]:
    """torchrun 2 processes running `worker` for one family; its cells."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cells.json"
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={PROCESSES}",
                   f"--master_port={_free_port()}", "-m", "benchmarks.accuracy_ranks", "--worker", family,
                   "--shardings", ",".join(shardings), "--points", ",".join(map(str, points)), "--out", str(out)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        done = subprocess.run(command, cwd=Path(__file__).resolve().parent.parent, env=env)
        if done.returncode != 0:
            raise SystemExit(f"the 2-process run of {family} failed (exit {done.returncode})")
        return json.loads(out.read_text())


def report(result: dict[str, Any]) -> str:
    rows = [[c["family"], c["sharding"], c["budget"], f"{c['budget_bytes'] / 2**20:.2f}", c["knobs"],
             f"{c['predicted_bytes'] / 2**20:.2f}", " / ".join(f"{m / 2**20:.2f}" for m in c["rank_measured_bytes"]),
             _pct(c["error"]), " / ".join(_pct(e) for e in c["rank_errors"]), "OVER" if c["over_budget"] else "no"]
            for c in result["cells"]]
    cells = table(["family", "sharding", "budget", "budget MiB", "knobs", "predicted MiB", "measured MiB (rank 0 / 1)",
                   "error (worst)", "error per rank", "over budget"], rows)
    s = result["summary"]
    return cells + "\n\n" + (
        f"{s['trained']} of {s['cells']} cells trained on {PROCESSES} processes; |error| of the worst process: "
        f"median {s['median_abs_error_pct']}%, worst {s['max_abs_error_pct']}%; of every process: median "
        f"{s['rank_median_abs_error_pct']}%, worst {s['rank_max_abs_error_pct']}%; over budget: {s['over_budget']}; "
        f"step time rank correlation (predicted vs measured) {s['time_rank_correlation']}")


def main(quick: bool = False, families: list[str] | None = None, shardings: list[str] | None = None,
         points: list[float] | None = None) -> dict[str, Any]:
    config = dict(QUICK if quick else FULL)
    config.update({k: v for k, v in dict(families=families, shardings=shardings, points=points).items() if v})
    started = time.perf_counter()
    cells = []
    for family in config["families"]:
        cells += launch(family, list(config["shardings"]), list(config["points"]))
    result = {"cells": cells, "summary": summarize(cells)}
    print(report(result))
    payload = {"benchmark": "accuracy_ranks", "mode": "quick" if quick else "full", **environment(),
               "setup": {"processes": PROCESSES, "backend": "gloo", "device": "cpu", **{
                   k: list(v) for k, v in config.items()},
                   "plan": "autofit.train(model, data, budget=..., policy=balanced with one sharding choice, "
                           "adapter='none') on each process: the main process plans, both train",
                   "measured": "TrainResult.rank_peak_bytes: each process's live-tensor peak after its first "
                               "optimizer step, evaluation included"},
               "seconds": round(time.perf_counter() - started, 1), **result, "headline": result["summary"]}
    subset = bool(families or shardings or points)
    path = write_result("accuracy_ranks_subset" if subset else "accuracy_ranks_quick" if quick else "accuracy_ranks",
                        payload)
    print(f"\n{len(cells)} cells in {payload['seconds']:.0f}s; wrote {path}")
    return payload


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 families x ddp, fsdp x 1 budget")
    parser.add_argument("--families", help="comma-separated subset of benchmarks.accuracy_e2e.FAMILIES")
    parser.add_argument("--shardings", help=f"comma-separated subset of {','.join(SHARDINGS)}")
    parser.add_argument("--points", help="comma-separated log-scale budget points (0: the smallest that fits)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    split = lambda text: text.split(",") if text else None  # noqa: E731
    numbers = [float(x) for x in args.points.split(",") if x] if args.points else None
    if args.worker:
        worker(args.worker, split(args.shardings), numbers, args.out)
    else:
        main(args.quick, split(args.families), split(args.shardings), numbers)
