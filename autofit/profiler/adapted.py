"""The profiler's twin with LoRA adapters attached: a frozen base (plain, or NF4 4-bit) and peft's adapters.

The adapted twin is what the executor trains under `adapter=lora`, built of fake tensors like the plain twin:
a plain base keeps the precision's dtype (fp32 under fp32, bf16 under bf16 autocast), an NF4 base has every
block linear layer replaced by `PackedNF4Linear`. bitsandbytes' own Linear4bit cannot live on fake tensors
(its Params4bit quantizes real data when it is made), so the stand-in reproduces what its forward and
MatMul4Bit's backward allocate and save (bitsandbytes 0.50): the input cast to the compute dtype, the weight
dequantized whole as a transient in forward and again in backward, nothing saved for backward but the packed
weight (a parameter), the output cast back to the input's dtype. tests/profiler/test_adapted.py checks it
against real bitsandbytes layers.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn import functional as F

from autofit.layers import block_linears, find_layout, linear_shape
from autofit.profiler.measure_blocks import WINDOWS, prepared
from autofit.profiler.samples import fit_checks, fit_precisions, memory_samples
from autofit.profiler.schema import BlockActivations, FitCheck
from autofit.techniques import lora
from autofit.techniques.quantization import NF4_BLOCK

LORA_PROFILE_RANK = 8
"""The rank the adapted fits are measured at; other ranks differ by `lora.rank_activation_bytes`."""

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""The dtype a base works in under each measured precision (fp16 reuses bf16, as the full-FT fits do): a plain
base is stored in it, an NF4 base dequantizes to it."""

QUANTIZED_FROM = torch.float32
"""The dtype the 4-bit weights were quantized from (`quantization.quantize_block_linears` quantizes fp32
weights): MatMul4Bit's backward dequantizes to it, then casts to the gradient's dtype."""


class _DequantizingMatmul(torch.autograd.Function):
    """bitsandbytes' MatMul4Bit as memory sees it: dequantize, matmul, drop the weight; save no tensor."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                layer: PackedNF4Linear) -> torch.Tensor:
        ctx.layer = layer  # a module attribute, as MatMul4Bit keeps its weight: never a saved tensor
        weight, scales = layer.dequantized(x.dtype)
        output = F.linear(x, weight, bias)
        del weight, scales
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        weight, scales = ctx.layer.dequantized(QUANTIZED_FROM)
        grad_input = torch.matmul(grad_output, weight.to(grad_output.dtype))
        del weight, scales
        return grad_input, None, None, None


class PackedNF4Linear(nn.Linear):
    """A frozen NF4 linear layer on fake tensors, a stand-in for bitsandbytes' Linear4bit (an nn.Linear too, so
    peft wraps it as it wraps the real one: with its plain lora.Linear, `is_loaded_in_4bit` being unset for a
    model quantized in memory). Its weight parameter is the packed uint8 storage (two weights a byte)."""

    def __init__(self, out_features: int, in_features: int, *, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype, double_quant: bool = True, device: torch.device | str = "cpu") -> None:
        nn.Module.__init__(self)  # nn.Linear's own __init__ would allocate a full-precision weight
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype, self.double_quant = compute_dtype, double_quant
        numel = out_features * in_features
        self.weight = nn.Parameter(torch.empty(((numel + 1) // 2, 1), dtype=torch.uint8, device=device),
                                   requires_grad=False)
        # Linear4bit casts its bias to the compute dtype in place on the first forward: stored so from the start.
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)

    def dequantized(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What bitsandbytes allocates to dequantize: the whole weight at `dtype`, and with double quantization
        the fp32 per-block scales it first rebuilds from their 8-bit codes (alive until the weight is made)."""
        device = self.weight.device
        blocks = -(-self.out_features * self.in_features // NF4_BLOCK)
        scales = torch.empty(blocks, dtype=torch.float32, device=device) if self.double_quant else None
        return torch.empty(self.out_features, self.in_features, dtype=dtype, device=device), scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x = x.to(self.compute_dtype)  # held, as Linear4bit.forward holds it, until the output is cast back
        return _DequantizingMatmul.apply(x, self.weight, self.bias, self).to(input_dtype)


def quantize_standins(model: nn.Module, compute_dtype: torch.dtype, *, double_quant: bool = True) -> int:
    """Replace the blocks' linear layers with PackedNF4Linear stand-ins, where `quantize_block_linears` puts
    real Linear4bit layers. Returns how many were replaced."""
    found = block_linears(model)
    for name, linear in found:
        out_features, in_features = linear_shape(linear)
        parent_name, _, child = name.rpartition(".")
        standin = PackedNF4Linear(out_features, in_features, bias=linear.bias, compute_dtype=compute_dtype,
                                  double_quant=double_quant, device=linear.weight.device)
        setattr(model.get_submodule(parent_name), child, standin)
    return len(found)


def attach_adapters(model: nn.Module, *, targets: str, base_kind: str, precision: str, task: str,
                    rank: int = LORA_PROFILE_RANK) -> nn.Module:
    """Make `model` (fp32, on the meta device: peft's Module.to calls refuse fake tensors) the model the
    executor trains under adapter=lora with `base_kind` storage and `precision` ("fp32" or "bf16"): the base
    cast or quantized, peft's adapters injected in place, everything trainable (adapters, the task head's copy)
    in fp32. Returns `model` itself, adapted in place (the profiler measures the transformers model, not
    peft's wrapper around it)."""
    compute_dtype = COMPUTE_DTYPES[precision]
    if base_kind == "nf4":
        quantize_standins(model, compute_dtype)
    elif base_kind == "plain":
        model.to(compute_dtype)  # base_dtype bf16 with precision bf16; fp32 stays fp32
    else:
        raise ValueError(f"unknown base kind {base_kind!r}; expected one of {lora.BASE_KINDS}")
    with torch.device(next(model.parameters()).device):
        lora.apply(model, rank=rank, targets=targets, task=task)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # peft upcasts its adapters itself, not its copy of a half-precision head
    return model


def materialized(model: nn.Module, fake: FakeTensorMode, device: str | torch.device) -> nn.Module:
    """`model` (on the meta device) with every parameter and buffer replaced in place by a fake tensor on
    `device`: same shapes, dtypes and requires_grad, tied tensors still tied."""
    made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (meta original kept alive, fake copy)

    def fake_copy(tensor: torch.Tensor, parameter: bool) -> torch.Tensor:
        if id(tensor) not in made:
            copy = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
            made[id(tensor)] = tensor, nn.Parameter(copy, requires_grad=tensor.requires_grad) if parameter else copy
        return made[id(tensor)][1]

    with fake:
        for module in model.modules():
            for table, parameter in ((module._parameters, True), (module._buffers, False)):
                for name, tensor in table.items():
                    if tensor is not None:
                        table[name] = fake_copy(tensor, parameter)
    return model


def adapted_fits(meta_twin: Callable[[], nn.Module], task: str, device: str,
                 padding_matters: Collection[str] | None = None
                 ) -> tuple[dict[str, dict[str, BlockActivations]], list[FitCheck]]:
    """Per block kind, the fits with LoRA adapters of rank LORA_PROFILE_RANK attached, keyed by
    lora.activation_key; and their held-out checks. `meta_twin` makes a fresh two-layer fp32 copy of the model on
    the meta device; one is adapted per target set, base kind and precision (fp16 reuses bf16), as the base's
    dtype and storage differ between them, and measured as fake tensors on `device`. `padding_matters`: the
    precisions at which padding changed the plain twin's bytes (None: unknown, probed)."""
    fits: dict[str, dict[str, BlockActivations]] = {kind: {} for kind in WINDOWS}
    checks = []
    for targets in lora.TARGET_CHOICES:
        for base_kind in lora.BASE_KINDS:
            for precision in COMPUTE_DTYPES:
                fake = FakeTensorMode(allow_non_fake_inputs=True)
                model = attach_adapters(meta_twin(), targets=targets, base_kind=base_kind, precision=precision,
                                        task=task)
                materialized(model, fake, device)
                with fake, prepared(model, find_layout(model), task, whole=False) as subject:
                    samples, held_out, unpadded = memory_samples(subject, device, (precision,), padding_matters)
                label = lora.activation_key(targets, base_kind, "{precision}")
                for kind in WINDOWS:
                    activations = fit_precisions(samples, unpadded, kind)
                    fits[kind].update({label.format(precision=p): acts for p, acts in activations.items()})
                    checks += fit_checks(kind, activations, held_out, label)
    return fits, checks
