"""The knob space a policy allows: as Optuna parameters, as Knobs, and as an exhaustive enumeration.

Parameters (each a categorical choice; the names are what optuna-dashboard shows):

- `freeze_depth`: 0 = nothing frozen, 1 = embeddings, 1 + k = embeddings and the bottom k layers;
- `checkpoint`: how many trainable layers are checkpointed, lowest first (clipped to the trainable count);
- `precision`, `optimizer_bits`;
- `micro_batch`: the most sequences per micro-batch, powers of two up to the effective batch and the batch
  itself; a step always trains the whole effective batch, in as many micro-batches as the caps need;
- `buckets`: number of length buckets (0 = plain dynamic padding); boundaries are equal-count quantiles;
- `token_budget`: 0 (none), or k in TOKEN_BUDGET_SCALES: cap each bucketed micro-batch at k x micro-batch x
  (shortest bucket's length) tokens, so long
  buckets take fewer sequences (never less than one of the longest). The memory model checks every bucket.
- only when the policy's adapter rule allows them and the profile has their fits: `adapter` (none | lora),
  `lora_rank`, `lora_targets` and `lora_base` (plain: the base in the precision's dtype; nf4: 4 bits).
- only with several processes: `sharding` (policy.SHARDINGS: ddp, fsdp, fsdp:2, fsdp:keep, fsdp:offload;
  offload only on a GPU). FSDP steps 32-bit AdamW and gathers a unit in one dtype: its 8-bit points fall
  back to 32-bit states, its adapter points to an fp32 base under fp32.

Different parameters can give the same Knobs (checkpoint counts beyond the trainable layers, a token budget
on micro-batch 1, freezing or LoRA settings under the other adapter); `enumerate` and `size` count distinct
Knobs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection, Iterator, Mapping
from typing import Any

from autofit.cluster import SINGLE, Cluster
from autofit.devices import DeviceSpec
from autofit.knobs import Knobs, Precision
from autofit.policy import Policy, PolicyError
from autofit.profiler.schema import Profile
from autofit.techniques.bucketing import choose_boundaries
from autofit.techniques.quantization import nf4_runs
from autofit.techniques.lora import activation_key
from autofit.workload import Workload

TOKEN_BUDGET_SCALES = (1, 2, 4)
"""Token budgets the search tries, as multiples of micro-batch x the shortest bucket's length: tight ones pad
least, loose ones run fewer, larger micro-batches (which a GPU runs more efficiently)."""
PAD_MULTIPLE = 8
"""Pad to a multiple of 8 tokens (tensor-core friendly); bucket boundaries use the same multiple."""

ORDINAL = ("freeze_depth", "checkpoint")
"""Parameters drawn as integers (consecutive choices); the rest are categorical."""

FULL_FINE_TUNING = ("none", "fp32", Knobs().lora_rank, Knobs().lora_targets, True)

SHARDING_KNOBS = {"ddp": dict(strategy="ddp"), "fsdp": dict(strategy="fsdp"),
                  "fsdp:2": dict(strategy="fsdp", fsdp_unit_layers=2),
                  "fsdp:keep": dict(strategy="fsdp", reshard_after_forward=False),
                  "fsdp:offload": dict(strategy="fsdp", cpu_offload=True)}
"""The knobs each `sharding` choice sets (policy.SHARDINGS)."""
"""The adapter part of a distinct-Knobs key without an adapter: the LoRA knobs at their (unused) defaults."""


def adapted_keys(profile: Profile) -> frozenset[str]:
    """The LoRA fits a profile carries (`lora.activation_key`s of its layers); none when it was made without."""
    if not profile.lora_profile_rank:
        return frozenset()
    keys = next(b for b in profile.blocks if b.kind == "layer").adapted
    # a 4-bit base the model cannot run under half precision is not offered (quantization.NF4_FP32_ONLY)
    return frozenset(k for k in keys if "-nf4-" not in k or nf4_runs(profile.model_type, k.rsplit("-", 1)[1]))


def micro_batch_sizes(batch_size: int, cap: int | None = None) -> list[int]:
    """Powers of two below `batch_size`, plus `batch_size` itself; none above `cap` (1 always stays). A size
    that does not divide the batch is fine: a step still trains the whole batch, its last micro-batch
    is smaller."""
    sizes = {2**i for i in range(batch_size.bit_length()) if 2**i <= batch_size} | {batch_size}
    return sorted(s for s in sizes if cap is None or s <= cap or s == 1)


class SearchSpace:
    """The space of Knobs `policy` allows for a model with `num_layers` layers on `workload`."""

    def __init__(self, policy: Policy, num_layers: int, workload: Workload, device: DeviceSpec | None = None,
                 *, solve_checkpoint: bool | None = None, adapted: Collection[str] | None = None,
                 cluster: Cluster = SINGLE):
        """`adapted`: the profile's LoRA fits (`adapted_keys`); adapters the profile has no fits for are left
        out, and None (no profile at hand) leaves in every one the policy allows."""
        self.policy, self.num_layers, self.workload = policy, num_layers, workload
        self._args = dict(device=device, solve_checkpoint=solve_checkpoint, adapted=adapted, cluster=cluster)
        self.boundaries = self._bucket_boundaries()
        precisions = self._precisions(device)
        adapter_dims = self._adapter_dims(precisions, adapted)
        self.full_dims: dict[str, list[Any]] = {
            "freeze_depth": [0] if adapter_dims.get("adapter") == ["lora"] else self._freeze_depths(),
            "checkpoint": list(range(num_layers + 1)) if policy.checkpointing else [0],
            "precision": precisions,
            "optimizer_bits": list(policy.optimizer_bits),
            "micro_batch": micro_batch_sizes(workload.batch_size, policy.max_micro_batch),
            "buckets": sorted(self.boundaries),
            "token_budget": [0, *TOKEN_BUDGET_SCALES] if policy.bucketing.token_budget and len(self.boundaries) > 1
            else [0],
            **adapter_dims,
            **self._sharding_dims(cluster, device),
        }
        if solve_checkpoint is None:
            solve_checkpoint = policy.objective == "time"
        self.solve_checkpoint = solve_checkpoint and policy.checkpointing
        """When set, the study does not sample `checkpoint`: the objective solves it (see study.py)."""
        self.dims = {k: v for k, v in self.full_dims.items() if not (k == "checkpoint" and self.solve_checkpoint)}
        """The parameters the study samples."""

    def _sharding_dims(self, cluster: Cluster, device: DeviceSpec | None) -> dict[str, list[str]]:
        if not cluster.distributed:
            return {}
        choices = [c for c in self.policy.sharding.choices
                   if not (c == "fsdp:2" and self.num_layers < 2)
                   and not (c == "fsdp:offload" and (device is None or device.kind != "cuda"))]
        return {"sharding": choices or ["ddp"]}

    def _freeze_depths(self) -> list[int]:
        if not self.policy.freeze.embeddings:
            return [0]
        return list(range(self.policy.freeze.max_frozen_layers(self.num_layers) + 2))

    def _precisions(self, device: DeviceSpec | None) -> list[str]:
        allowed = [p.value for p in self.policy.precisions
                   if not (p == Precision.bf16 and device is not None and not device.supports_bf16)]
        if not allowed:
            raise PolicyError(f"policy {self.policy.name!r} allows only bf16, which {device.name} does not support")
        return allowed

    def _adapter_dims(self, precisions: list[str], adapted: Collection[str] | None) -> dict[str, list[Any]]:
        """The adapter parameters: none unless the policy allows adapters; only targets and bases whose fits
        the profile has under every precision of the space (so the space stays a product)."""
        rule = self.policy.adapters
        if rule.mode in ("never", "fallback"):  # a fallback's adapters are a stage of their own (Policy.stages)
            return {}

        def measured(targets: str, base: str) -> bool:
            return adapted is None or all(activation_key(targets, base, p) in adapted for p in precisions)

        bases = [b for b in rule.bases if any(measured(t, b) for t in rule.targets)]
        targets = [t for t in rule.targets if bases and all(measured(t, b) for b in bases)]
        if not targets:
            if rule.mode == "always":
                raise PolicyError(f"policy {self.policy.name!r} trains adapters only, and the profile has no LoRA "
                                  "fits for them: profile the model with adapters=True")
            return {}
        return {"adapter": ["none", "lora"] if rule.mode == "allowed" else ["lora"],
                "lora_rank": list(rule.ranks), "lora_targets": targets, "lora_base": bases}

    def parts(self) -> list[tuple[str, SearchSpace]]:
        """The space as the study searches it, each part with a study-name suffix: where full fine-tuning and
        adapters are both allowed, each in a study of its own (a mixed study spends its trials on parameters
        that mean nothing for half its points: LoRA's without an adapter, freezing's with one)."""
        if self.full_dims.get("adapter") != ["none", "lora"]:
            return [("", self)]
        return [(suffix, SearchSpace(self.policy.with_adapter(choice), self.num_layers, self.workload, **self._args))
                for suffix, choice in (("", "none"), (".lora", "lora"))]

    def _bucket_boundaries(self) -> dict[int, tuple[int, ...]]:
        """Bucket count -> boundaries, keeping only counts that give distinct, real (>1 bucket) splits."""
        result: dict[int, tuple[int, ...]] = {0: ()} if 0 in self.policy.bucketing.counts else {}
        for count in self.policy.bucketing.counts:
            if count == 0:
                continue
            bounds = choose_boundaries(self.workload.lengths, count, multiple=PAD_MULTIPLE)
            if len(bounds) > 1 and bounds not in result.values():
                result[count] = bounds
        return result or {0: ()}

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Draw one parameter set from an Optuna trial. Depths are integers, so TPE sees their order."""
        params = {}
        for name, choices in self.dims.items():
            if name in ORDINAL and len(choices) > 1:
                params[name] = trial.suggest_int(name, choices[0], choices[-1])
            else:
                params[name] = trial.suggest_categorical(name, choices)
        return params

    # --- parameters -> Knobs -----------------------------------------------------------------------------
    @staticmethod
    def _lora(params: Mapping[str, Any]) -> bool:
        return params.get("adapter", "none") == "lora"

    def _key(self, params: Mapping[str, Any]) -> tuple:
        """The distinct-Knobs identity of a parameter set (clips what has no effect)."""
        depth = 0 if self._lora(params) else params["freeze_depth"]  # the adapter freezes the base itself
        frozen = max(0, depth - 1)
        checkpoint = min(params["checkpoint"], self.num_layers - frozen)
        boundaries = self.boundaries[params["buckets"]]
        micro_batch = params["micro_batch"]
        tokens = None
        if params["token_budget"] and boundaries and micro_batch > 1:
            tokens = max(params["token_budget"] * micro_batch * boundaries[0], boundaries[-1])
        sharding = params.get("sharding", "ddp")
        fsdp = sharding != "ddp"
        adapter, precision = self._adapter_key(params), params["precision"]
        if fsdp and adapter[0] == "lora":  # FSDP gathers a unit in one dtype: an fp32 base, under fp32
            if "fp32" in self.full_dims["precision"]:
                adapter, precision = (adapter[0], "fp32", *adapter[2:4], True), "fp32"
            else:  # the policy allows no fp32: replicas instead
                sharding, fsdp = "ddp", False
        bits = 32 if fsdp else params["optimizer_bits"]  # 8-bit AdamW does not step FSDP's DTensors
        return (depth >= 1, frozen, checkpoint, precision, bits, micro_batch,
                boundaries, tokens, *adapter, sharding)

    def _adapter_key(self, params: Mapping[str, Any]) -> tuple:
        """(adapter, base_dtype, lora_rank, lora_targets, double_quant): a plain base takes the precision's
        dtype (Knobs' rule), double quantization only means something for nf4."""
        if not self._lora(params):
            return FULL_FINE_TUNING
        nf4 = params["lora_base"] == "nf4"
        return ("lora", "nf4" if nf4 else params["precision"], params["lora_rank"], params["lora_targets"],
                self.policy.adapters.double_quant if nf4 else True)

    def knobs(self, params: Mapping[str, Any]) -> Knobs:
        return self._knobs_from_key(self._key(params))

    def _knobs_from_key(self, key: tuple) -> Knobs:
        freeze_embeddings, frozen, checkpoint, precision, bits, micro_batch, boundaries, tokens = key[:8]
        adapter, base_dtype, rank, targets, double_quant, sharding = key[8:]
        return Knobs(
            freeze_embeddings=freeze_embeddings,
            freeze_layers=frozen,
            checkpoint_layers=tuple(range(frozen, frozen + checkpoint)),
            precision=Precision(precision),
            optimizer_bits=bits,
            micro_batch_size=micro_batch,
            tokens_per_micro_batch=tokens,
            bucket_boundaries=boundaries,
            pad_to_multiple_of=PAD_MULTIPLE,
            adapter=adapter, base_dtype=base_dtype, lora_rank=rank, lora_targets=targets, double_quant=double_quant,
            **SHARDING_KNOBS[sharding],
        )

    # --- size and enumeration ----------------------------------------------------------------------------
    def _grids(self) -> list[dict[str, list[Any]]]:
        """The full space as products that reach every distinct Knobs without the duplicates an adapter
        makes: LoRA settings do not matter without one, and freezing does not with one."""
        d = self.full_dims
        if "adapter" not in d:
            return [d]
        full = {**d, "adapter": ["none"], **{k: d[k][:1] for k in ("lora_rank", "lora_targets", "lora_base")}}
        lora = {**d, "adapter": ["lora"], "freeze_depth": [0]}
        return ([full] if "none" in d["adapter"] else []) + [lora]

    def _all_params(self) -> Iterator[dict[str, Any]]:
        for grid in self._grids():
            names = list(grid)
            for values in itertools.product(*grid.values()):
                yield dict(zip(names, values))

    def checkpoint_counts(self, params: Mapping[str, Any]) -> range:
        """Checkpoint counts that make a difference with these parameters (0 .. trainable layers)."""
        frozen = 0 if self._lora(params) else max(0, params["freeze_depth"] - 1)
        return range(self.num_layers - frozen + 1 if self.policy.checkpointing else 1)

    @property
    def grid_size(self) -> int:
        """Sampled parameter combinations (what a grid search runs)."""
        return math.prod(len(v) for v in self.dims.values())

    @property
    def size(self) -> int:
        """Distinct Knobs."""
        return len({self._key(p) for p in self._all_params()})

    def enumerate(self) -> Iterator[Knobs]:
        seen: set[tuple] = set()
        for params in self._all_params():
            key = self._key(params)
            if key not in seen:
                seen.add(key)
                yield self._knobs_from_key(key)

    def starting_points(self) -> list[dict[str, Any]]:
        """Sensible first trials: plain training, every saving at once, and the usual fast recipe; with
        adapters, also the fast recipe as LoRA on a plain base and as QLoRA (4-bit base, all layers
        checkpointed)."""
        d = self.full_dims

        def pick(name: str, preferred: list[Any], default: Any) -> Any:
            return next((v for v in preferred if v in d[name]), default)

        half = pick("precision", ["bf16", "fp16"], d["precision"][0])
        plain = dict(freeze_depth=0, checkpoint=0, precision=pick("precision", ["fp32"], half),
                     optimizer_bits=pick("optimizer_bits", [32], 8), micro_batch=d["micro_batch"][-1],
                     buckets=d["buckets"][0], token_budget=0)
        everything = dict(freeze_depth=d["freeze_depth"][-1], checkpoint=d["checkpoint"][-1], precision=half,
                          optimizer_bits=pick("optimizer_bits", [8], 32), micro_batch=d["micro_batch"][0],
                          buckets=d["buckets"][-1], token_budget=d["token_budget"][min(1, len(d["token_budget"]) - 1)])
        fast = dict(plain, precision=half, buckets=d["buckets"][-1], token_budget=d["token_budget"][-1])
        points = [plain, everything, fast]
        if "sharding" in d:  # replicas where they fit, every shard saving at once, the usual FSDP recipe
            plain["sharding"] = fast["sharding"] = pick("sharding", ["ddp", "fsdp"], d["sharding"][0])
            everything["sharding"] = pick("sharding", ["fsdp:offload", "fsdp"], d["sharding"][-1])
        if "adapter" in d:
            usual = dict(lora_rank=pick("lora_rank", [16], d["lora_rank"][0]),
                         lora_targets=pick("lora_targets", ["all-linear"], d["lora_targets"][0]))
            full = dict(adapter=d["adapter"][0], **usual)  # full fine-tuning where the space has it
            plain.update(full)
            fast.update(full)
            everything.update(adapter="lora", lora_rank=d["lora_rank"][0], lora_targets=d["lora_targets"][0],
                              lora_base=pick("lora_base", ["nf4"], d["lora_base"][0]))
            plain["lora_base"] = fast["lora_base"] = d["lora_base"][0]
            lora = dict(fast, adapter="lora", lora_base=d["lora_base"][0])
            qlora = dict(lora, lora_base=pick("lora_base", ["nf4"], d["lora_base"][0]), checkpoint=d["checkpoint"][-1])
            points += [lora, qlora]
        if "sharding" in d:
            points.append(dict(fast, sharding=pick("sharding", ["fsdp"], d["sharding"][-1])))
        return [{k: v for k, v in point.items() if k in self.dims} for point in points]


def enumerate_space(policy: Policy, num_layers: int, workload: Workload, device: DeviceSpec | None = None,
                    *, adapted: Collection[str] | None = None, cluster: Cluster = SINGLE) -> Iterator[Knobs]:
    """Every distinct Knobs `policy` allows (the exhaustive reference the study is tested against)."""
    return SearchSpace(policy, num_layers, workload, device, adapted=adapted, cluster=cluster).enumerate()
