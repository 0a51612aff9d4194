"""Could an adapter plan beat the best full fine-tuning plan? Decided before the adapters' activation fits
are measured, because measuring them is most of a cold profile's time (8 more adapted twins).

Time and risk of an adapter plan do not need those fits: the time model prices a LoRA step from the block
times and the layers' shapes. Among adapter plans of one batching and precision, the one without
checkpointing on a plain base is the fastest (recomputing and dequantizing only add time) and the least
risky (a 4-bit base adds risk), whatever it weighs. So if no such plan scores below the best full fine-tuning
plan, no adapter plan can, and the fits are not needed: the bound is exact, not a guess.
"""

from __future__ import annotations

import itertools

from autofit.cluster import SINGLE, Cluster
from autofit.cost import predict_time
from autofit.devices import DeviceSpec
from autofit.policy import Policy
from autofit.profiler.schema import Profile
from autofit.search.result import Candidate
from autofit.search.space import SearchSpace
from autofit.workload import Workload


def adapters_could_win(profile: Profile, workload: Workload, device: DeviceSpec, policy: Policy,
                       best: Candidate | None, cluster: Cluster = SINGLE) -> bool:
    """Whether `policy` might choose adapters over `best`, the best full fine-tuning plan (None: none fits)."""
    rule = policy.adapters
    if rule.mode == "never":
        return False
    if best is None or rule.mode == "always":
        return True
    if rule.mode == "fallback" or policy.objective != "time":
        return False  # adapters only when nothing fits, or a memory objective (scores are not seconds)
    return best_adapter_score_bound(profile, workload, device, policy, cluster) < best.score


def best_adapter_score_bound(profile: Profile, workload: Workload, device: DeviceSpec, policy: Policy,
                             cluster: Cluster = SINGLE) -> float:
    """The lowest score any adapter plan of `policy` can have: epoch seconds x (1 + risk price x risk) of the
    unchecked, plain-base adapter plans over every batching, precision, optimizer, rank and target set."""
    space = SearchSpace(policy.with_adapter("lora"), profile.num_layers, workload, device, cluster=cluster)
    bases = space.full_dims.get("lora_base", ["plain"])
    dims = dict(space.full_dims, freeze_depth=[0], checkpoint=[0], adapter=["lora"],
                lora_base=["plain"] if "plain" in bases else space.full_dims["lora_base"])
    best = float("inf")
    for values in itertools.product(*dims.values()):
        knobs = space.knobs(dict(zip(dims, values)))
        seconds = predict_time(profile, knobs, workload, device, cluster=cluster).epoch_seconds
        best = min(best, seconds * (1.0 + policy.risk_price * policy.risk(knobs, profile.num_layers)))
    return best
