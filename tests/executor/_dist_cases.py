"""The multi-process runs of test_distributed.py, shared by the test (which runs the 1-process references) and
_dist_worker.py (which runs them on 2 processes under torchrun): tiny models, skewed data, plans."""

from __future__ import annotations

import contextlib
import random

import torch

from _tiny import make_plan, short_model, tiny_model

from autofit.cluster import Cluster
from autofit.data import TokenizedData

PROCESSES = 2
LR = 1e-3
LENGTHS = [5, 6, 4, 7, 5, 6, 8, 4, 30, 52, 20, 5, 60]
"""13 examples with a long tail: steps of 4 are 4, 4, 4 and 1 (an epoch's short last step, fewer examples
than processes); under a 64-token budget the processes' micro-batch counts differ in some steps."""
BATCH = 4
STEPS = 4
KNOBS = dict(micro_batch_size=2, tokens_per_micro_batch=64, bucket_boundaries=(16,))

CASES = {
    # name: (model kind, task, knobs)
    "bert-fsdp": ("bert", "classification", dict(strategy="fsdp", checkpoint_layers=(1,))),
    "bert-ddp": ("bert", "classification", dict(strategy="ddp", checkpoint_layers=(1,))),
    "bert-fsdp-kept": ("bert", "classification", dict(strategy="fsdp", reshard_after_forward=False,
                                                      cpu_offload=True)),
    "llama-fsdp": ("llama", "causal-lm", dict(strategy="fsdp", fsdp_unit_layers=2, freeze_embeddings=True)),
    "llama-ddp": ("llama", "causal-lm", dict(strategy="ddp", freeze_embeddings=True)),
    "lora-fsdp": ("bert", "classification", dict(strategy="fsdp", adapter="lora", lora_rank=4)),
    "lora-ddp": ("bert", "classification", dict(strategy="ddp", adapter="lora", lora_rank=4)),
}
LORA_STEPS = 2


def data(task: str, seed: int = 0) -> TokenizedData:
    rng = random.Random(seed)
    ids = [[rng.randrange(3, 100) for _ in range(n)] for n in LENGTHS]
    if task == "causal-lm":
        return TokenizedData(task=task, input_ids=ids)
    return TokenizedData(task=task, input_ids=ids, labels=[int(7 in row) for row in ids], num_labels=2)


def model(kind: str, task: str, *, dropout: bool = False):
    if kind == "llama":
        return tiny_model("llama", task, dropout=dropout, max_position_embeddings=64)
    return short_model(kind, task) if not dropout else short_model(kind, task, hidden_dropout_prob=0.1,
                                                                   attention_probs_dropout_prob=0.1)


def plan(case: str, processes: int, m=None):
    """The case's plan for `processes` processes (one process: the same knobs, trained unwrapped)."""
    kind, task, knobs = CASES[case]
    base = make_plan(m if m is not None else model(kind, task), task, data(task), batch_size=BATCH,
                     **KNOBS, **knobs)
    return base.model_copy(update={"cluster": Cluster(processes=processes)})


@contextlib.contextmanager
def recorded_grad_norms():
    """The list of every gradient norm the executor clips, while open: Adam's update barely changes when all
    gradients are scaled alike (a wrong average over processes), their norm does."""
    norms: list[float] = []
    original = torch.nn.utils.clip_grad_norm_

    def clip(*args, **kwargs):
        norm = original(*args, **kwargs)
        norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
        return norm

    torch.nn.utils.clip_grad_norm_ = clip
    try:
        yield norms
    finally:
        torch.nn.utils.clip_grad_norm_ = original


def steps(case: str) -> int:
    return LORA_STEPS if CASES[case][2].get("adapter") == "lora" else STEPS


def run(case: str, processes: int, **settings):
    """run_plan on the case (each process of `processes` calls it): a fresh model; a whole epoch is evaluated."""
    from autofit.executor import run_plan

    kind, task, _ = CASES[case]
    m = model(kind, task)
    whole_epoch = steps(case) == STEPS
    with recorded_grad_norms() as norms:
        result = run_plan(m, plan(case, processes, m), data(task), eval=data(task) if whole_epoch else None,
                          lr=LR, quiet=True, max_steps=steps(case), **settings)
    return m, result, norms
