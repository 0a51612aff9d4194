"""Padding efficiency and throughput: fixed max-length padding vs dynamic padding vs length bucketing.

A skewed, realistic length distribution (lognormal: most examples short, a long tail clipped at 256
tokens) trains a small BERT (built from a config, random weights) on the CPU through autofit's own
executor (`run_plan`). Every optimizer step trains the same number of examples (the effective batch,
`Plan.batch_size`), drawn by autofit's StepSampler and cut into micro-batches under the knobs' caps
(`accumulation.cut_step`: a step's examples sorted by length, then cut bucket by bucket). Each variant
differs only in its batching knobs:

- fixed       every micro-batch padded to 256 (`pad_to_multiple_of=256`: what `padding="max_length"` does)
- dynamic     each micro-batch padded to its own longest example, rounded up to 8 (`bucket_boundaries=()`)
- bucket4     4 equal-count length buckets (`choose_boundaries`), steps drawn within a bucket
- bucket8+tok 8 buckets plus a token budget per micro-batch (long buckets take more, smaller
              micro-batches), the way autofit's search sets it: max(micro_batch x first boundary, last boundary)

Two step shapes are run:

- `variants` (the headline): steps of 16 examples, micro-batches of at most 16. A step is one
  micro-batch, except where the token budget cuts a long bucket's step into several; so fixed, dynamic
  and bucket4 run the same micro-batch shapes as this benchmark did when a step was one micro-batch.
- `cut_variants`: steps of 64 examples cut into micro-batches of at most 16 (4 or more per step). Here
  dynamic padding benefits from the sort before the cut: each micro-batch holds neighbouring lengths of
  its step, so its efficiency is higher than the unsorted random micro-batches of `variants`.

Reported per variant: padding efficiency (real tokens / computed tokens, as the executor counted them;
the prediction is `accumulation.padding_efficiency(knobs, hist, batch_size)`), optimizer steps,
micro-batches, and throughput in real tokens per wall-clock second and per CPU second of this process
(steadier on a shared machine), each as a ratio to fixed padding at the same step shape. The variants
run interleaved (fixed, dynamic, ..., fixed, dynamic, ...) and the medians are kept, since this machine
is shared and noisy.

    python -m benchmarks.padding [--quick]
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import machine_info, torch_threads, write_result

MAX_LEN = 256
VOCAB = 1000
THREADS = 1
"""One intra-op thread: the machine is shared with other jobs, and one thread keeps timings steadier."""


# ---- shared with benchmarks/overhead.py and benchmarks/plan_quality.py ------------------------------

class StepClock:
    """Wall-clock and process-CPU time at every optimizer step of any optimizer (a global post-step hook),
    so every training loop is timed the same way. CPU time (all threads of this process) is the steadier
    clock on a shared machine: other jobs stretch wall time, much less the work this process does."""

    def __enter__(self) -> StepClock:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.wall, self.cpu = [time.perf_counter()], [time.process_time()]
        self._handle = register_optimizer_step_post_hook(self._tick)
        return self

    def _tick(self, *_) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self.end = {"wall": time.perf_counter(), "cpu": time.process_time()}

    @property
    def steps(self) -> int:
        return len(self.wall) - 1

    def total(self, clock: str) -> float:
        """Seconds from entering to leaving (setup included)."""
        return self.end[clock] - getattr(self, clock)[0]

    def steady(self, clock: str) -> list[float]:
        """Intervals between consecutive optimizer steps; the first step (setup, warm-up) is left out."""
        marks = getattr(self, clock)[1:]
        return [b - a for a, b in zip(marks, marks[1:])]


def skewed_lengths(n: int, *, median: float = 48.0, sigma: float = 0.75, lo: int = 8, hi: int = MAX_LEN,
                   seed: int = 0) -> list[int]:
    """Lognormal token lengths clipped to [lo, hi]: most short, a long tail (a few at the maximum)."""
    rng = np.random.default_rng(seed)
    raw = rng.lognormal(mean=math.log(median), sigma=sigma, size=n)
    lengths = np.clip(np.round(raw), lo, hi).astype(int).tolist()
    lengths[int(rng.integers(n))] = hi  # the tail reaches the model's maximum
    return lengths


def token_data(lengths: list[int], *, vocab: int = VOCAB, seed: int = 0):
    """Classification examples of the given lengths (random ids, never the pad id 0)."""
    from autofit.data import TokenizedData

    rng = np.random.default_rng(seed + 1)
    ids = [rng.integers(3, vocab, size=n).tolist() for n in lengths]
    labels = [int(7 in row) for row in ids]
    return TokenizedData(task="classification", input_ids=ids, labels=labels, num_labels=2)


def small_bert(*, layers: int = 2, hidden: int = 128, vocab: int = VOCAB, max_len: int = MAX_LEN,
               attn: str = "sdpa", seed: int = 0):
    from transformers import AutoModelForSequenceClassification, BertConfig

    torch.manual_seed(seed)
    config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=4 * hidden, vocab_size=vocab, max_position_embeddings=max_len,
                        num_labels=2, pad_token_id=0)
    config._attn_implementation = attn
    return AutoModelForSequenceClassification.from_config(config).float()


def hand_plan(model, knobs, data, *, batch_size: int, budget_bytes: int = 1 << 34):
    """A Plan with the given knobs and effective batch (`batch_size` examples per optimizer step) around a
    placeholder memory prediction (the executor only compares it)."""
    from autofit.api import make_workload
    from autofit.devices import get_device
    from autofit.layers import find_layout
    from autofit.plan import MemoryBreakdown, Plan, TimePrediction

    workload = make_workload("classification", seq_len=max(data.lengths), batch_size=batch_size,
                             lengths=data.lengths)
    return Plan(
        model_id=f"bench-{model.config.model_type}", model_type=model.config.model_type,
        num_layers=find_layout(model).num_layers, num_params=sum(p.numel() for p in model.parameters()),
        task="classification", budget_bytes=budget_bytes, device=get_device("cpu"), policy="hand",
        headroom_bytes=0, knobs=knobs,
        predicted=MemoryBreakdown(weights=0, gradients=0, optimizer_state=0, activations=0, temporaries=0,
                                  overhead=0, peak_phase="backward"),
        time=TimePrediction(step_seconds=0.0, epoch_seconds=0.0, samples_per_second=0.0),
        workload=workload,
    )


# ---- the benchmark --------------------------------------------------------------------------------------

MICRO_BATCH = 16
"""Most sequences per micro-batch in every variant (the token budget lowers it for long buckets)."""
SHAPES = {"variants": 16, "cut_variants": 64}
"""Result key -> effective batch (examples per optimizer step). 16: a step is one micro-batch of at most
16 (the headline, as before steps were made of examples); 64: every step is cut into micro-batches."""


def variants(lengths: list[int], micro_batch: int) -> dict:
    from autofit.knobs import Knobs
    from autofit.techniques.bucketing import choose_boundaries
    from autofit.workload import LengthHistogram

    hist = LengthHistogram.from_lengths(lengths)
    b4 = choose_boundaries(hist, 4, multiple=8)
    b8 = choose_boundaries(hist, 8, multiple=8)
    common = dict(micro_batch_size=micro_batch)
    return {
        "fixed": Knobs(**common, pad_to_multiple_of=MAX_LEN),
        "dynamic": Knobs(**common, bucket_boundaries=(), pad_to_multiple_of=8),
        "bucket4": Knobs(**common, bucket_boundaries=b4, pad_to_multiple_of=8),
        "bucket8+tok": Knobs(**common, bucket_boundaries=b8, pad_to_multiple_of=8,
                             tokens_per_micro_batch=max(micro_batch * b8[0], b8[-1])),
    }


def epoch_pieces(lengths: list[int], knobs, batch_size: int, *, seed: int = 0) -> list[list[list[int]]]:
    """Epoch 0's steps as the executor runs them (run_plan's sampler and cut, seed `seed`): a list of steps,
    each a list of micro-batches of example indices."""
    from autofit.techniques.accumulation import StepSampler, bucket_uppers, cut_step

    uppers, exact = bucket_uppers(lengths, knobs)
    steps = StepSampler(len(lengths), batch_size, seed=seed).epoch_steps(0)
    return [cut_step(step, lengths, knobs, uppers, exact) for step in steps]


def counted_padding_efficiency(lengths: list[int], knobs, batch_size: int, *, seed: int = 0) -> float:
    """Real / computed tokens of epoch 0's micro-batches, counted from the sampler and cut alone (no model):
    what the executor's count must equal."""
    from autofit.techniques.bucketing import padded_length

    real = computed = 0
    for step in epoch_pieces(lengths, knobs, batch_size, seed=seed):
        for piece in step:
            real += sum(lengths[i] for i in piece)
            computed += len(piece) * padded_length(max(lengths[i] for i in piece), knobs.pad_to_multiple_of)
    return real / computed


def run_variant(base_model, knobs, data, *, batch_size: int, max_steps: int | None = None) -> dict:
    from autofit.executor import run_plan

    model = copy.deepcopy(base_model)
    plan = hand_plan(model, knobs, data, batch_size=batch_size)
    with StepClock() as clock:
        result = run_plan(model, plan, data, epochs=1, max_steps=max_steps, measure_memory=False, quiet=True)
    train_seconds = sum(r.seconds for r in result.history)
    real = result.tokens_per_second * train_seconds  # the executor's count of non-pad tokens
    wall, cpu = clock.total("wall"), clock.total("cpu")
    return {"wall_seconds": wall, "cpu_seconds": cpu, "real_tokens": round(real),
            "padding_efficiency": result.padding_efficiency, "steps": result.optimizer_steps,
            "micro_batches": sum(r.micro_batches for r in result.history),
            "samples": sum(r.samples for r in result.history),
            "tokens_per_second": real / wall, "tokens_per_cpu_second": real / cpu,
            "executor_tokens_per_second": result.tokens_per_second}


def main(quick: bool = False) -> dict:
    warnings.filterwarnings("ignore")
    with torch_threads(THREADS):
        return _main(quick)


def _main(quick: bool, *, n: int | None = None, rounds: int | None = None) -> dict:
    """`n` and `rounds` override the mode's sizes (smoke tests)."""
    from autofit.techniques.accumulation import padding_efficiency, step_layout
    from autofit.workload import LengthHistogram

    n = n or (128 if quick else 512)
    rounds = rounds or (2 if quick else 3)
    lengths = skewed_lengths(n)
    data = token_data(lengths)
    base = small_bert()
    knobs = variants(lengths, MICRO_BATCH)
    hist = LengthHistogram.from_lengths(lengths)
    started = time.perf_counter()
    run_variant(base, knobs["dynamic"], data, batch_size=SHAPES["variants"], max_steps=2)  # warm-up
    runs: dict[tuple[str, str], list[dict]] = {(shape, name): [] for shape in SHAPES for name in knobs}
    for _ in range(rounds):  # interleaved: A, B, C, D, A', B', C', D', A, B, ...
        for shape, batch in SHAPES.items():
            for name, k in knobs.items():
                runs[shape, name].append(run_variant(base, k, data, batch_size=batch))
    tables: dict[str, dict] = {}
    for shape, batch in SHAPES.items():
        fixed = runs[shape, "fixed"]
        fixed_tps = statistics.median(r["tokens_per_second"] for r in fixed)
        rows = {}
        for name, k in knobs.items():
            rs = runs[shape, name]
            tps = statistics.median(r["tokens_per_second"] for r in rs)

            def ratio(field: str) -> float:
                """Per round (against the fixed run of the same round and step shape), then the median."""
                return statistics.median(r[field] / f[field] for r, f in zip(rs, fixed))

            per_step = step_layout(k, hist, batch).micro_batches_per_step
            rows[name] = {
                "knobs": {"micro_batch_size": k.micro_batch_size, "pad_to_multiple_of": k.pad_to_multiple_of,
                          "bucket_boundaries": list(k.bucket_boundaries),
                          "tokens_per_micro_batch": k.tokens_per_micro_batch},
                "batch_size": batch,
                "padding_efficiency": rs[0]["padding_efficiency"],
                "predicted_padding_efficiency": padding_efficiency(k, hist, batch),
                "counted_padding_efficiency": counted_padding_efficiency(lengths, k, batch),
                "optimizer_steps": rs[0]["steps"],
                "micro_batches": rs[0]["micro_batches"],
                "micro_batches_per_full_step": list(per_step),
                "real_tokens_per_second": tps,
                "real_tokens_per_cpu_second": statistics.median(r["tokens_per_cpu_second"] for r in rs),
                "throughput_ratio_vs_fixed": ratio("tokens_per_second"),
                "cpu_throughput_ratio_vs_fixed": ratio("tokens_per_cpu_second"),
                "throughput_ratio_of_medians": tps / fixed_tps,
                "wall_seconds": [r["wall_seconds"] for r in rs],
                "cpu_seconds": [r["cpu_seconds"] for r in rs],
            }
        tables[shape] = rows
    payload = {
        "benchmark": "padding", "quick": quick, **machine_info(THREADS, "benchmarks.padding", quick),
        "setup": {"model": "BertForSequenceClassification hidden 128, 2 layers, 2 heads, vocab 1000, sdpa, fp32",
                  "examples": n, "length_distribution": "lognormal(median 48, sigma 0.75) clipped to [8, 256]",
                  "length_stats": {"mean": statistics.mean(lengths), "median": statistics.median(lengths),
                                   "p90": float(np.percentile(lengths, 90)), "max": max(lengths)},
                  "micro_batch": MICRO_BATCH, "batch_size": SHAPES["variants"],
                  "cut_batch_size": SHAPES["cut_variants"],
                  "steps": "StepSampler(seed 0) steps of batch_size examples, each sorted by length and cut into "
                           "micro-batches under the caps (accumulation.cut_step), as run_plan does",
                  "epochs": 1, "rounds": rounds,
                  "executor": "autofit.executor.run_plan(measure_memory=False)", "device": "cpu"},
        **tables, "seconds": time.perf_counter() - started,
    }
    path = write_result("padding_quick" if quick else "padding", payload)
    _print_table(payload, path)
    return payload


def _print_table(payload: dict, path: Path) -> None:
    setup = payload["setup"]
    s = setup["length_stats"]
    print(f"padding benchmark: {setup['examples']} examples, lengths mean {s['mean']:.1f}, median {s['median']}, "
          f"p90 {s['p90']:.0f}, max {s['max']}; micro-batches of at most {setup['micro_batch']}; medians of "
          f"{setup['rounds']} interleaved rounds")
    for shape, batch in SHAPES.items():
        print(f"\nsteps of {batch} examples ({shape}):")
        print(f"{'variant':<13}{'pad eff':>9}{'(pred)':>8}{'steps':>7}{'micro':>7}{'real tok/s':>12}{'vs fixed':>10}"
              f"{'tok/cpu-s':>11}{'vs fixed':>10}")
        for name, r in payload[shape].items():
            print(f"{name:<13}{r['padding_efficiency']:>9.3f}{r['predicted_padding_efficiency']:>8.3f}"
                  f"{r['optimizer_steps']:>7}{r['micro_batches']:>7}{r['real_tokens_per_second']:>12,.0f}"
                  f"{r['throughput_ratio_vs_fixed']:>9.2f}x{r['real_tokens_per_cpu_second']:>11,.0f}"
                  f"{r['cpu_throughput_ratio_vs_fixed']:>9.2f}x")
    random16, sorted64 = payload["variants"]["dynamic"], payload["cut_variants"]["dynamic"]
    print(f"\ndynamic padding: {random16['padding_efficiency']:.3f} with random micro-batches of "
          f"{setup['micro_batch']} (steps of {setup['batch_size']}), {sorted64['padding_efficiency']:.3f} with steps of "
          f"{setup['cut_batch_size']} sorted by length before the cut")
    print(f"took {payload['seconds']:.0f} s; wrote {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data, two rounds (about a minute)")
    main(quick=parser.parse_args().quick)
