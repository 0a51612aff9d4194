"""LoRA adapters (peft): the base stays frozen; each targeted linear layer W gains a trainable B @ A of rank r.

Trade-off: gradients and optimizer state shrink to the adapters' r x (in + out) per targeted layer (well
under 1% of a 7B model at rank 16) plus the task head, which still trains in full. Activations do not shrink
like that: backward still needs each frozen layer's input to reach the adapters below it, and each adapter
keeps its own input and the rank-r intermediate. The base's weight gradients are skipped, but the adapters
add a little compute. Quality: close to full fine-tuning on most tasks, with a gap that grows on hard ones;
more targets and a higher rank narrow it.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

from torch import nn
from transformers.pytorch_utils import Conv1D

from autofit.knobs import Knobs, LoraTargets
from autofit.layers import block_linears, is_attention, linear_shape
from autofit.plan import AdapterWeights
from autofit.profiler.schema import BlockActivations, BlockProfile, LinearLayer, Profile, ShapeFit
from autofit.techniques import quantization

ADAPTER_BYTES = 4
"""Adapters and the task head's copy train in fp32 (peft's default; the executor upcasts them)."""

TARGET_CHOICES: tuple[LoraTargets, ...] = ("attention", "all-linear")
BASE_KINDS = ("plain", "nf4")
"""How the profiler's twin holds the frozen base when measuring adapters: as ordinary weights of the
precision's dtype (fp32 base under fp32, half base under autocast), or as 4-bit NF4 layers."""

PEFT_TASK_TYPES = {"classification": "SEQ_CLS", "token-classification": "TOKEN_CLS", "causal-lm": "CAUSAL_LM"}
"""peft's name for each task: it keeps the task head trainable (a new head must train in full)."""


# ---- pure side -------------------------------------------------------------------------------------------


def activation_key(targets: LoraTargets, base_kind: str, precision: str) -> str:
    """The key of `BlockProfile.adapted` for adapters on `targets`, a `base_kind` base, under `precision`."""
    return f"lora-{targets}-{base_kind}-{precision}"


def is_target(attention: bool, targets: LoraTargets) -> bool:
    """Whether a linear layer (inside attention or not) gets an adapter under `targets`."""
    return targets == "all-linear" or attention


def targeted_linears(block: BlockProfile, targets: LoraTargets) -> list[LinearLayer]:
    """The linear layers of one copy of `block` that get adapters under `targets`."""
    return [x for x in block.linears if is_target(x.attention, targets)]


def adapter_tensor_numels(out_features: int, in_features: int, rank: int) -> tuple[int, int]:
    """The element counts of one layer's adapter: A is r x in, B is out x r."""
    return rank * in_features, out_features * rank


def adapter_numel(shapes: Sequence[tuple[int, int]], rank: int) -> int:
    """Trainable adapter parameters for targeted layers of (out, in) `shapes`."""
    return sum(sum(adapter_tensor_numels(out_features, in_features, rank)) for out_features, in_features in shapes)


def trainable_numels(profile: Profile, rank: int, targets: LoraTargets) -> list[int]:
    """Every tensor that trains under LoRA, by element count: A and B per targeted layer of every layer copy,
    and the task head's tensors (a copy of them: the original stays, frozen). What gradients and the
    optimizer's state are sized from."""
    found = []
    for block in profile.blocks:
        chosen = targeted_linears(block, targets)
        found += [n for x in chosen for n in adapter_tensor_numels(x.out_features, x.in_features, rank)] * block.count
    return found + list(profile.blocks[-1].task_head_numels)


def base_kind(knobs: Knobs) -> str:
    """How the base is held under these knobs, as the profiler measured it (one of BASE_KINDS)."""
    return "nf4" if knobs.base_dtype == "nf4" else "plain"


def block_trainable_numels(block: BlockProfile, knobs: Knobs) -> list[int]:
    """The tensors one copy of `block` trains under LoRA: A and B of its targeted layers, the head's copy."""
    if block.kind == "head":
        return list(block.task_head_numels)
    chosen = targeted_linears(block, knobs.lora_targets)
    return [n for x in chosen for n in adapter_tensor_numels(x.out_features, x.in_features, knobs.lora_rank)]


def block_grad_bytes(block: BlockProfile, knobs: Knobs) -> int:
    """Gradient bytes of one copy of `block` when it trains: all its weights' under full fine-tuning, its
    adapters' and the head's trainable copy's (fp32) under LoRA."""
    if knobs.adapter == "none":
        return block.param_bytes
    return ADAPTER_BYTES * sum(block_trainable_numels(block, knobs))


def base_weight_bytes(profile: Profile, knobs: Knobs) -> int:
    """The frozen base at `knobs.base_dtype` (linears in 4 bits with their constants for nf4, the whole
    model in half precision for bf16/fp16), plus the adapters and the head's trainable copy in fp32."""
    if knobs.base_dtype == "nf4":
        base = quantization.base_weight_bytes(profile, "nf4", double_quant=knobs.double_quant)
    elif knobs.base_dtype == "fp32":
        base = sum(b.param_bytes * b.count for b in profile.blocks)
    else:
        base = profile.num_params * quantization.BYTES_PER_ELEMENT[knobs.base_dtype]
    trained = sum(sum(block_trainable_numels(b, knobs)) * b.count for b in profile.blocks)
    return base + ADAPTER_BYTES * trained


def num_targets(block: BlockProfile, targets: LoraTargets) -> int:
    """Targeted linear layers in one copy of `block`."""
    return len(targeted_linears(block, targets))


def block_fits(block: BlockProfile, knobs: Knobs, profile_rank: int) -> BlockActivations:
    """The block's activation fits under `knobs`' adapters: measured at `profile_rank`, with saved bytes
    moved by `rank_activation_bytes` to `knobs.lora_rank` (layers only: they hold the adapters)."""
    key = activation_key(knobs.lora_targets, base_kind(knobs), knobs.precision.value)
    fits = block.adapted.get(key)
    if fits is None:
        raise ValueError(f"the profile has no LoRA measurements ({key}): profile the model with adapters")
    delta = knobs.lora_rank - profile_rank
    if block.kind != "layer" or delta == 0:
        return fits
    element = 4 if knobs.precision.value == "fp32" else 2  # A's output, under autocast in half precision
    per_token = rank_activation_bytes(num_targets(block, knobs.lora_targets), 1, element, delta)
    return _shift_saved(fits, per_token, autocast_weight_bytes(block, knobs, delta))


def autocast_weight_bytes(block: BlockProfile, knobs: Knobs, rank: int) -> int:
    """What autocast saves for backward of one layer copy's adapters of rank `rank`: a half copy of each A and
    B (measured: the saved bytes' rank slope under bf16 is this plus `rank_activation_bytes`); none in fp32."""
    if knobs.precision.value == "fp32":
        return 0
    chosen = targeted_linears(block, knobs.lora_targets)
    return 2 * adapter_numel([(x.out_features, x.in_features) for x in chosen], rank)


def _shift_saved(fits: BlockActivations, per_token: float, const: float = 0.0) -> BlockActivations:
    """`fits` with `per_token` bytes per token and `const` bytes more saved for backward (also in its batch-1
    and unpadded fits)."""
    def shift(fit: ShapeFit) -> ShapeFit:
        moved = fit.model_copy(update={"per_token": fit.per_token + per_token, "const": fit.const + const})
        return moved if fit.small is None else moved.model_copy(update={"small": shift(fit.small)})

    update = {"saved": shift(fits.saved), "saved_first_trainable": shift(fits.saved_first_trainable)}
    for nested in ("single", "unpadded"):
        if getattr(fits, nested) is not None:
            update[nested] = _shift_saved(getattr(fits, nested), per_token, const)
    return fits.model_copy(update=update)


def rank_activation_bytes(num_targets: int, tokens: int, element_bytes: int, rank: int) -> int:
    """What each adapter saves for backward beyond what its layer's input already costs: A's output (tokens x
    rank), which B's weight gradient needs. Everything else a LoRA block saves does not depend on the rank (its
    targets' inputs, the frozen base's own), so the profiler measures a block once at one rank and the memory
    model adds this term for another: measured saved bytes are linear in the rank with exactly this slope,
    on an fp32 or a 4-bit base alike (tests/techniques/test_lora.py)."""
    return num_targets * tokens * element_bytes * rank


def weights_summary(profile: Profile, knobs: Knobs) -> AdapterWeights | None:
    """An adapter plan's weights by what holds them (None without an adapter): the blocks' linear weights at
    the base dtype (NF4 with its constants), the rest of the base at its own, the trainable tensors in fp32."""
    from autofit.techniques import quantization

    if knobs.adapter == "none":
        return None
    dtype, dq = knobs.base_dtype, knobs.double_quant
    numels = [x.numel for b in profile.blocks for x in b.linears for _ in range(b.count)]
    stored = sum(quantization.weight_bytes(n, dtype, double_quant=dq) for n in numels)
    packed = sum(-(-n // 2) for n in numels) if dtype == "nf4" else stored
    element = profile.blocks[0].param_bytes // max(1, profile.blocks[0].numel)  # a profile holds one dtype
    if dtype in ("bf16", "fp16"):  # a half base is half precision throughout, not only its linear layers
        element = 2
    other = (profile.num_params - sum(numels)) * element
    trainable = sum(trainable_numels(profile, knobs.lora_rank, knobs.lora_targets))
    return AdapterWeights(trainable_params=trainable, base_linear_params=sum(numels), base_linear_bytes=stored,
                          quantization_constant_bytes=stored - packed, other_frozen_bytes=other,
                          trainable_bytes=4 * trainable)


# ---- apply side ------------------------------------------------------------------------------------------


def target_layers(model: nn.Module, targets: LoraTargets) -> list[tuple[str, tuple[int, int]]]:
    """The qualified names and (out, in) shapes of the layers `targets` selects."""
    return [(name, linear_shape(module)) for name, module in block_linears(model)
            if is_target(is_attention(name), targets)]


def apply(model: nn.Module, *, rank: int, targets: LoraTargets, task: str, alpha: int | None = None,
          dropout: float = 0.0) -> nn.Module:
    """`model` wrapped by peft with LoRA adapters on the layers `targets` selects (exact names, so what
    `target_layers` counts is what peft adapts); the base is frozen, the task head trains."""
    with quantization.bitsandbytes_quiet():  # peft imports bitsandbytes
        from peft import LoraConfig, get_peft_model

    names = [name for name, _ in target_layers(model, targets)]
    conv1d = any(isinstance(model.get_submodule(name), Conv1D) for name in names)  # GPT-2 stores W as (in, out)
    if not names:
        raise ValueError(f"no {targets} linear layers found to put LoRA adapters on")
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=dropout, bias="none", fan_in_fan_out=conv1d,
                        target_modules="|".join(re.escape(n) for n in names),  # full-matched by peft
                        task_type=PEFT_TASK_TYPES[task])
    with warnings.catch_warnings():  # peft asks transformers 5 a deprecated question; nothing for the user
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


BASE_CONFIG = "base_config.json"
"""The trained base's transformers config, saved beside the adapters: its head size and class names (peft saves
neither, and a base loaded with the default 2 labels does not take a 5-label head)."""


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a PeftModel's adapters (and its trained task-head copy) to `path` with peft's save_pretrained,
    and the base's config (BASE_CONFIG): `load_adapter(path)` gives the trained model back."""
    model.save_pretrained(os.fspath(path))
    model.get_base_model().config.to_json_file(Path(path) / BASE_CONFIG)
    return Path(path)


def load_adapter(path: str | os.PathLike, base: str | os.PathLike | nn.Module | None = None) -> nn.Module:
    """The model `save_adapter` saved to `path`: its base (`base`, a model id, directory or live model; default
    the one the adapter names), loaded in fp32 with the task head's size and class names it was trained with,
    and the adapters on it (peft's PeftModel.from_pretrained). A 4-bit (QLoRA) base comes back unquantized."""
    from transformers import AutoConfig

    from autofit.models import load_model

    with quantization.bitsandbytes_quiet():
        from peft import PeftConfig, PeftModel
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise ValueError(f"{path} is not an adapter folder (it has no adapter_config.json)")
    peft_config = PeftConfig.from_pretrained(os.fspath(path))
    task = {kind: name for name, kind in PEFT_TASK_TYPES.items()}.get(str(peft_config.task_type))
    if task is None:
        raise ValueError(f"{path} holds a {peft_config.task_type} adapter: autofit trains "
                         f"{', '.join(PEFT_TASK_TYPES.values())} ones")
    saved = AutoConfig.from_pretrained(path / BASE_CONFIG) if (path / BASE_CONFIG).is_file() else None
    if not isinstance(base, nn.Module):
        base = load_model(base or peft_config.base_model_name_or_path, task,
                          num_labels=saved.num_labels if saved is not None else 2)
    if saved is not None and task != "causal-lm":
        base.config.id2label, base.config.label2id = saved.id2label, saved.label2id
    return PeftModel.from_pretrained(base, os.fspath(path))


def export_merged(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Fold a PeftModel's adapters into its base weights (peft's merge_and_unload) and save the plain
    transformers model to `path`; returns that model. The merge happens in place: `model` no longer has
    adapters afterwards (save them first with `save_adapter` to train on). A 4-bit base is refused: folding
    into NF4 would round the adapters away; reload the base unquantized, put the saved adapters on it with
    `PeftModel.from_pretrained`, and export that."""
    from autofit.techniques.quantization import quantized_kind

    kind = quantized_kind(model)
    if kind is not None:
        raise ValueError(f"cannot export a merged model from a {kind} base (the merge would round the adapters "
                         "into 4 bits): load the base unquantized, PeftModel.from_pretrained(base, adapter_dir), "
                         "and export that")
    merged = model.merge_and_unload()
    merged.save_pretrained(os.fspath(path))
    return merged
