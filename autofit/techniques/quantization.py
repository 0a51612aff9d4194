"""Base-weight storage: frozen weights kept at fp32, bf16, fp16 or 4-bit NF4 (bitsandbytes, as in QLoRA).

Trade-off: a frozen weight needs no gradient and no optimizer state, so only its storage counts. Half
precision halves it at no cost to what trains; NF4 stores 4 bits per weight plus one scale per 64 weights
(0.56 B/param, 0.52 with double quantization, against 4 for fp32), but every matmul first dequantizes its
weight to the compute dtype (a transient the size of that one weight, and time), and rounding the base to 16
levels per block costs some quality. Only the transformer blocks' linear layers are quantized: embeddings,
norms and the task head keep their dtype, as transformers' own bitsandbytes loading does.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from autofit.intmath import ceil_div
from autofit.layers import block_linears, linear_shape
from autofit.profiler.schema import Profile

NF4_BLOCK = 64
"""Weights per NF4 block: each block has its own absmax scale (bitsandbytes' default blocksize for 4 bit)."""

NESTED_BLOCK = 256
"""With double quantization the 8-bit absmax scales are themselves scaled in blocks of 256 (one fp32 each)."""

NF4_CODE_VALUES = 16
"""The NF4 code book: 16 fp32 levels stored with every quantized tensor."""

NESTED_CODE_VALUES = 256
"""The 8-bit dynamic code book of the nested (double) quantization: 256 fp32 levels."""

BYTES_PER_ELEMENT = {"fp32": 4, "bf16": 2, "fp16": 2}


@contextmanager
def bitsandbytes_quiet() -> Iterator[None]:
    """Around a first import of bitsandbytes (or of peft, which imports it): on AVX512-bf16 CPUs its import
    logs a warning that an optional kernel package is missing; it works without, so the user need not see it."""
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)

NF4_FP32_ONLY = frozenset({"deberta-v2"})
"""Model types whose attention fails with a 4-bit base under half precision: Linear4bit hands back fp32
queries and keys, and DeBERTa's masked_fill into half-precision scores overflows. Their NF4 plans use fp32."""


def nf4_runs(model_type: str, precision: str) -> bool:
    """Whether a 4-bit base can train this model type under `precision` (see NF4_FP32_ONLY)."""
    return precision == "fp32" or model_type not in NF4_FP32_ONLY


# ---- pure side -------------------------------------------------------------------------------------------


def nf4_bytes(numel: int, *, double_quant: bool) -> int:
    """Bytes of one weight of `numel` elements stored as bitsandbytes NF4: two weights per byte, an absmax per
    64 weights (fp32, or uint8 plus an fp32 per 256 blocks and an fp32 offset with double quantization) and
    the code books. Equals the bytes of a real Params4bit and its quant_state's tensors."""
    blocks = ceil_div(numel, NF4_BLOCK)
    packed = ceil_div(numel, 2)
    code = 4 * NF4_CODE_VALUES
    if not double_quant:
        return packed + 4 * blocks + code
    nested = 4 * ceil_div(blocks, NESTED_BLOCK) + 4 * NESTED_CODE_VALUES + 4  # scales, code book, offset
    return packed + blocks + nested + code


def weight_bytes(numel: int, base_dtype: str, *, double_quant: bool = True) -> int:
    """Storage of one frozen weight at `base_dtype` (fp32 | bf16 | fp16 | nf4)."""
    if base_dtype == "nf4":
        return nf4_bytes(numel, double_quant=double_quant)
    return numel * BYTES_PER_ELEMENT[base_dtype]


def dequantized_bytes(numel: int, compute_dtype: torch.dtype) -> int:
    """The transient a 4-bit matmul allocates: its weight, whole, at the compute dtype (one layer at a time)."""
    return numel * torch.empty((), dtype=compute_dtype).element_size()


def base_weight_bytes(profile: Profile, base_dtype: str, *, double_quant: bool = True) -> int:
    """Bytes of a model's weights with its blocks' linear weights stored at `base_dtype` and everything
    else (embeddings, norms, biases, the head) as profiled, the layout `quantize_block_linears` makes."""
    total = 0
    for block in profile.blocks:
        linear_numels = [x.numel for x in block.linears]
        stored = sum(weight_bytes(n, base_dtype, double_quant=double_quant) for n in linear_numels)
        element = block.param_bytes // max(block.numel, 1)  # a profile holds one dtype
        total += block.count * (block.param_bytes - element * sum(linear_numels) + stored)
    return total


# ---- apply side ------------------------------------------------------------------------------------------


def quantize_block_linears(model: nn.Module, *, double_quant: bool = True,
                           compute_dtype: torch.dtype = torch.float32) -> int:
    """Replace the blocks' linear layers with bitsandbytes Linear4bit (NF4) holding the same weights,
    quantized where the model sits. For a model already in memory; a model loaded by id or path gets the
    same from transformers' BitsAndBytesConfig. Returns how many layers were quantized."""
    with bitsandbytes_quiet():
        from bitsandbytes.nn import Linear4bit, Params4bit

    found = [(name, linear) for name, linear in block_linears(model) if not isinstance(linear, Linear4bit)]
    for name, linear in found:
        parent_name, _, child = name.rpartition(".")
        weight = (linear.weight.t() if isinstance(linear, Conv1D) else linear.weight).detach()  # as (out, in)
        quantized = Linear4bit(weight.shape[1], weight.shape[0], bias=linear.bias is not None,
                               compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type="nf4",
                               device="meta")
        quantized.weight = Params4bit(weight.float().cpu().contiguous(), requires_grad=False,
                                      compress_statistics=double_quant, quant_type="nf4")
        if linear.bias is not None:
            quantized.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=linear.bias.requires_grad)
        setattr(model.get_submodule(parent_name), child, quantized.to(weight.device))
    return len(found)


def stored_bytes(module: nn.Module) -> int:
    """Bytes a module's parameters really occupy, 4-bit ones with their quant_state tensors (what nf4_bytes
    predicts), counted from the tensors themselves (each shared tensor once)."""
    total = 0
    for tensor in module.parameters():
        total += tensor.numel() * tensor.element_size()
        state = getattr(tensor, "quant_state", None)
        while state is not None:
            total += sum(t.numel() * t.element_size() for t in (state.absmax, state.code))
            if state.nested:
                total += state.offset.numel() * state.offset.element_size()
            state = state.state2 if state.nested else None
    return total


def logical_numel(param: torch.Tensor) -> int:
    """Elements a parameter stands for: a 4-bit Params4bit packs two per byte, its quant_state knows the shape."""
    state = getattr(param, "quant_state", None)
    return state.shape.numel() if state is not None else param.numel()


def nf4_description(double_quant: bool) -> str:
    return "4-bit NF4" + (" with double quantization" if double_quant else "")


def quantized_kind(model: nn.Module) -> str | None:
    """How `model`'s weights are already quantized, in words (e.g. "4-bit NF4 with double quantization",
    what `nf4_description` says for the same settings), or None when they are not."""
    kinds = set()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None:  # a quantized bitsandbytes Params4bit
            kinds.add(nf4_description(bool(state.nested)) if state.quant_type == "nf4"
                      else f"4-bit {state.quant_type}")
        elif type(weight).__name__ == "Int8Params":
            kinds.add("8-bit")
    quantizer = getattr(model, "hf_quantizer", None)
    if not kinds and quantizer is not None:
        kinds.add(str(getattr(quantizer.quantization_config, "quant_method", "quantized")))
    return " and ".join(sorted(kinds)) or None


def nf4_unavailable(device: torch.device) -> str | None:
    """Why bitsandbytes cannot quantize to NF4 and back on `device` (one line), or None when it can."""
    return _nf4_probe(device.type, device.index)


@functools.cache
def _nf4_probe(device_type: str, index: int | None) -> str | None:
    try:
        with bitsandbytes_quiet():
            import bitsandbytes.functional as bnb_functional

        weight = torch.ones(64, 64, device=torch.device(device_type, index) if index is not None else device_type)
        packed, state = bnb_functional.quantize_4bit(weight, quant_type="nf4")
        bnb_functional.dequantize_4bit(packed, state)
    except Exception as error:  # noqa: BLE001 - an import error, a missing kernel, a library that fails to load
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return f"{type(error).__name__}: {first}"
    return None


def load_config(model: nn.Module, *, double_quant: bool, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig that loads `model`'s architecture (a meta-device build is enough)
    with exactly the layers `quantize_block_linears` quantizes in NF4: its other linear layers (a pooler, the
    task head) are named as skipped, so loading by id and quantizing in memory give the same model."""
    from transformers import BitsAndBytesConfig

    blocks = {name for name, _ in block_linears(model)}
    skipped = [name for name, module in model.named_modules() if linear_shape(module) and name not in blocks]
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skipped)
