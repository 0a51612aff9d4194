"""Executor overhead: autofit's `run_plan` vs a minimal hand-written PyTorch loop vs `transformers.Trainer`.

All three train the same model (one init, deep-copied), on the same optimizer steps made of the same
micro-batches in the same order, with the same settings: fp32, no checkpointing, no freezing, dynamic
padding to a multiple of 8, steps of 16 examples (the plan's effective batch) cut into micro-batches of
at most 8 (so 2 per step), AdamW (foreach, lr 2e-5, weight decay 0.01 on matrices only), constant
learning rate, gradient clipping at 1.0, no evaluation, no saving, memory measurement off. The steps are
the ones autofit's executor trains for seed 0: `StepSampler(len(lengths), 16, seed=0).epoch_steps(0)`,
each cut by `accumulation.cut_step` (its examples sorted by length, then cut under the micro-batch cap);
the hand loop and the Trainer are given exactly those micro-batches.

- hand     the loop a person writes: collate, forward, scale, backward; clip, step, zero_grad
- autofit  `run_plan(model, plan, data, measure_memory=False, quiet=True)`
- trainer  `Trainer(args=plan.to_training_arguments(use_cpu=True, ...))` (per-device batch = the
           micro-batch cap 8, gradient accumulation ceil(16 / 8) = 2) with a sequential sampler over the
           steps' micro-batches laid end to end (every micro-batch holds exactly 8 examples, checked, so
           the Trainer's consecutive batches of 8 are the same micro-batches), a padding collator and
           AdamW(foreach=True) via `optimizer_cls_and_kwargs` (its own `adamw_torch` would take torch's
           CPU default, foreach off)

Two numbers per run, each on the wall clock and on this process's CPU time (the steadier clock on a
shared machine, and the headline): end-to-end real tokens per second (setup included), and the
steady-state step time (median interval between consecutive optimizer steps, from a global optimizer
step hook, the same for all three). On a shared machine a few percent is within the noise of those,
so the same rounds are repeated on a 1-layer, 16-wide BERT whose compute is ~0: what separates the
loops there is each one's own overhead (setup and per-step Python), which is then set against the real
model's hand-loop time to give the throughput ratio that overhead implies (the robust check).

The three run interleaved, the order rotated each round (hand, autofit, trainer; autofit, trainer,
hand; ...) so none always follows the same one; ratios are per round, then the median. A sanity check
compares the hand loop's trained weights with autofit's (identical up to float rounding) and the
Trainer's (these differ by its own dropout draws: with dropout off they agree to ~1e-8, so it trains the
same steps).

    python -m benchmarks.overhead [--quick] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import io
import pstats
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from autofit.intmath import ceil_div, round_up
from benchmarks._common import machine_info, torch_threads, write_result
from benchmarks.padding import StepClock, epoch_pieces, hand_plan, skewed_lengths, small_bert, token_data

THREADS = 1
LR, WEIGHT_DECAY, MAX_GRAD_NORM, PAD_MULTIPLE = 2e-5, 0.01, 1.0, 8
BATCH, MICRO_BATCH = 16, 8
"""Examples per optimizer step (the plan's effective batch) and the micro-batch cap: 2 micro-batches a step."""
KINDS = ("hand", "autofit", "trainer")


def collate(features: list[dict]) -> dict[str, torch.Tensor]:
    """A minimal DataCollatorWithPadding: right-pad to the batch's longest, rounded up to a multiple of 8."""
    longest = max(len(f["input_ids"]) for f in features)
    width = round_up(longest, PAD_MULTIPLE)
    ids = torch.zeros((len(features), width), dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([f["labels"] for f in features])}


def param_groups(model: torch.nn.Module) -> list[dict]:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]


def check_trainer_alignment(windows: list[list[list[int]]], micro_batch: int, batch_size: int) -> None:
    """The Trainer batches the flattened example order `micro_batch` at a time, ceil(batch / micro) batches
    a step: it trains the same micro-batches and steps only when every step is full and every micro-batch
    holds exactly `micro_batch` examples. Raise ValueError otherwise (a benchmark setup error)."""
    per_step = ceil_div(batch_size, micro_batch)
    for number, window in enumerate(windows):
        sizes = [len(batch) for batch in window]
        if sum(sizes) != batch_size or len(window) != per_step or any(size != micro_batch for size in sizes):
            raise ValueError(f"step {number} has micro-batches of {sizes}: the Trainer would batch it otherwise "
                             f"(need {per_step} of {micro_batch} in every step)")


def hand_loop(model, data, windows) -> None:
    from transformers import set_seed

    model.train()
    optimizer = torch.optim.AdamW(param_groups(model), lr=LR, foreach=True)
    set_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    for window in windows:
        batches = [collate([data.example(i) for i in batch]) for batch in window]
        total = sum(len(b["labels"]) for b in batches)
        for batch in batches:
            loss = model(**batch).loss * (len(batch["labels"]) / total)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def autofit_loop(model, data, plan, steps: int) -> None:
    from autofit.executor import run_plan

    run_plan(model, plan, data, epochs=1, max_steps=steps, lr=LR, weight_decay=WEIGHT_DECAY,
             max_grad_norm=MAX_GRAD_NORM,
             measure_memory=False, quiet=True, seed=0)


def make_trainer(model, data, windows, plan, output_dir: str):
    from transformers import Trainer

    flat = [data.example(i) for window in windows for batch in window for i in batch]
    args = plan.to_training_arguments(
        output_dir=output_dir, use_cpu=True, save_strategy="no", eval_strategy="no", logging_strategy="no",
        report_to=[], disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False,
        learning_rate=LR, weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM, lr_scheduler_type="constant",
        warmup_steps=0, num_train_epochs=1, seed=0, train_sampling_strategy="sequential",
        remove_unused_columns=False)
    shape = (args.per_device_train_batch_size, args.gradient_accumulation_steps)
    if shape != (len(windows[0][0]), len(windows[0])):
        raise ValueError(f"to_training_arguments gives micro-batches x accumulation {shape}, the executor's steps "
                         f"{len(windows[0][0])} x {len(windows[0])}: the Trainer would train other steps")
    return Trainer(model=model, args=args, train_dataset=flat, data_collator=collate,
                   optimizer_cls_and_kwargs=(torch.optim.AdamW, {"lr": LR, "foreach": True}))


def run_one(kind: str, base, data, windows, plan, tmp: str) -> dict:
    model = copy.deepcopy(base)
    setup = 0.0
    if kind == "trainer":
        start = time.perf_counter()
        trainer = make_trainer(model, data, windows, plan, tmp)
        setup = time.perf_counter() - start
    with StepClock() as clock:
        if kind == "hand":
            hand_loop(model, data, windows)
        elif kind == "autofit":
            autofit_loop(model, data, plan, len(windows))
        else:
            with contextlib.redirect_stdout(io.StringIO()):  # its end-of-training metrics line
                trainer.train()
    assert clock.steps == len(windows), f"{kind} ran {clock.steps} optimizer steps, expected {len(windows)}"
    return {"wall_seconds": clock.total("wall"), "cpu_seconds": clock.total("cpu"), "trainer_init_seconds": setup,
            "steady_step_seconds": statistics.median(clock.steady("wall")),
            "steady_step_cpu_seconds": statistics.median(clock.steady("cpu")), "model": model}


def main(quick: bool = False, profile: bool = False) -> dict:
    warnings.filterwarnings("ignore")
    with torch_threads(THREADS):
        return _main(quick, profile)


def _main(quick: bool, profile: bool, *, n: int | None = None, rounds: int | None = None,
          micro_rounds: int = 6) -> dict:
    """`n`, `rounds` and `micro_rounds` override the mode's sizes (smoke tests)."""
    from autofit.knobs import Knobs

    n = n or (160 if quick else 768)
    rounds = rounds or (3 if quick else 6)
    # micro_rounds: cheap, the 1-layer model's runs take milliseconds of compute
    lengths = skewed_lengths(n, hi=256)
    data = token_data(lengths)
    base = small_bert()
    knobs = Knobs(micro_batch_size=MICRO_BATCH, pad_to_multiple_of=PAD_MULTIPLE)
    plan = hand_plan(base, knobs, data, batch_size=BATCH)
    windows = epoch_pieces(lengths, knobs, BATCH)  # the executor's steps for seed 0
    check_trainer_alignment(windows, MICRO_BATCH, BATCH)
    real_tokens = sum(lengths)
    started = time.perf_counter()
    micro = small_bert(layers=1, hidden=16)  # compute ~0: what is left is each loop's own overhead
    with tempfile.TemporaryDirectory() as tmp:
        runs = _rounds(base, data, windows, plan, rounds, tmp)
        micro_plan = hand_plan(micro, knobs, data, batch_size=BATCH)
        micro_runs = _rounds(micro, data, windows, micro_plan, micro_rounds, tmp)
    hand_model = runs["hand"][0].pop("_model")
    same = _max_weight_difference(hand_model, runs["autofit"][0].pop("_model"))
    same_trainer = _max_weight_difference(hand_model, runs["trainer"][0].pop("_model"))
    for rs in micro_runs.values():
        rs[0].pop("_model", None)

    def ratio(kind: str, field: str, invert: bool) -> float:
        per_round = [(h[field] / r[field]) if invert else (r[field] / h[field])
                     for r, h in zip(runs[kind], runs["hand"])]
        return statistics.median(per_round)

    rows = {}
    for kind in KINDS:
        rs = runs[kind]
        rows[kind] = {
            "tokens_per_second": statistics.median(real_tokens / r["wall_seconds"] for r in rs),
            "tokens_per_cpu_second": statistics.median(real_tokens / r["cpu_seconds"] for r in rs),
            "steady_step_seconds": statistics.median(r["steady_step_seconds"] for r in rs),
            "steady_step_cpu_seconds": statistics.median(r["steady_step_cpu_seconds"] for r in rs),
            "ratio_vs_hand_end_to_end": ratio(kind, "wall_seconds", invert=True),
            "ratio_vs_hand_end_to_end_cpu": ratio(kind, "cpu_seconds", invert=True),
            "ratio_vs_hand_steady_state": ratio(kind, "steady_step_seconds", invert=True),
            "ratio_vs_hand_steady_state_cpu": ratio(kind, "steady_step_cpu_seconds", invert=True),
            "ratio_vs_hand_best_runs": min(h["wall_seconds"] for h in runs["hand"])
            / min(r["wall_seconds"] for r in rs),
            "wall_seconds": [r["wall_seconds"] for r in rs],
            "cpu_seconds": [r["cpu_seconds"] for r in rs],
            "trainer_init_seconds": [r["trainer_init_seconds"] for r in rs] if kind == "trainer" else None,
        }
    # Framework overhead, measured where compute is ~0 (a 1-layer, 16-wide BERT on the same batches):
    # extra CPU seconds per run and per steady step over the hand loop, median over rounds, then set
    # against the real model's hand-loop CPU time: the throughput ratio that overhead alone implies.
    hand_run = statistics.median(r["cpu_seconds"] for r in runs["hand"])
    hand_step = statistics.median(r["steady_step_cpu_seconds"] for r in runs["hand"])
    overhead = {}
    for kind in KINDS[1:]:
        run_extra = statistics.median(r["cpu_seconds"] - h["cpu_seconds"]
                                      for r, h in zip(micro_runs[kind], micro_runs["hand"]))
        step_extra = statistics.median(r["steady_step_cpu_seconds"] - h["steady_step_cpu_seconds"]
                                       for r, h in zip(micro_runs[kind], micro_runs["hand"]))
        overhead[kind] = {"extra_cpu_seconds_per_run": run_extra, "extra_cpu_ms_per_step": 1000 * step_extra,
                          "implied_ratio_vs_hand_end_to_end": hand_run / (hand_run + run_extra),
                          "implied_ratio_vs_hand_steady_state": hand_step / (hand_step + step_extra)}
    payload = {
        "benchmark": "overhead", "quick": quick, **machine_info(THREADS, "benchmarks.overhead", quick),
        "setup": {"model": "BertForSequenceClassification hidden 128, 2 layers, vocab 1000, sdpa, fp32, dropout 0.1",
                  "examples": n, "real_tokens": real_tokens, "batch_size": BATCH,
                  "micro_batch": MICRO_BATCH, "micro_batches_per_step": len(windows[0]),
                  "steps": "StepSampler(seed 0) steps, each sorted by length and cut by accumulation.cut_step",
                  "optimizer_steps": len(windows), "rounds": rounds,
                  "overhead_model": "BertForSequenceClassification hidden 16, 1 layer", "overhead_rounds": micro_rounds,
                  "optimizer": "AdamW foreach, lr 2e-5 constant, wd 0.01 (matrices)", "max_grad_norm": MAX_GRAD_NORM,
                  "padding": "dynamic, multiple of 8", "device": "cpu"},
        "loops": rows,
        "framework_overhead": overhead,
        "autofit_vs_hand": rows["autofit"]["ratio_vs_hand_end_to_end_cpu"],
        "trainer_vs_hand": rows["trainer"]["ratio_vs_hand_end_to_end_cpu"],
        "autofit_vs_hand_wall": rows["autofit"]["ratio_vs_hand_end_to_end"],
        "trainer_vs_hand_wall": rows["trainer"]["ratio_vs_hand_end_to_end"],
        "autofit_vs_hand_implied_by_overhead": overhead["autofit"]["implied_ratio_vs_hand_end_to_end"],
        "trainer_vs_hand_implied_by_overhead": overhead["trainer"]["implied_ratio_vs_hand_end_to_end"],
        "autofit_within_3_percent": overhead["autofit"]["implied_ratio_vs_hand_end_to_end"] >= 0.97,
        "max_weight_difference_hand_vs_autofit": same,
        "max_weight_difference_hand_vs_trainer": same_trainer,
    }
    if profile:
        payload["profile"] = _profile(base, data, windows, plan)
    payload["seconds"] = time.perf_counter() - started
    path = write_result("overhead_quick" if quick else "overhead", payload)
    _print_table(payload, path)
    return payload


def _rounds(base, data, windows, plan, rounds: int, tmp: str) -> dict[str, list[dict]]:
    """Warm each loop up, then `rounds` rounds of all three, the order rotated each round."""
    runs: dict[str, list[dict]] = {k: [] for k in KINDS}
    for kind in KINDS:  # warm-up of each path (imports, allocator, accelerate state)
        run_one(kind, base, data, windows[:3], plan, tmp)
    for round_ in range(rounds):
        for kind in KINDS[round_ % 3:] + KINDS[:round_ % 3]:  # rotated: each loop takes each slot
            r = run_one(kind, base, data, windows, plan, tmp)
            runs[kind].append({k: v for k, v in r.items() if k != "model"})
            if len(runs[kind]) == 1:
                runs[kind][0]["_model"] = r["model"]
    return runs


def _max_weight_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def _profile(base, data, windows, plan) -> dict:
    """cProfile of the hand loop and run_plan: where autofit's extra time goes (top cumulative entries)."""
    out = {}
    loops = (("hand", lambda m: hand_loop(m, data, windows)),
             ("autofit", lambda m: autofit_loop(m, data, plan, len(windows))))
    for kind, fn in loops:
        model = copy.deepcopy(base)
        prof = cProfile.Profile()
        prof.enable()
        fn(model)
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
        out[kind] = text.getvalue()
    return out


def _print_table(payload: dict, path: Path) -> None:
    s = payload["setup"]
    print(f"overhead benchmark: {s['examples']} examples ({s['real_tokens']:,} real tokens), micro-batch "
          f"{s['micro_batch']} x {s['micro_batches_per_step']} per step of {s['batch_size']}, {s['optimizer_steps']} "
          f"optimizer steps; medians of {s['rounds']} interleaved rounds")
    print(f"{'':<9}{'--- end to end, setup included ---':^40}  {'--- steady-state step ---':^36}")
    print(f"{'loop':<9}{'tok/s':>9}{'vs hand':>9}{'tok/cpu-s':>11}{'vs hand':>9}  "
          f"{'wall s':>9}{'vs hand':>9}{'cpu s':>9}{'vs hand':>9}")
    for kind, r in payload["loops"].items():
        print(f"{kind:<9}{r['tokens_per_second']:>9,.0f}{r['ratio_vs_hand_end_to_end']:>8.3f}x"
              f"{r['tokens_per_cpu_second']:>11,.0f}{r['ratio_vs_hand_end_to_end_cpu']:>8.3f}x  "
              f"{r['steady_step_seconds']:>9.4f}{r['ratio_vs_hand_steady_state']:>8.3f}x"
              f"{r['steady_step_cpu_seconds']:>9.4f}{r['ratio_vs_hand_steady_state_cpu']:>8.3f}x")
    print("ratios are throughput ratios (>1: faster than the hand loop), per round, then the median")
    for kind, o in payload["framework_overhead"].items():
        print(f"{kind} overhead over the hand loop (1-layer 16-wide model, compute ~0): "
              f"{o['extra_cpu_seconds_per_run'] * 1000:+.1f} ms CPU per run, {o['extra_cpu_ms_per_step']:+.2f} ms per "
              f"step -> implied throughput ratio {o['implied_ratio_vs_hand_end_to_end']:.3f} end to end, "
              f"{o['implied_ratio_vs_hand_steady_state']:.3f} steady state")
    print(f"trained weights, max |diff| from the hand loop's: autofit "
          f"{payload['max_weight_difference_hand_vs_autofit']:.2e}, trainer "
          f"{payload['max_weight_difference_hand_vs_trainer']:.2e} (its own dropout draws)")
    print(f"autofit within 3% of the hand loop (by its measured overhead): {payload['autofit_within_3_percent']}")
    print(f"took {payload['seconds']:.0f} s; wrote {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data, three rounds (about a minute)")
    parser.add_argument("--profile", action="store_true", help="add cProfile listings of hand loop and run_plan")
    args = parser.parse_args()
    main(quick=args.quick, profile=args.profile)
