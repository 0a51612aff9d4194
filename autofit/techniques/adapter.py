"""Adapter training as a whole, apply side: store the frozen base as the knobs say, put LoRA adapters on it
(peft), keep what trains in fp32; and the checks that a model can take such a plan.

The pure sides live in lora.py (what trains, what the adapters save) and quantization.py (what the base
weighs). This module only strings their apply sides together in the one order that works: the base is
quantized or cast first (peft then wraps the 4-bit or half layers it finds), the adapters go on, and every
trainable tensor is made fp32 last (peft makes a half base's head copy, and with autocast_adapter_dtype its
adapters, in whatever dtype it finds).
"""

from __future__ import annotations

import torch
from torch import nn

from autofit.knobs import Knobs
from autofit.layers import block_linears
from autofit.techniques import lora, quantization

HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class AdapterError(ValueError):
    """A model that cannot take the plan's adapter or base storage, said in one line."""


# ---- pure side -------------------------------------------------------------------------------------------


def compute_dtype(precision_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a 4-bit layer dequantizes to: autocast's (bf16/fp16), or fp32 when there is no autocast."""
    return precision_dtype or torch.float32


# ---- apply side ------------------------------------------------------------------------------------------


def prepare(model: nn.Module, knobs: Knobs, task: str, *, precision_dtype: torch.dtype | None) -> nn.Module:
    """`model` with its base stored at `knobs.base_dtype` and LoRA adapters on `knobs.lora_targets`, wrapped
    by peft (the returned PeftModel trains; `model` itself is changed in place and runs the adapters too).
    `precision_dtype` is autocast's dtype for the run (None under fp32)."""
    if knobs.base_dtype == "nf4":
        quantization.quantize_block_linears(model, double_quant=knobs.double_quant,
                                            compute_dtype=compute_dtype(precision_dtype))
    elif knobs.base_dtype in HALF_DTYPES:
        model.to(HALF_DTYPES[knobs.base_dtype])
    keep_4bit_layout(model)
    wrapped = lora.apply(model, rank=knobs.lora_rank, targets=knobs.lora_targets, task=task)
    for param in wrapped.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()  # master weights of what trains are fp32, as in full fine-tuning
    return wrapped


def keep_4bit_layout(model: nn.Module) -> None:
    """Turn off bitsandbytes' CPU inference repacking: on an AVX512-bf16 CPU, a 4-bit layer's first forward
    in eval mode rewrites its weight in place into another layout (bf16 scales, double quantization undone),
    which changes what the base weighs mid-run and fails outright on layers narrower than a 64-weight block."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def has_adapters(model: nn.Module) -> bool:
    """Whether peft already put adapter layers into `model` (an earlier run, or a PeftModel passed in)."""
    try:
        with quantization.bitsandbytes_quiet():  # peft imports bitsandbytes, which prints on some CPUs
            from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return any(isinstance(module, BaseTunerLayer) for module in model.modules())


def check_model(model: nn.Module, knobs: Knobs, device: torch.device) -> None:
    """Raise AdapterError when `model` cannot train with `knobs` on `device`: adapters already in it, a
    quantized model under a plan that does not keep it in NF4 as it is, no block linear layers to adapt, or
    peft or bitsandbytes missing or unable to run there."""
    if has_adapters(model):
        raise AdapterError("this model already has peft adapters in it (an earlier LoRA run adds them to the "
                           "model it is given): pass a freshly loaded base model, with resume=True to go on from "
                           "an earlier run's output_dir (its checkpoints hold the adapters)")
    _check_quantized(model, knobs)
    if knobs.adapter == "none":
        return
    try:
        with quantization.bitsandbytes_quiet():
            import peft  # noqa: F401
    except ImportError:
        raise AdapterError("a LoRA plan needs peft: pip install peft") from None
    if not block_linears(model):
        raise AdapterError(f"a LoRA plan needs linear layers in the model's blocks, and this "
                           f"{type(model).__name__} has none to put adapters on")
    if knobs.quantized:
        model_type = getattr(getattr(model, "config", None), "model_type", "")
        if not quantization.nf4_runs(model_type, knobs.precision.value):
            raise AdapterError(f"a 4-bit base under {knobs.precision.value} fails in {model_type}'s attention "
                               "(fp32 queries into half-precision scores): plan it with precision fp32 or a "
                               f"{knobs.precision.value} base")
        problem = quantization.nf4_unavailable(device)
        if problem:
            raise AdapterError(f"the plan stores the base in 4-bit NF4, but bitsandbytes cannot run on "
                               f"{device.type}: {problem}")


def _check_quantized(model: nn.Module, knobs: Knobs) -> None:
    found = quantization.quantized_kind(model)
    if found is None:
        return
    if not knobs.quantized:
        what = "full fine-tuning" if knobs.adapter == "none" else f"a LoRA plan with base_dtype={knobs.base_dtype}"
        raise AdapterError(f"this model is already quantized ({found}) but {what} needs its weights unquantized: "
                           "load it without quantization, or use a plan with base_dtype=nf4")
    wanted = quantization.nf4_description(knobs.double_quant)
    if found != wanted:
        raise AdapterError(f"this model is already quantized ({found}) but the plan stores the base as {wanted}: "
                           "load it without quantization, or plan for the quantization it has")
