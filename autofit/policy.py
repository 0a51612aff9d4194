"""Policies: which knobs the search may turn, how far, what it optimises and how much risk it accepts.

A policy is a small YAML file (shipped ones live in `policies/` at the top of the repository, installed as
`autofit/policies/`), validated by pydantic. The search
reads it; nothing else does. Conventions a policy relies on:

- Freezing is a depth: embeddings first, then the bottom `k` layers (frozen layers need frozen embeddings).
- Selective checkpointing is a count `n`: the *lowest* `n` trainable layers are checkpointed. Layers of a
  stack are identical, so which ones are checkpointed barely changes the peak or the recompute time; fixing
  the lowest keeps the space one-dimensional.
- Micro-batch sizes are the powers of two that divide the effective batch, plus the effective batch itself,
  so accumulation steps = batch / micro-batch keeps the effective batch exactly.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, ValidationError,
                      field_validator, model_validator)

from autofit.budget import MAX_BUDGET_BYTES, parse_size
from autofit.knobs import MAX_LORA_RANK, Knobs, LoraTargets, Precision


POLICY_DIR = next((d for d in (Path(__file__).parent / "policies", Path(__file__).parent.parent / "policies")
                   if d.is_dir()), Path(__file__).parent / "policies")
"""Shipped policies, read by path like the catalog: `autofit/policies/` in an installed wheel (pyproject maps the
repository's top-level `policies/` there), the top-level `policies/` itself in a source checkout."""


class PolicyError(ValueError):
    """A policy that cannot be found, read or validated."""


def _a_number(value: object) -> object:
    """A YAML number, not a quoted one or a boolean (pydantic would read "0.5" and true as floats)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a number, not {value!r}")
    return value


Number = Annotated[float, BeforeValidator(_a_number)]
"""A float field of a policy: ints are fine, strings and booleans are refused as typos."""


class _PolicyLoader(yaml.SafeLoader):
    """YAML 1.2's numbers: PyYAML follows YAML 1.1, which reads 5e-2 and 1e3 (no dot) as strings."""


_PolicyLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                    re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
                                    list("-+0123456789."))


class _Strict(BaseModel):
    # allow_inf_nan=False: YAML reads `.inf`/`.nan` as floats and `ge=0` lets inf through; an infinite
    # risk_price gives inf and nan objectives (inf x a risk of 0 is nan), and the search's pick is arbitrary.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class FreezeRule(_Strict):
    embeddings: StrictBool = False
    """May the input embeddings be frozen (and with them, layers)."""
    max_layers: StrictInt | None = Field(None, ge=0)
    """Most bottom layers that may be frozen, as a count."""
    max_fraction: Number | None = Field(None, ge=0.0, le=1.0)
    """Most bottom layers that may be frozen, as a fraction of depth (rounded down). With max_layers
    both caps apply; with neither, no layer is frozen."""

    @model_validator(mode="after")
    def _layers_need_embeddings(self) -> FreezeRule:
        if not self.embeddings and (self.max_layers or self.max_fraction):
            raise ValueError("freezing layers needs embeddings: true (frozen layers need frozen embeddings)")
        return self

    def max_frozen_layers(self, num_layers: int) -> int:
        caps = [num_layers]
        if self.max_layers is not None:
            caps.append(self.max_layers)
        if self.max_fraction is not None:
            caps.append(int(self.max_fraction * num_layers + 1e-9))
        if len(caps) == 1 or not self.embeddings:
            return 0
        return min(caps)


class BucketRule(_Strict):
    counts: list[StrictInt] = [0]
    """Numbers of length buckets the search may try; 0 means plain dynamic padding (no buckets)."""
    token_budget: StrictBool = False
    """May a bucketed plan cap each micro-batch by tokens (micro-batch x shortest bucket's length)."""

    @field_validator("counts")
    @classmethod
    def _counts(cls, counts: list[int]) -> list[int]:
        if not counts or min(counts) < 0:
            raise ValueError("must be a non-empty list of bucket counts >= 0")
        return sorted(set(counts))


class Headroom(_Strict):
    """Memory kept free below the budget: the larger of `fraction` x budget and `bytes`."""

    fraction: Number = Field(0.05, ge=0.0, lt=1.0)
    bytes: StrictInt = Field(0, ge=0, le=MAX_BUDGET_BYTES)

    @field_validator("bytes", mode="before")
    @classmethod
    def _parse_bytes(cls, value: object) -> object:
        if isinstance(value, str):  # "512MB", or "0": no 1 MB floor, a small headroom is fine
            return 0 if value.strip() == "0" else parse_size(value, what="headroom")
        if isinstance(value, float):  # 2.5e9, as YAML 1.2 reads it: a byte count (parse_size says if too large)
            return parse_size(value, what="headroom")
        return value

    def for_budget(self, budget_bytes: int) -> int:
        return max(int(self.fraction * budget_bytes), self.bytes)

    def smallest_budget_for(self, peak_bytes: int) -> int:
        """Smallest budget b with b - for_budget(b) >= peak_bytes (b - for_budget(b) never falls as b grows)."""
        b = max(math.ceil(peak_bytes / (1.0 - self.fraction)), peak_bytes + self.bytes)
        while b - self.for_budget(b) < peak_bytes:  # float rounding
            b += 1
        while b > 0 and b - 1 - self.for_budget(b - 1) >= peak_bytes:  # int() rounds the headroom down
            b -= 1
        return b


AdapterMode = Literal["never", "fallback", "allowed", "always"]
ADAPTER_CHOICES: tuple[str, ...] = ("auto", "none", "lora")
"""What a user may ask of adapters: the policy decides (auto), full fine-tuning only (none), adapters only."""


def check_adapter_choice(adapter: object) -> str:
    """`adapter` when it is auto, none or lora; else a one-line ValueError."""
    if adapter not in ADAPTER_CHOICES:
        raise ValueError(f"adapter must be one of {', '.join(ADAPTER_CHOICES)}, not {adapter!r}")
    return str(adapter)


class AdapterRule(_Strict):
    """May the search train LoRA adapters on a frozen base instead of the whole model, and which."""

    mode: AdapterMode = "never"
    """`never`: full fine-tuning only. `fallback`: adapters only when no full fine-tuning plan fits, the
    policy's own fallback included (a last stage). `allowed`: adapters compete with full fine-tuning in the
    same search, priced by their risk. `always`: adapter plans only."""
    ranks: list[StrictInt] = [8, 16, 32, 64]
    """LoRA ranks the search may try."""
    targets: list[LoraTargets] = ["attention", "all-linear"]
    """Which linear layers get adapters: the attention projections, or every linear layer of the blocks."""
    bases: list[Literal["plain", "nf4"]] = ["plain", "nf4"]
    """How the frozen base is stored: `plain` in the compute precision's dtype (fp32 under fp32, half under
    bf16/fp16 autocast), `nf4` as 4-bit NF4 (QLoRA)."""
    double_quant: StrictBool = True
    """NF4 bases quantize their scales too (QLoRA's double quantization)."""

    @field_validator("ranks")
    @classmethod
    def _ranks(cls, ranks: list[int]) -> list[int]:
        if not ranks or not all(1 <= r <= MAX_LORA_RANK for r in ranks):
            raise ValueError(f"must be a non-empty list of ranks from 1 to {MAX_LORA_RANK}")
        return sorted(set(ranks))

    @field_validator("targets", "bases")
    @classmethod
    def _choices(cls, values: list) -> list:
        if not values:
            raise ValueError("must list at least one choice")
        return list(dict.fromkeys(values))

    def for_choice(self, adapter: str) -> AdapterRule:
        """This rule as a user's `adapter` choice overrides it: auto keeps it, none turns adapters off,
        lora makes every plan an adapter plan (with this rule's ranks, targets and bases)."""
        mode = {"auto": self.mode, "none": "never", "lora": "always"}[check_adapter_choice(adapter)]
        return self.model_copy(update={"mode": mode})


LORA_REFERENCE_RANK = 16
"""The rank `RiskWeights.lora` is priced at."""


class RiskWeights(_Strict):
    """Quality-risk score of each technique (0 = none). Used to break ties and, with `risk_price`, to
    trade speed against risk."""

    freeze_embeddings: Number = Field(0.05, ge=0)
    frozen_layers: Number = Field(1.0, ge=0)
    """Multiplied by the fraction of layers frozen."""
    optimizer_8bit: Number = Field(0.1, ge=0)
    fp16: Number = Field(0.15, ge=0)
    """fp16 overflows are skipped by the GradScaler but some models (DeBERTa-v3) lose steps often."""
    bf16: Number = Field(0.02, ge=0)
    lora: Number = Field(0.8, ge=0)
    """An adapter plan at rank 16 on the attention projections: the base does not train, only a low-rank update
    of a few layers. Scaled by (16 / rank) ** 0.25: the LoRA paper found rank matters little, so doubling it
    cuts the risk by only 16%."""
    lora_all_linear: Number = Field(0.75, ge=0, le=1)
    """Factor on `lora` with adapters on every linear layer: QLoRA found that adapting all of them, not just
    attention, is what matches full fine-tuning."""
    nf4_base: Number = Field(0.1, ge=0)
    """A 4-bit base on top of the adapter's risk: its weights are rounded to 16 levels per block of 64."""

    def adapter(self, knobs: Knobs) -> float:
        """The risk of training `knobs`' adapters instead of the whole model (0 for full fine-tuning)."""
        if knobs.adapter == "none":
            return 0.0
        targets = self.lora_all_linear if knobs.lora_targets == "all-linear" else 1.0
        score = self.lora * targets * (LORA_REFERENCE_RANK / knobs.lora_rank) ** 0.25
        return score + self.nf4_base * knobs.quantized


class Relaxation(_Strict):
    """What a second-stage search may also use when nothing fits under the policy itself."""

    freeze: FreezeRule | None = None
    checkpointing: StrictBool | None = None
    precisions: list[Precision] | None = None
    optimizer_bits: list[Literal[8, 32]] | None = None


SHARDINGS = ("ddp", "fsdp", "fsdp:2", "fsdp:keep", "fsdp:offload")
"""How several processes may share the training, as the search names it: DDP replicas; FSDP with one layer
per unit, two layers per unit, units kept gathered from forward to backward, or shards offloaded to CPU RAM."""


class ShardingRule(_Strict):
    """Which ways of sharing a step over several processes the search may try (read only when there are)."""

    choices: list[Literal[SHARDINGS]] = list(SHARDINGS)

    @field_validator("choices")
    @classmethod
    def _non_empty(cls, values: list) -> list:
        if not values:
            raise ValueError("must list at least one choice")
        return list(dict.fromkeys(values))


class Policy(_Strict):
    name: str
    description: str = ""
    objective: Literal["time", "memory"] = "time"
    """"time": minimise predicted epoch time; "memory": minimise predicted peak."""
    freeze: FreezeRule = FreezeRule()
    checkpointing: StrictBool = True
    """May layers be checkpointed (a count from 0 to all trainable layers, lowest first)."""
    precisions: list[Precision] = [Precision.fp32]
    optimizer_bits: list[Literal[8, 32]] = [32]
    max_micro_batch: StrictInt | None = Field(None, ge=1)
    """Largest micro-batch to try (None: up to the effective batch)."""
    bucketing: BucketRule = BucketRule()
    headroom: Headroom = Headroom()
    risk_weights: RiskWeights = RiskWeights()
    risk_price: Number = Field(0.0, ge=0.0)
    """Objective = epoch time x (1 + risk_price x risk): how much speed one unit of risk must buy."""
    tie_tolerance: Number = Field(0.01, ge=0.0, lt=1.0)
    """Plans whose objective is within this fraction of the best count as tied; the least risky wins."""
    fallback: Relaxation | None = None
    adapters: AdapterRule = AdapterRule()
    """LoRA/QLoRA: whether and when the search may train adapters instead of the whole model."""
    sharding: ShardingRule = ShardingRule()
    """With several processes: DDP and the FSDP variants the search may try."""

    @field_validator("precisions", "optimizer_bits")
    @classmethod
    def _non_empty(cls, values: list) -> list:
        if not values:
            raise ValueError("must list at least one choice")
        return list(dict.fromkeys(values))

    def risk(self, knobs: Knobs, num_layers: int) -> float:
        """Quality-risk score of `knobs` on a model with `num_layers` layers (higher = riskier)."""
        w = self.risk_weights
        score = w.freeze_embeddings * knobs.freeze_embeddings
        score += w.frozen_layers * knobs.freeze_layers / max(1, num_layers)
        score += w.optimizer_8bit * (knobs.optimizer_bits == 8)
        score += {Precision.fp16: w.fp16, Precision.bf16: w.bf16}.get(knobs.precision, 0.0)
        return score + w.adapter(knobs)

    @property
    def searches_adapters(self) -> bool:
        """Some stage of this policy's search may choose adapters (the profile must carry their fits)."""
        return self.adapters.mode != "never"

    def with_adapter(self, adapter: str) -> Policy:
        """This policy with a user's adapter choice (auto | none | lora) applied to its adapter rule."""
        return self.model_copy(update={"adapters": self.adapters.for_choice(adapter)})

    def stages(self, *, adapters: bool = True) -> list[tuple[str, Policy]]:
        """The search's stages in order, each with a study-name suffix: the policy itself, then its fallback
        if it has one. Adapters in `fallback` mode come in a last stage of their own (the most relaxed
        space, adapter plans only), left out when `adapters` is false (the profile has no fits for them)."""
        relaxed = self.relaxed()
        stages = [("", self)] + ([(".fallback", relaxed)] if relaxed is not None else [])
        if self.adapters.mode != "fallback":
            return stages
        full_only = [(suffix, stage.with_adapter("none")) for suffix, stage in stages]
        return full_only + ([(".adapters", stages[-1][1].with_adapter("lora"))] if adapters else [])

    def relaxed(self) -> Policy | None:
        """This policy with its fallback applied (the second-stage search), or None without one."""
        if self.fallback is None:
            return None
        changes = {k: v for k, v in self.fallback.model_dump().items() if v is not None}
        return Policy.model_validate({**self.model_dump(), **changes, "fallback": None})


def shipped_policies() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in POLICY_DIR.iterdir() if p.name.endswith(".yaml"))


def parse_policy(data: object, source: str) -> Policy:
    """Validate a policy mapping; a PolicyError names the bad field."""
    if not isinstance(data, dict):
        raise PolicyError(f"invalid policy {source}: expected a mapping of fields")
    try:
        return Policy.model_validate(data)
    except RecursionError:
        raise PolicyError(f"invalid policy {source}: nested too deeply") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "policy"
        raise PolicyError(f"invalid policy {source}: {field}: {first['msg']}") from None


def load_policy(name_or_path: str | Path | Policy) -> Policy:
    """A shipped policy by name ("balanced", "quality-first", ...) or a policy YAML file by path."""
    if isinstance(name_or_path, Policy):
        return name_or_path
    text, source, stem = _read_policy_text(str(name_or_path))
    try:
        data = yaml.load(text, Loader=_PolicyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        raise PolicyError(f"invalid policy {source}: not YAML ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise PolicyError(f"invalid policy {source}: nested too deeply") from None
    if isinstance(data, dict):
        data.setdefault("name", stem)
    return parse_policy(data, source)


def _read_policy_text(name_or_path: str) -> tuple[str, str, str]:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise PolicyError(f"policy file {name_or_path!r} is a directory" if path.is_dir()
                              else f"policy file {name_or_path!r} not found")
        try:
            return path.read_text(encoding="utf-8"), repr(str(path)), path.stem
        except UnicodeDecodeError:
            raise PolicyError(f"policy file {name_or_path!r} is not UTF-8 text (a YAML file is)") from None
    name = name_or_path.strip().lower().replace("_", "-")
    shipped = POLICY_DIR / f"{name}.yaml"
    if not shipped.is_file():
        raise PolicyError(f"unknown policy {name_or_path!r}; shipped: {', '.join(shipped_policies())}")
    return shipped.read_text(), repr(name), name
