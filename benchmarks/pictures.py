"""The README's pictures, made offline on the CPU (a few minutes on 2 cores):

    python -m benchmarks.pictures            # writes docs/memory.png, docs/pareto.png, docs/layers.png, docs/curves.png

memory.png and pareto.png: `autofit plan --model microsoft/deberta-v3-base --vram 16GB` (the catalog's config,
planned for a generic CUDA card) with `--plot` and `--pareto`. layers.png: `autofit profile --model
microsoft/deberta-v3-base --plot`, timed on this CPU. curves.png: a tiny BERT built from a config, trained for
three epochs on generated token data with a budget of 60% of what it needs unconstrained, as `autofit train
--plot` draws it.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DOCS = Path(__file__).resolve().parent.parent / "docs"
MODEL = "microsoft/deberta-v3-base"
OTHER_IDS = [t for t in range(3, 100) if t != 7]  # the tiny model's vocabulary: 0 pads, 7 decides the label


def plan_pictures() -> list[Path]:
    from autofit import plots
    from autofit.api import plan_and_search

    found = plan_and_search(MODEL, "16GB")
    return plots.save_plan_pictures(found, DOCS / "memory.png", DOCS / "pareto.png")


def layers_picture() -> Path:
    from autofit import plots
    from autofit.profiler import profile_model

    return plots.save_layers(profile_model(MODEL, timing=("fp32",)), DOCS / "layers.png", seq=512)


def token_data(n: int, seed: int):
    """Random ids of skewed lengths (never the pad id 0); the label says whether id 7 occurs (half do)."""
    from autofit.data import TokenizedData

    rng = random.Random(seed)
    ids, labels = [], []
    for i in range(n):
        row = [rng.choice(OTHER_IDS) for _ in range(min(120, 4 + int(rng.expovariate(1 / 16))))]
        if i % 2:
            row[rng.randrange(len(row))] = 7
        ids.append(row)
        labels.append(i % 2)
    return TokenizedData(task="classification", input_ids=ids, labels=labels, num_labels=2)


def curves_picture() -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    import autofit

    torch.manual_seed(0)
    torch.set_num_threads(1)  # a tiny model's ops are microseconds: more threads only spin
    config = BertConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                        num_hidden_layers=3, max_position_embeddings=128, pad_token_id=0)
    model = BertForSequenceClassification(config)
    train, held_out = token_data(384, seed=0), token_data(128, seed=1)
    free = autofit.plan(model, "64GB", data=train, batch_size=16, device="cpu", policy="fastest")
    result = autofit.train(model, train, budget=int(0.6 * free.predicted.peak_bytes), batch_size=16, epochs=3,
                           lr=1e-3, eval_data=held_out, quiet=True)
    return result.plot(DOCS / "curves.png")


def main() -> None:
    DOCS.mkdir(exist_ok=True)
    for path in [*plan_pictures(), layers_picture(), curves_picture()]:
        print(f"{path.relative_to(DOCS.parent)}: {path.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
