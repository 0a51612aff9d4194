"""Plan quality: is the plan autofit chooses under a budget as fast as the best configuration that fits?

A small BERT (hidden 128, 4 layers, vocab 2000, 128-token sequences, effective batch 16) on the CPU. For
each memory budget, from tight to loose:

1. the grid: every configuration of micro-batch x checkpointing (none / half / all layers) x precision
   (fp32 / bf16) x AdamW state (32 / 8 bit), no freezing, every optimizer step training the effective
   batch of 16 examples cut into micro-batches of the grid's size (16 / micro-batch of them), whose
   PREDICTED peak (`autofit.memory.predict_peak`) fits the budget;
2. autofit's choice: `plan_from_profile(profile, workload, budget, cpu, policy)` for the policies
   "balanced" and "fastest" (both may freeze layers, which the grid never does: reported as such),
   "quality-first" (may freeze the embeddings), and "balanced" with freezing turned off
   ("balanced-nofreeze": the grid's own space, the like-for-like test).

Every grid configuration and every chosen plan is then MEASURED with `run_plan` (samples per second over
a few optimizer steps after a warm-up step, at the same effective batch, timed on this process's CPU
clock with one torch thread, which other jobs on a shared machine disturb far less than the wall clock;
wall-clock figures are in the JSON too), and the chosen plans' peaks are measured with the executor's
live-tensor meter. Reported per budget and policy: chosen / best-measured grid throughput (target >=
0.95), whether the measured peak exceeded the budget, and the speed-up over the safe default (checkpoint
all layers, micro-batch 1: 16 micro-batches per step). Budgets come from the grid's predicted peaks, so
each one admits a different part of the grid. Knobs are labelled like "mb4 (x4/step) ckpt2 bf16 8bit":
the micro-batch cap, the micro-batches a step of 16 is cut into, checkpointed layers, precision, AdamW
state width (then freezing, token budget and buckets, when a chosen plan has them).

The profile is timed in fp32, bf16 and fp16 (what `autofit.plan` does on the CPU). The benchmark also
plans from the same profile with the fp16 timings removed (a profile made with timing=("fp32", "bf16"))
to show what the search does with a precision it has no measured time for.

    python -m benchmarks.plan_quality [--quick]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import time
import warnings
from pathlib import Path

from autofit.intmath import round_up
from benchmarks._common import machine_info, spearman, torch_threads, write_result
from benchmarks.padding import StepClock, hand_plan, small_bert, token_data

THREADS = 1
SEQ, EFFECTIVE_BATCH, LAYERS, VOCAB = 128, 16, 4, 2000
POLICIES = ("balanced", "fastest", "quality-first", "balanced-nofreeze")
"""The shipped policies, plus "balanced" with freezing turned off: the same space as the grid (full
fine-tuning), so its ratio to the grid's best is the like-for-like test of the search and cost model."""


def policy_named(name: str):
    from autofit.policy import FreezeRule, load_policy

    if name == "balanced-nofreeze":
        return load_policy("balanced").model_copy(update={"name": name, "freeze": FreezeRule()})
    return load_policy(name)
MIB = 2**20


def grid(quick: bool):
    from autofit.knobs import Knobs, Precision

    micro = (1, 4, 16) if quick else (1, 2, 4, 8, 16)
    checkpoint = {"none": (), "all": tuple(range(LAYERS))} if quick else \
        {"none": (), "half": tuple(range(LAYERS // 2)), "all": tuple(range(LAYERS))}
    for mb, ck, prec, bits in itertools.product(micro, checkpoint.values(), ("fp32", "bf16"), (32, 8)):
        yield Knobs(micro_batch_size=mb, checkpoint_layers=ck, precision=Precision(prec), optimizer_bits=bits,
                    pad_to_multiple_of=8)


SAFE_DEFAULT = dict(micro_batch_size=1, checkpoint_layers=tuple(range(LAYERS)), pad_to_multiple_of=8)


def describe(k, hist, batch_size: int = EFFECTIVE_BATCH) -> str:
    """A grid point's label, e.g. "mb4 (x4/step) ckpt2 bf16 8bit": the micro-batch cap, the micro-batches
    a full step of `batch_size` examples of lengths `hist` is cut into (a range when buckets differ),
    checkpointed layers, precision, AdamW state width, then freezing, token budget and buckets if any."""
    from autofit.techniques.accumulation import step_layout

    low, high = step_layout(k, hist, batch_size).micro_batches_per_step
    per_step = f"x{low}" if low == high else f"x{low}-{high}"
    frozen = ("" if not k.freeze_embeddings else f" freeze emb+{k.freeze_layers}")
    tokens = f" tok{k.tokens_per_micro_batch}" if k.tokens_per_micro_batch else ""
    buckets = f" buckets{len(k.bucket_boundaries)}" if k.bucket_boundaries else ""
    return (f"mb{k.micro_batch_size} ({per_step}/step) ckpt{len(k.checkpoint_layers)} {k.precision.value} "
            f"{k.optimizer_bits}bit{frozen}{tokens}{buckets}")


def key(k) -> str:
    return k.model_dump_json()


def without_timing(profile, precision: str):
    """The profile as if `precision` had not been timed (timing=(the others))."""
    blocks = [b.model_copy(update={"time": {p: t for p, t in b.time.items() if p != precision}})
              for b in profile.blocks]
    return profile.model_copy(update={"blocks": blocks})


def choose_budgets(peaks: list[int], quick: bool) -> list[int]:
    """Budgets (bytes) from the grid's predicted peaks: tight (8% above the smallest peak), loose (10%
    above the largest: everything fits) and, between them, geometrically spaced budgets that are aligned
    with no grid point's peak (a budget just above some point's peak would put that point inside the
    policy's headroom band: the worst case for a planner that keeps headroom). Rounded up to 0.25 MiB."""
    tight, loose = 1.08 * min(peaks), 1.1 * max(peaks)
    fractions = (0.0, 0.5) if quick else (0.0, 1 / 3, 2 / 3, 1.0)
    raw = [tight * (loose / tight) ** f for f in fractions]
    quarter = MIB // 4
    return sorted({int(round_up(b, quarter)) for b in raw})


class Bench:
    """Measured step times of knobs: optimizer step to optimizer step, on this process's CPU time (the
    steadier clock on a shared machine; one torch thread, so it is the step's own work) and wall time."""

    def __init__(self, base, data, steps: int, batch_size: int = EFFECTIVE_BATCH):
        self.base, self.data, self.steps, self.batch_size = base, data, steps, batch_size
        self.step_seconds: dict[str, list[float]] = {}
        self.wall_seconds: dict[str, list[float]] = {}

    def measure(self, knobs) -> None:
        """One run: a warm-up step, then `steps` timed optimizer steps of the effective batch."""
        from autofit.executor import run_plan

        model = copy.deepcopy(self.base)
        with StepClock() as clock:
            run_plan(model, hand_plan(model, knobs, self.data, batch_size=self.batch_size), self.data, epochs=1,
                     max_steps=1 + self.steps, measure_memory=False, quiet=True)
        self.step_seconds.setdefault(key(knobs), []).extend(clock.steady("cpu"))
        self.wall_seconds.setdefault(key(knobs), []).extend(clock.steady("wall"))

    def samples_per_second(self, knobs) -> float:
        """Effective batch / median timed step in CPU seconds (all rounds pooled)."""
        return self.batch_size / statistics.median(self.step_seconds[key(knobs)])

    def wall_samples_per_second(self, knobs) -> float:
        return self.batch_size / statistics.median(self.wall_seconds[key(knobs)])

    def best_samples_per_second(self, knobs) -> float:
        """Effective batch / fastest timed step (CPU seconds)."""
        return self.batch_size / min(self.step_seconds[key(knobs)])

    def peak(self, knobs) -> int:
        from autofit.executor import run_plan

        model = copy.deepcopy(self.base)
        result = run_plan(model, hand_plan(model, knobs, self.data, batch_size=self.batch_size), self.data,
                          epochs=1, max_steps=3, measure_memory=True, quiet=True)
        return result.measured_peak_bytes


def main(quick: bool = False) -> dict:
    warnings.filterwarnings("ignore")
    with torch_threads(THREADS):
        return _main(quick)


def _main(quick: bool, *, rounds: int | None = None, steps: int | None = None, grid_limit: int | None = None,
          policies: tuple[str, ...] | None = None) -> dict:
    """The keyword arguments shrink the mode's sizes (smoke tests): rounds, timed steps per run, the first
    `grid_limit` grid points, the policies planned for."""
    from autofit.api import make_workload, plan_from_profile, target_device
    from autofit.cost import predict_time
    from autofit.knobs import Knobs
    from autofit.memory import predict_peak
    from autofit.profiler import profile_model
    from autofit.profiler.profile import PRECISIONS
    from autofit.search import NoPlanFitsError, exhaustive_best

    started = time.perf_counter()
    rounds, steps = rounds or (2 if quick else 3), steps or (2 if quick else 3)
    policies = policies or POLICIES
    base = small_bert(layers=LAYERS, vocab=VOCAB, max_len=SEQ)
    data = token_data([SEQ] * (EFFECTIVE_BATCH * (1 + steps)), vocab=VOCAB)
    device = target_device("cpu")
    workload = make_workload("classification", seq_len=SEQ, batch_size=EFFECTIVE_BATCH, lengths=data.lengths)
    hist = workload.lengths
    t = time.perf_counter()
    profile = profile_model(base, task="classification", timing=PRECISIONS)
    profile_seconds = time.perf_counter() - t
    no_fp16 = without_timing(profile, "fp16")

    full_grid = list(grid(quick=False))
    budgets = choose_budgets([predict_peak(profile, k, workload, device).peak_bytes for k in full_grid], quick)
    configs = list(grid(quick))[:grid_limit]
    safe = Knobs(**SAFE_DEFAULT)
    predicted = {key(k): (predict_peak(profile, k, workload, device), predict_time(profile, k, workload, device))
                 for k in [*configs, safe]}

    # autofit's choices
    t = time.perf_counter()
    chosen: dict[tuple[int, str], object] = {}
    for budget, policy in itertools.product(budgets, policies):
        try:
            chosen[budget, policy] = plan_from_profile(profile, workload, budget, device, policy_named(policy))
        except NoPlanFitsError as error:
            chosen[budget, policy] = error
    no_fp16_plans = {b: plan_from_profile(no_fp16, workload, b, device, "balanced") for b in budgets}
    search_seconds = time.perf_counter() - t

    # measure: every grid config and every chosen plan, interleaved over rounds (order reversed each round)
    bench = Bench(base, data, steps)
    # grid points that fit no budget are never a "best": not measured (the loose budget admits all)
    grid_total = len(configs)
    configs = [k for k in configs if predicted[key(k)][0].peak_bytes <= max(budgets)]
    to_measure = {key(k): k for k in configs}
    for plan in chosen.values():
        if not isinstance(plan, Exception):
            to_measure.setdefault(key(plan.knobs), plan.knobs)
    bench.measure(safe)  # warm-up (imports, bitsandbytes probe, allocator); its steps are kept too
    order = list(to_measure.values())
    for r in range(rounds):
        for k in (order if r % 2 == 0 else order[::-1]):
            bench.measure(k)
    peaks = {key(p.knobs): bench.peak(p.knobs) for p in chosen.values() if not isinstance(p, Exception)}
    safe_sps = bench.samples_per_second(safe)

    grid_rows = [{"knobs": describe(k, hist), "predicted_peak_mib": predicted[key(k)][0].peak_bytes / MIB,
                  "predicted_samples_per_second": predicted[key(k)][1].samples_per_second,
                  "measured_samples_per_second": bench.samples_per_second(k),
                  "measured_best_step_samples_per_second": bench.best_samples_per_second(k),
                  "measured_wall_samples_per_second": bench.wall_samples_per_second(k),
                  "timed_steps": len(bench.step_seconds[key(k)])} for k in configs]
    budget_rows = []
    for budget in budgets:
        fits = [k for k in configs if predicted[key(k)][0].peak_bytes <= budget]
        best = max(fits, key=bench.samples_per_second) if fits else None
        by_prediction = max(fits, key=lambda k: predicted[key(k)][1].samples_per_second) if fits else None
        row = {"budget_bytes": budget, "budget_mib": budget / MIB, "grid_feasible": len(fits),
               "grid_size": grid_total, "safe_default_fits": predicted[key(safe)][0].peak_bytes <= budget,
               "grid_best": describe(best, hist) if best else None,
               "grid_best_samples_per_second": bench.samples_per_second(best) if best else None,
               "grid_predicted_best": describe(by_prediction, hist) if by_prediction else None,
               "grid_predicted_best_ratio": (bench.samples_per_second(by_prediction) / bench.samples_per_second(best))
               if best else None,
               "policies": {}}
        for policy in policies:
            plan = chosen[budget, policy]
            if isinstance(plan, Exception):
                row["policies"][policy] = {"error": str(plan)}
                continue
            headroom = policy_named(policy).headroom.for_budget(budget)
            fits_headroom = [k for k in fits if predicted[key(k)][0].peak_bytes <= budget - headroom]
            best_h = max(fits_headroom, key=bench.samples_per_second) if fits_headroom else None
            sps = bench.samples_per_second(plan.knobs)
            measured_peak = peaks[key(plan.knobs)]
            reference = exhaustive_best(profile, workload, device, budget, policy_named(policy))
            row["policies"][policy] = {
                "knobs": describe(plan.knobs, hist), "freezes": plan.knobs.freeze_embeddings or plan.knobs.freeze_layers > 0,
                "frozen_layers": plan.knobs.freeze_layers, "predicted_peak_mib": plan.predicted.peak_bytes / MIB,
                "measured_peak_mib": measured_peak / MIB, "peak_exceeds_budget": measured_peak > budget,
                "predicted_samples_per_second": plan.time.samples_per_second,
                "measured_samples_per_second": sps,
                "measured_wall_samples_per_second": bench.wall_samples_per_second(plan.knobs),
                "ratio_vs_grid_best": sps / bench.samples_per_second(best) if best else None,
                "ratio_vs_grid_best_within_headroom": sps / bench.samples_per_second(best_h) if best_h else None,
                "speedup_vs_safe_default": sps / safe_sps,
                "ratio_vs_grid_best_by_fastest_step": bench.best_samples_per_second(plan.knobs)
                / max(bench.best_samples_per_second(k) for k in fits) if fits else None,
                # the search against brute force over the policy's whole space, both by PREDICTED time:
                # 1.0 means Optuna found the cost model's optimum, so any shortfall is the cost model's
                "exhaustive_predicted_best": describe(reference.knobs, hist) if reference else None,
                "search_vs_exhaustive_predicted": (reference.epoch_seconds / plan.time.epoch_seconds)
                if reference else None,
            }
        p = no_fp16_plans[budget]
        row["balanced_from_profile_without_fp16_timing"] = {
            "knobs": describe(p.knobs, hist), "predicted_samples_per_second": p.time.samples_per_second,
            "same_knobs_predicted_with_fp16_timed": predict_time(profile, p.knobs, workload, device).samples_per_second,
            "estimated_from_flops": not p.time.measured}
        budget_rows.append(row)

    measured = [r["measured_samples_per_second"] for r in grid_rows]
    predicted_sps = [r["predicted_samples_per_second"] for r in grid_rows]
    payload = {
        "benchmark": "plan_quality", "quick": quick, **machine_info(THREADS, "benchmarks.plan_quality", quick),
        "setup": {"model": f"BertForSequenceClassification hidden 128, {LAYERS} layers, vocab {VOCAB}, sdpa",
                  "seq_len": SEQ, "effective_batch": EFFECTIVE_BATCH, "device": "cpu (target_device('cpu'))",
                  "profile_timing": list(PRECISIONS), "profile_seconds": profile_seconds,
                  "search_seconds_all_plans": search_seconds, "rounds": rounds,
                  "timed_steps_per_run": steps,
                  "throughput": "effective batch / median step in process CPU seconds (one torch thread; "
                                "wall time in the *_wall_* fields), steps after a warm-up step, rounds pooled",
                  "safe_default": describe(safe, hist), "safe_default_samples_per_second": safe_sps},
        "summary": _summary(budget_rows, policies),
        "budgets": budget_rows,
        "grid": grid_rows,
        "grid_points_fitting_no_budget_not_measured": grid_total - len(configs),
        "cost_model_rank_correlation": spearman(predicted_sps, measured),
        "seconds": time.perf_counter() - started,
    }
    path = write_result("plan_quality_quick" if quick else "plan_quality", payload)
    _print_table(payload, path)
    return payload


def _summary(budget_rows: list[dict], policies: tuple[str, ...] = POLICIES) -> dict:
    """Per policy: chosen / grid-best measured throughput and speed-up over the safe default, by budget."""
    out = {}
    for policy in policies:
        rows = [(r["budget_mib"], r["policies"][policy]) for r in budget_rows]
        ok = [(b, p) for b, p in rows if "error" not in p]
        out[policy] = {
            "ratio_vs_grid_best": {f"{b:.2f}MiB": p["ratio_vs_grid_best"] for b, p in ok},
            "ratio_vs_grid_best_within_headroom": {f"{b:.2f}MiB": p["ratio_vs_grid_best_within_headroom"]
                                                   for b, p in ok},
            "speedup_vs_safe_default": {f"{b:.2f}MiB": p["speedup_vs_safe_default"] for b, p in ok},
            "search_vs_exhaustive_predicted": {f"{b:.2f}MiB": p["search_vs_exhaustive_predicted"] for b, p in ok},
            "freezes": any(p["freezes"] for _, p in ok),
            "any_measured_peak_over_budget": any(p["peak_exceeds_budget"] for _, p in ok),
            "no_plan": [f"{b:.2f}MiB" for b, p in rows if "error" in p],
        }
    return out


def _print_table(payload: dict, path: Path) -> None:
    s = payload["setup"]
    W = 40  # width of a knobs label
    print(f"plan quality: {s['model']}, seq {s['seq_len']}, effective batch {s['effective_batch']}; "
          f"safe default {s['safe_default']} = {s['safe_default_samples_per_second']:.1f} samples/s")
    print(f"{'budget':>9} {'grid':>6}  {'grid best (measured)':<{W}}{'s/s':>6}   {'policy':<18}"
          f"{'chosen':<{W}}{'s/s':>6}{'/best':>7}{'/best_h':>8}{'vs safe':>8}"
          f"{'peak/budget':>12}{'search':>8}")
    for row in payload["budgets"]:
        first = True
        for policy, r in row["policies"].items():
            head = (f"{row['budget_mib']:>6.2f}MiB {row['grid_feasible']:>3}/{row['grid_size']:<3} "
                    f"{row['grid_best'] or '-':<{W}}{row['grid_best_samples_per_second'] or 0:>6.1f}") if first \
                else " " * (24 + W)
            first = False
            if "error" in r:
                print(f"{head}   {policy:<18}{r['error'][:60]}")
                continue
            ratio = f"{r['ratio_vs_grid_best']:.2f}" if r["ratio_vs_grid_best"] is not None else "-"
            ratio_h = f"{r['ratio_vs_grid_best_within_headroom']:.2f}" \
                if r["ratio_vs_grid_best_within_headroom"] is not None else "-"
            print(f"{head}   {policy:<18}{r['knobs']:<{W}}{r['measured_samples_per_second']:>6.1f}{ratio:>7}{ratio_h:>8}"
                  f"{r['speedup_vs_safe_default']:>7.2f}x{r['measured_peak_mib'] / row['budget_mib']:>12.2f}"
                  f"{r['search_vs_exhaustive_predicted'] or 0:>8.2f}")
        nf = row["balanced_from_profile_without_fp16_timing"]
        print(f"{'':>{24 + W}}   (profile without fp16 timing -> balanced picks {nf['knobs']}: predicted "
              f"{nf['predicted_samples_per_second']:.0f} s/s, {nf['same_knobs_predicted_with_fp16_timed']:.0f} "
              f"with fp16 timed)")
        if row["grid_predicted_best"] is not None:
            print(f"{'':>{24 + W}}   grid best by prediction: {row['grid_predicted_best']} "
                  f"({row['grid_predicted_best_ratio']:.2f} of measured best)")
    for policy, r in payload["summary"].items():
        ratios = ", ".join(f"{v:.2f}" if v is not None else "-" for v in r["ratio_vs_grid_best"].values())
        ratios += " (within headroom: " + ", ".join(
            f"{v:.2f}" if v is not None else "-" for v in r["ratio_vs_grid_best_within_headroom"].values()) + ")"
        speedups = ", ".join(f"{v:.2f}x" for v in r["speedup_vs_safe_default"].values())
        print(f"{policy:<18} chosen/grid-best by budget: {ratios}; vs safe default: {speedups}; "
              f"freezes: {r['freezes']}; measured peak over budget: {r['any_measured_peak_over_budget']}")
    print("columns: s/s = measured samples per CPU second (median step); /best = chosen / measured best grid "
          "point that fits; /best_h = the same among points that fit budget - the policy's headroom; "
          "search = predicted time of the brute-force optimum / of the chosen plan (1.00: the search found "
          "the cost model's optimum)")
    print(f"cost model: Spearman rank correlation predicted vs measured over the grid "
          f"{payload['cost_model_rank_correlation']}")
    print(f"took {payload['seconds']:.0f} s; wrote {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 budgets, a 24-point grid, two short rounds")
    main(quick=parser.parse_args().quick)
