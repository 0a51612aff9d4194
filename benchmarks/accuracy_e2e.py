"""End-to-end accuracy: plans the search finds under tight budgets, trained for a full epoch of skewed lengths.

    python -m benchmarks.accuracy_e2e [--quick] [--families electra,gpt2] [--points 0,0.5] [--fractions 0.5,0.9]

benchmarks/accuracy.py checks the memory model on hand-picked knob sets and fixed shapes. This one checks the
promise a user gets: for every architecture family of the catalog (bert, roberta, xlm-roberta, distilbert,
electra with an embeddings projection as in electra-small, deberta-v2 in DeBERTa-v3 style, gpt2, llama, qwen2),
a small random-weight model and ~300 generated examples with skewed lengths (most short, a long tail up to the
model's 256 positions), then for each budget:

  budget      between the smallest budget any plan of the balanced policy fits (`lo`, from the NoPlanFitsError
              of a 1 MiB plan) and the naive peak (`hi`: what training these examples in steps of 16 as they
              are - fp32, nothing frozen or checkpointed, one micro-batch per step - is predicted to need), at a
              point p of the way on a log scale: lo x (hi / lo)^p. p = 0 is the tightest budget that fits: the
              search must turn every knob it needs. Both ends are memory predictions, so the budgets do not
              depend on the CPU timings the search uses. (The fastest policy's unconstrained peak,
              `--reference fastest`, moves with those timings from run to run - gpt2's from 78 to 152 MiB - and
              at half of it the balanced search picked the same token-budget plan for 7 families, at 23-58%
              of the budget: no checkpointing, precision or 8-bit state tested.);
  plan        autofit.plan(model, budget, data=..., batch_size=16, device="cpu", task=...), balanced policy:
              the search picks every knob (freezing, checkpointing, precision, 8-bit AdamW, micro-batch and
              token caps, length buckets);
  training    autofit.train(fresh model, data, plan=plan, eval_data=...) for one full epoch, evaluation at its
              end included;
  predicted   TrainResult.predicted_allocated_bytes (the larger of training's and evaluation's prediction);
  measured    TrainResult.measured_peak_bytes: autofit/measure.py's live-tensor tracker, every step after the
              first optimizer step, evaluation included.

Each cell records the signed error (predicted - measured) / measured, whether the measured peak stayed within
the budget, the run's memory_warning, and whether every optimizer step trained exactly the batch (16 examples;
only the epoch's last step may hold the remainder).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))

from benchmarks._common import environment, quiet_libraries, table, torch_threads, write_result

VOCAB = 1000
MAX_POS = 256
BATCH = 16
EXAMPLES = 300
EVAL_EXAMPLES = 48
NUM_LABELS = 3
MEAN_EXTRA_LENGTH = 40
"""Lengths are 8 + an exponential draw of this mean, capped at MAX_POS: most examples are short."""
_DROP = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
_BERT_LIKE = dict(num_attention_heads=4, max_position_embeddings=MAX_POS, **_DROP)

FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    # name: (HF model_type, task, config overrides). Dropout 0 so the measured peak is deterministic.
    "bert": ("bert", "classification", dict(hidden_size=128, num_hidden_layers=3, intermediate_size=256,
                                            **_BERT_LIKE)),
    "roberta": ("roberta", "classification", dict(
        hidden_size=96, num_hidden_layers=3, intermediate_size=192, pad_token_id=1,
        **{**_BERT_LIKE, "max_position_embeddings": MAX_POS + 2})),
    "xlm-roberta": ("xlm-roberta", "classification", dict(
        hidden_size=128, num_hidden_layers=2, intermediate_size=512, pad_token_id=1,
        **{**_BERT_LIKE, "max_position_embeddings": MAX_POS + 2})),
    "distilbert": ("distilbert", "classification", dict(
        dim=128, n_layers=3, n_heads=4, hidden_dim=256, max_position_embeddings=MAX_POS, dropout=0.0,
        attention_dropout=0.0, seq_classif_dropout=0.0)),
    "electra": ("electra", "classification", dict(  # electra-small style: embeddings projected 64 -> 128
        embedding_size=64, hidden_size=128, num_hidden_layers=3, intermediate_size=256, **_BERT_LIKE)),
    "deberta-v2": ("deberta-v2", "classification", dict(
        # DeBERTa-v3 style: relative attention with log buckets, p2c|c2p, shared keys, no absolute positions.
        hidden_size=128, num_hidden_layers=2, intermediate_size=256, relative_attention=True, position_buckets=64,
        max_relative_positions=-1, pos_att_type=["p2c", "c2p"], share_att_key=True, norm_rel_ebd="layer_norm",
        position_biased_input=False, type_vocab_size=0, **_BERT_LIKE)),
    "gpt2": ("gpt2", "causal-lm", dict(
        n_embd=96, n_layer=3, n_head=4, n_positions=MAX_POS, bos_token_id=1, eos_token_id=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "llama": ("llama", "causal-lm", dict(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
        max_position_embeddings=MAX_POS, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)),
    "qwen2": ("qwen2", "causal-lm", dict(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=192,
        max_position_embeddings=MAX_POS, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)),
}

FULL = dict(families=list(FAMILIES), points=(0.0, 0.1, 0.25, 0.5), fractions=())
QUICK = dict(families=["electra", "deberta-v2", "qwen2"], points=(0.0, 0.1, 0.5), fractions=())
"""`points`: budgets lo x (hi / lo)^p between the smallest budget that fits and the naive peak (log scale);
`fractions`: budgets f x hi."""
THREADS = 1
"""Intra-op threads while training (see benchmarks/accuracy.py): memory does not depend on it."""
REFERENCES = ("naive", "fastest")
"""What `hi` is: the naive plan's predicted peak, or that of autofit.plan(model, "64GB", policy="fastest")."""


# ---- pure helpers ------------------------------------------------------------------------------------------


def skewed_lengths(n: int, cap: int = MAX_POS, seed: int = 0, mean_extra: float = MEAN_EXTRA_LENGTH) -> list[int]:
    """`n` lengths 8 + expovariate(1/mean_extra), capped at `cap`; the last is `cap` itself, so every plan
    must also fit the longest sequence the model takes."""
    rng = random.Random(seed)
    lengths = [min(cap, 8 + int(rng.expovariate(1 / mean_extra))) for _ in range(n - 1)]
    return lengths + [cap] if n else []


def budget_at(point: float, smallest: int, reference: int) -> int:
    """The budget a fraction `point` of the way from `smallest` to `reference` on a log scale (never below
    `smallest`, so p = 0 is the tightest budget that fits)."""
    if reference <= smallest:
        return smallest
    return max(smallest, int(smallest * (reference / smallest) ** point))


def knobs_summary(knobs: Any, num_layers: int) -> str:
    """The knobs a plan turned, in a few words: "mb16 tok2048 b4 ckpt2/3 frz1+emb bf16 8bit", led by the
    adapters under LoRA ("lora8-att/nf4": rank, targets, base)."""
    parts = [f"mb{knobs.micro_batch_size}"]
    if getattr(knobs, "adapter", "none") == "lora":
        targets = "att" if knobs.lora_targets == "attention" else "all"
        parts.insert(0, f"lora{knobs.lora_rank}-{targets}/{getattr(knobs.base_dtype, 'value', knobs.base_dtype)}")
    if knobs.tokens_per_micro_batch is not None:
        parts.append(f"tok{knobs.tokens_per_micro_batch}")
    if knobs.bucket_boundaries:
        parts.append(f"b{len(knobs.bucket_boundaries)}")
    if knobs.checkpoint_layers:
        parts.append(f"ckpt{len(knobs.checkpoint_layers)}/{num_layers}")
    if knobs.freeze_layers:
        parts.append(f"frz{knobs.freeze_layers}+emb")
    elif knobs.freeze_embeddings:
        parts.append("frz-emb")
    precision = getattr(knobs.precision, "value", knobs.precision)
    if precision != "fp32":
        parts.append(str(precision))
    if knobs.optimizer_bits == 8:
        parts.append("8bit")
    return " ".join(parts)


def wrong_sample_steps(samples: list[int], batch: int, num_examples: int) -> int:
    """Steps of one epoch that did not train what they should: `batch` examples each, except the last, which
    holds the remainder (or a full batch). A missing or extra step counts too."""
    full, rest = divmod(num_examples, batch)
    expected = [batch] * full + ([rest] if rest else [])
    wrong = sum(1 for got, want in zip(samples, expected) if got != want)
    return wrong + abs(len(samples) - len(expected))


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:+.1f}%"


def summarize(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Headline figures over the cells that trained (cells without a plan are counted apart)."""
    ran = [c for c in cells if c.get("measured_bytes") is not None]
    errors = [c["error"] for c in ran]
    absolute = [abs(e) for e in errors]
    return {
        "cells": len(cells), "trained": len(ran), "no_plan": len(cells) - len(ran),
        "median_abs_error_pct": round(100 * statistics.median(absolute), 2) if ran else None,
        "max_abs_error_pct": round(100 * max(absolute), 2) if ran else None,
        "mean_signed_error_pct": round(100 * statistics.fmean(errors), 2) if ran else None,
        "over_budget": sum(1 for c in ran if c["over_budget"]),
        "memory_warnings": sum(1 for c in ran if c["memory_warning"]),
        "steps_with_wrong_sample_count": sum(c["wrong_sample_steps"] for c in ran),
        "over_3pct": [f"{c['family']}@{c['budget']}" for c in ran if abs(c["error"]) > 0.03],
        # the prediction for each run's own micro-batches (TrainResult.run_predicted_allocated_bytes)
        "run_median_abs_error_pct": round(100 * statistics.median(abs(c["run_error"]) for c in ran), 2) if ran else None,
        "run_max_abs_error_pct": round(100 * max(abs(c["run_error"]) for c in ran), 2) if ran else None,
    }


# ---- the run -----------------------------------------------------------------------------------------------


def build_model(family: str):
    from benchmarks.accuracy import build_from

    return build_from(*FAMILIES[family], num_labels=NUM_LABELS)


def make_data(task: str, lengths: list[int], seed: int = 0):
    """Random token ids of the given lengths: causal-LM text without labels, or 3-class examples."""
    from autofit.data import TokenizedData

    rng = random.Random(seed)
    ids = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in lengths]
    if task == "causal-lm":
        return TokenizedData(task=task, input_ids=ids)
    return TokenizedData(task=task, input_ids=ids, labels=[rng.randrange(NUM_LABELS) for _ in ids],
                         num_labels=NUM_LABELS)


def datasets(family: str):
    """(training data, evaluation data) of `family`: skewed lengths, fixed seeds."""
    _, task, _ = FAMILIES[family]
    return (make_data(task, skewed_lengths(EXAMPLES, seed=1), seed=1),
            make_data(task, skewed_lengths(EVAL_EXAMPLES, seed=2), seed=2))


def budget_range(model, task: str, train, reference: str = "naive") -> tuple[int, int, str]:
    """(lo, hi, the knobs hi is for): the smallest budget the balanced search fits on `train`, and the naive
    plan's predicted peak (or the fastest policy's unconstrained one). `task` is passed to autofit.plan as
    autofit.train passes it to the profile cache, so both find the same profile."""
    import autofit
    from autofit.api import make_workload
    from autofit.devices import get_device
    from autofit.knobs import Knobs
    from autofit.memory import predict_peak
    from autofit.profiler.cache import cached_profile
    from autofit.profiler.profile import PRECISIONS
    from autofit.search import NoPlanFitsError

    if reference == "fastest":
        plan = autofit.plan(model, "64GB", data=train, batch_size=BATCH, device="cpu", task=task, policy="fastest")
        hi, knobs = plan.predicted.peak_bytes, knobs_summary(plan.knobs, plan.num_layers)
    else:
        profile = cached_profile(model, task=task, timing=PRECISIONS)
        workload = make_workload(task, seq_len=MAX_POS, batch_size=BATCH, lengths=train.lengths)
        naive = Knobs(micro_batch_size=BATCH)
        hi, knobs = predict_peak(profile, naive, workload, get_device("cpu")).peak_bytes, "naive " + \
            knobs_summary(naive, profile.num_layers)
    try:
        autofit.plan(model, 2**20, data=train, batch_size=BATCH, device="cpu", task=task)
        lo = 2**20
    except NoPlanFitsError as error:
        lo = error.smallest_budget_bytes
    return lo, hi, knobs


def run_family(family: str, points: tuple[float, ...], fractions: tuple[float, ...] = (), reference: str = "naive",
               log=print) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    import autofit
    from autofit.search import NoPlanFitsError

    _, task, _ = FAMILIES[family]
    train, evaluation = datasets(family)
    model = build_model(family)
    started = time.perf_counter()
    lo, hi, hi_knobs = budget_range(model, task, train, reference)
    info = {"task": task, "params": sum(p.numel() for p in model.parameters()),
            "num_layers": model.config.num_hidden_layers,
            "lengths": {"min": min(train.lengths), "median": statistics.median(train.lengths),
                        "max": max(train.lengths), "mean": round(statistics.fmean(train.lengths), 1)},
            "reference": reference, "reference_peak_bytes": hi, "reference_knobs": hi_knobs,
            "smallest_budget_bytes": lo, "range_seconds": round(time.perf_counter() - started, 1)}
    log(f"# {family}: {info['params']:,} params, {info['num_layers']} layers; smallest budget that fits "
        f"{lo / 2**20:.2f} MiB, {reference} peak {hi / 2**20:.2f} MiB ({hi_knobs})")
    budgets = [(f"p{p:g}", p, budget_at(p, lo, hi)) for p in points] + [(f"f{f:g}", None, int(f * hi))
                                                                         for f in fractions]
    cells = []
    for label, point, budget in budgets:
        fraction = round(budget / hi, 3)
        cell: dict[str, Any] = {"family": family, "task": task, "budget": label, "point": point,
                                "fraction": fraction, "budget_bytes": budget, "measured_bytes": None}
        t = time.perf_counter()
        try:
            plan = autofit.plan(build_model(family), budget, data=train, batch_size=BATCH, device="cpu", task=task)
        except NoPlanFitsError as error:
            cell.update(no_plan=str(error), smallest_budget_bytes=error.smallest_budget_bytes)
            cells.append(cell)
            log(f"{family:11} {label:5} budget {budget / 2**20:7.2f} MiB: no plan fits "
                f"(smallest {error.smallest_budget_bytes / 2**20:.2f} MiB)")
            continue
        plan_seconds = time.perf_counter() - t
        t = time.perf_counter()
        result = autofit.train(build_model(family), train, plan=plan, eval_data=evaluation, epochs=1, quiet=True)
        samples = [r.samples for r in result.history]
        measured = result.measured_peak_bytes
        predicted = result.predicted_allocated_bytes
        cell.update(
            knobs=knobs_summary(plan.knobs, plan.num_layers), knob_values=plan.knobs.model_dump(mode="json"),
            policy=plan.policy, headroom_bytes=plan.headroom_bytes,
            predicted_train_bytes=plan.predicted.allocated_bytes, predicted_bytes=predicted,
            predicted_peak_phase=plan.predicted.peak_phase, predicted_peak_shape=list(plan.predicted.peak_shape),
            eval_prediction_larger=predicted > plan.predicted.allocated_bytes,
            measured_bytes=measured, error=(predicted - measured) / measured,
            run_predicted_bytes=result.run_predicted_allocated_bytes,
            run_error=(result.run_predicted_allocated_bytes - measured) / measured,
            over_budget=measured > budget, memory_warning=result.memory_warning,
            micro_batches_per_step=list(plan.step.micro_batches_per_step),
            steps=len(samples), samples_per_step=samples, micro_batches=[r.micro_batches for r in result.history],
            wrong_sample_steps=wrong_sample_steps(samples, BATCH, len(train)),
            fallbacks=[f.summary for f in result.fallbacks], padding_efficiency=round(result.padding_efficiency, 3),
            plan_seconds=round(plan_seconds, 1), train_seconds=round(time.perf_counter() - t, 1))
        cells.append(cell)
        log(f"{family:11} {label:5} budget {budget / 2**20:7.2f} MiB ({fraction:.2f})  {cell['knobs']:34} "
            f"pred {predicted / 2**20:7.2f}  meas {measured / 2**20:7.2f} MiB  {_pct(cell['error']):>7}"
            f"{'  OVER BUDGET' if cell['over_budget'] else ''}{'  WARNING' if result.memory_warning else ''}"
            f"{'  WRONG STEPS' if cell['wrong_sample_steps'] else ''}  [{cell['plan_seconds']}s + "
            f"{cell['train_seconds']}s]")
    return info, cells


def report(result: dict[str, Any]) -> str:
    rows = []
    for c in result["cells"]:
        if c["measured_bytes"] is None:
            rows.append([c["family"], c["budget"], c["fraction"], f"{c['budget_bytes'] / 2**20:.2f}", "no plan fits",
                         "—", "—", "—", "—", "—", "—", "—"])
            continue
        rows.append([c["family"], c["budget"], c["fraction"], f"{c['budget_bytes'] / 2**20:.2f}", c["knobs"],
                     f"{c['predicted_bytes'] / 2**20:.2f}", f"{c['measured_bytes'] / 2**20:.2f}", _pct(c["error"]),
                     _pct(c["run_error"]), "OVER" if c["over_budget"] else "no", "yes" if c["memory_warning"] else "no",
                     c["wrong_sample_steps"]])
    cells = table(["family", "budget", "of naive", "budget MiB", "knobs", "predicted MiB", "measured MiB",
                   "error", "this run's error", "over budget", "warning", "wrong steps"], rows)
    s = result["summary"]
    lines = [f"{s['trained']} of {s['cells']} cells trained ({s['no_plan']} without a plan that fits)",
             f"|error| median {s['median_abs_error_pct']}%, worst {s['max_abs_error_pct']}%, mean signed "
             f"{s['mean_signed_error_pct']}%; predicted for each run's own micro-batches: |error| median "
             f"{s['run_median_abs_error_pct']}%, worst {s['run_max_abs_error_pct']}%",
             f"over budget: {s['over_budget']}; memory warnings: {s['memory_warnings']}; steps with a wrong sample "
             f"count: {s['steps_with_wrong_sample_count']}",
             f"cells off by more than 3%: {', '.join(s['over_3pct']) or 'none'}"]
    return cells + "\n\n" + "\n".join(lines)


def main(quick: bool = False, families: list[str] | None = None, points: list[float] | None = None,
         fractions: list[float] | None = None, reference: str = "naive") -> dict[str, Any]:
    quiet_libraries()
    config = dict(QUICK if quick else FULL)
    if families:
        config["families"] = families
    if points is not None:
        config["points"] = tuple(points)
    if fractions is not None:
        config["fractions"] = tuple(fractions)
    started = time.perf_counter()
    models, cells = {}, []
    with torch_threads(THREADS):
        for family in config["families"]:
            models[family], family_cells = run_family(family, config["points"], config["fractions"], reference)
            cells += family_cells
    seconds = time.perf_counter() - started
    result = {"models": models, "cells": cells, "summary": summarize(cells)}
    print(report(result))
    payload = {
        "benchmark": "accuracy_e2e", "mode": "quick" if quick else "full", **environment(), "torch_threads": THREADS,
        "setup": {"families": config["families"], "points": list(config["points"]),
                  "fractions": list(config["fractions"]), "batch_size": BATCH,
                  "examples": EXAMPLES, "eval_examples": EVAL_EXAMPLES, "vocab": VOCAB, "max_positions": MAX_POS,
                  "lengths": f"8 + expovariate(1/{MEAN_EXTRA_LENGTH}) capped at {MAX_POS}, the last one at the cap",
                  "budgets": "points p: lo x (hi / lo)^p; fractions f: f x hi. lo = the smallest budget the "
                             "balanced policy fits (NoPlanFitsError at 1 MiB); hi = " + (
                                 "the predicted peak of Knobs(micro_batch_size=16) (fp32, nothing frozen or "
                                 "checkpointed, no buckets)" if reference == "naive" else
                                 "the predicted peak of autofit.plan(model, '64GB', policy='fastest')"),
                  "reference": reference,
                  "plan": "autofit.plan(model, budget, data=..., batch_size=16, device='cpu'), balanced policy",
                  "train": "autofit.train(fresh model, data, plan=plan, eval_data=..., epochs=1)",
                  "measured": "TrainResult.measured_peak_bytes (autofit/measure.py), after the first optimizer "
                              "step, evaluation included",
                  "predicted": "TrainResult.predicted_allocated_bytes (max of training's and evaluation's)",
                  "family_configs": {f: FAMILIES[f] for f in config["families"]}, "device": "cpu"},
        "seconds": round(seconds, 1), **result, "headline": result["summary"],
    }
    subset = families or points is not None or fractions is not None or reference != "naive"
    name = "accuracy_e2e_subset" if subset else "accuracy_e2e_quick" if quick else "accuracy_e2e"
    path = write_result(name, payload)
    print(f"\n{len(cells)} cells in {seconds:.0f}s; wrote {path}")
    return payload


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 families x 3 budgets")
    parser.add_argument("--families", help=f"comma-separated subset of {','.join(FAMILIES)}")
    parser.add_argument("--points", help="comma-separated log-scale points between the smallest budget that "
                                         "fits (0) and the reference peak (1); '' for none")
    parser.add_argument("--fractions", help="comma-separated budgets as fractions of the reference peak")
    parser.add_argument("--reference", choices=REFERENCES, default="naive",
                        help="the reference peak: the naive plan's (default) or the fastest policy's at 64GB")
    args = parser.parse_args()
    numbers = lambda text: None if text is None else [float(x) for x in text.split(",") if x]  # noqa: E731
    main(args.quick, args.families.split(",") if args.families else None, numbers(args.points),
         numbers(args.fractions), args.reference)
