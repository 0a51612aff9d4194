"""The knobs a plan turns: one validated, serialisable object shared by memory, cost, search and executor.

Every field is one memory-saving technique's setting. Their trade-offs live in the technique modules
(`autofit/techniques/`); this file only says what each knob means.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


MAX_MICRO_BATCH = 1 << 20
"""No micro-batch holds more sequences than this (a sanity bound on plan files, far above any real one)."""


class Precision(str, Enum):
    """Numeric regime of forward/backward. Master weights, grads and optimizer state always stay fp32."""

    fp32 = "fp32"
    fp16 = "fp16"  # autocast fp16 + GradScaler (overflow steps are skipped)
    bf16 = "bf16"  # autocast bf16, no scaler needed; needs hardware support on CUDA


Adapter = Literal["none", "lora"]
"""How the model trains: all of its weights (`none`, full fine-tuning), or LoRA adapters on a frozen base."""

BaseDtype = Literal["fp32", "bf16", "fp16", "nf4"]
"""How frozen base weights are stored under an adapter: fp32, half precision, or 4-bit NF4 (bitsandbytes)."""

LoraTargets = Literal["attention", "all-linear"]
"""Which of the layers' linear layers get adapters: the attention projections (the LoRA paper's choice), or
every linear layer (QLoRA's choice: better quality, more memory)."""

MAX_LORA_RANK = 4096

Strategy = Literal["ddp", "fsdp"]
"""How several processes share the training: `ddp` keeps a full replica on each and all-reduces gradients;
`fsdp` shards weights, gradients and optimizer state across them (PyTorch FSDP2, `fully_shard`) and gathers
each unit's weights just before it runs. With one process neither applies: it trains the model as it is."""


class Knobs(BaseModel):
    """One point in the search space: a full description of how to run a training step."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    freeze_embeddings: bool = False
    """Freeze the input embeddings (and weights tied to them). Saves their grads and optimizer state."""

    freeze_layers: int = Field(0, ge=0)
    """Number of bottom transformer layers frozen (requires frozen embeddings, so nothing below the
    boundary needs a gradient: those layers save no activations and run no backward)."""

    checkpoint_layers: tuple[Annotated[int, Field(ge=0)], ...] = ()
    """Indices of layers whose activations are recomputed in backward (non-reentrant checkpointing).
    A checkpointed layer keeps only its input; it costs one extra forward of that layer."""

    precision: Precision = Precision.fp32
    """Autocast dtype for forward/backward; fp32 master weights are kept either way."""

    optimizer_bits: int = Field(32, description="AdamW state width: 32 or 8 (bitsandbytes)")
    """8-bit AdamW keeps ~2 B/param of state instead of 8; embeddings and tensors < 4096 elements stay 32-bit."""

    micro_batch_size: int = Field(1, ge=1, le=MAX_MICRO_BATCH)
    """Most sequences in one forward/backward. An optimizer step trains the workload's whole effective
    batch (`Workload.batch_size` examples), cut into as many micro-batches as these caps need: gradient
    accumulation is what follows from the caps, not a knob of its own (see techniques/accumulation.py)."""

    tokens_per_micro_batch: int | None = Field(None, ge=1)
    """Token budget per micro-batch (sequences x padded length). When set, a micro-batch of a bucket holds
    min(micro_batch_size, tokens_per_micro_batch // the bucket's padded length) sequences, so long buckets
    take fewer sequences and cannot exceed the planned peak."""

    bucket_boundaries: tuple[Annotated[int, Field(ge=1)], ...] = ()
    """Upper length of each length bucket (sorted). Empty means plain dynamic padding, no bucketing."""

    pad_to_multiple_of: int | None = Field(8, ge=1, le=4096)
    """Pad each batch's length up to a multiple of this (tensor-core friendly). None pads to the longest."""

    adapter: Adapter = "none"
    """`lora`: the base model is frozen and each targeted linear layer W gains a trainable low-rank B @ A
    (peft); the task head still trains in full. Gradients and optimizer state shrink to the adapters'
    (techniques/lora.py). Freezing knobs do not apply: the adapter freezes the base itself."""

    base_dtype: BaseDtype = "fp32"
    """Storage of the frozen base under an adapter (techniques/quantization.py). `bf16`/`fp16` store the whole
    base in half precision and need the same `precision`; `nf4` stores the layers' linear weights in 4 bits
    and computes in `precision`'s dtype. Full fine-tuning keeps fp32 master weights: `fp32` only."""

    double_quant: bool = True
    """NF4 only: quantize the per-block scales too (8-bit, QLoRA's double quantization): ~0.4 bit/param less."""

    lora_rank: int = Field(16, ge=1, le=MAX_LORA_RANK)
    """LoRA rank r: each targeted (out, in) layer trains r x (in + out) parameters."""

    lora_targets: LoraTargets = "attention"
    """Which linear layers get adapters (see LoraTargets)."""

    strategy: Strategy = "ddp"
    """See Strategy. Trade-off: FSDP divides the weights, gradients and optimizer state by the number of
    processes; it costs an all-gather of every unit's weights per forward (and per backward when resharded)
    and a reduce-scatter of its gradients per micro-batch, where DDP all-reduces gradients once a step."""

    reshard_after_forward: bool = True
    """FSDP only: free a unit's gathered weights after its forward and gather them again for its backward.
    False keeps every unit's full weights from its forward to its backward (a full replica at the peak):
    one all-gather fewer per micro-batch for that memory."""

    cpu_offload: bool = False
    """FSDP only: sharded weights, gradients and optimizer state live in CPU RAM (FSDP2's CPUOffloadPolicy)
    and AdamW steps on the CPU. The device keeps only the gathered units and activations; every gather
    crosses PCIe and the optimizer runs at CPU speed."""

    fsdp_unit_layers: int = Field(1, ge=1)
    """FSDP only: transformer layers sharded together as one unit (gathered and freed together). One layer
    keeps the least gathered at once; coarser units mean fewer, larger collectives (less latency)."""

    @model_validator(mode="after")
    def _check(self) -> Knobs:
        self._check_adapter()
        self._check_strategy()
        if self.freeze_layers and not self.freeze_embeddings:
            raise ValueError("freeze_layers > 0 requires freeze_embeddings=True")
        if self.optimizer_bits not in (8, 32):
            raise ValueError(f"optimizer_bits must be 8 or 32, not {self.optimizer_bits}")
        if list(self.checkpoint_layers) != sorted(set(self.checkpoint_layers)):
            raise ValueError("checkpoint_layers must be sorted and unique")
        if list(self.bucket_boundaries) != sorted(set(self.bucket_boundaries)):
            raise ValueError("bucket_boundaries must be sorted and unique")
        return self

    def _check_adapter(self) -> None:
        if self.adapter == "none":
            if self.base_dtype != "fp32":
                raise ValueError(f"base_dtype={self.base_dtype} needs adapter=lora (full fine-tuning keeps fp32 "
                                 "master weights)")
            return
        if self.freeze_embeddings or self.freeze_layers:
            raise ValueError("adapter=lora freezes the base itself: freeze_embeddings and freeze_layers must be off")
        if self.base_dtype in ("bf16", "fp16") and self.precision.value != self.base_dtype:
            raise ValueError(f"base_dtype={self.base_dtype} needs precision={self.base_dtype}, "
                             f"not {self.precision.value}")
        if self.base_dtype == "fp32" and self.precision != Precision.fp32:
            raise ValueError(f"an fp32 base under {self.precision.value} autocast keeps a half copy of every "
                             f"weight: use base_dtype={self.precision.value} or nf4")

    def _check_strategy(self) -> None:
        if self.strategy == "fsdp":
            if self.optimizer_bits == 8:
                raise ValueError("8-bit AdamW does not step FSDP's sharded (DTensor) parameters: "
                                 "use optimizer_bits=32 with strategy=fsdp")
            if self.adapter == "lora" and self.base_dtype != "fp32":
                raise ValueError(f"FSDP gathers each unit in one dtype: a {self.base_dtype} base with fp32 "
                                 "adapters does not shard (use base_dtype=fp32, or strategy=ddp)")
            return
        fsdp_only = {"reshard_after_forward": not self.reshard_after_forward, "cpu_offload": self.cpu_offload,
                     "fsdp_unit_layers": self.fsdp_unit_layers != 1}
        changed = [name for name, set_ in fsdp_only.items() if set_]
        if changed:
            raise ValueError(f"{', '.join(changed)} only apply with strategy=fsdp")

    @property
    def quantized(self) -> bool:
        """The base's linear weights are stored in 4 bits."""
        return self.adapter == "lora" and self.base_dtype == "nf4"

    def validate_for(self, num_layers: int) -> None:
        """Raise ValueError when these knobs cannot apply to a model with `num_layers` layers."""
        if self.freeze_layers > num_layers:
            raise ValueError(f"freeze_layers={self.freeze_layers} but the model has {num_layers} layers")
        if self.fsdp_unit_layers > num_layers:
            raise ValueError(f"fsdp_unit_layers={self.fsdp_unit_layers} but the model has {num_layers} layers")
        bad = [i for i in self.checkpoint_layers if i >= num_layers]
        if bad:
            raise ValueError(f"checkpoint_layers {bad} out of range for a model with {num_layers} layers")
