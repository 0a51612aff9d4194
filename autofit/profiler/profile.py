"""profile_model: measure a model's embeddings, one layer and its head, and fit how they scale.

Only two layers are ever built: the layers of a stack are identical, so one measured layer stands for all
of them (`count` in the Profile). Bytes and FLOPs come from a two-layer twin made of fake tensors
(torch's FakeTensorMode): every op runs only its shape function, so a 7B model's layer is measured in a
fraction of a second without allocating it, yet each tensor has its real size and dtype, and autocast
behaves as on the real device. Times, when asked for, are measured for real on a two-layer copy.
"""

from __future__ import annotations

import copy
import os
import time
from contextlib import nullcontext
from importlib.metadata import PackageNotFoundError, version

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import PretrainedConfig, PreTrainedModel

from autofit.knobs import Knobs
from autofit.layers import find_layout, is_attention, linear_shape, task_head_params
from autofit.limits import max_sequence_length
from autofit.models import build_model, infer_task, resolve_config
from autofit.profiler.adapted import LORA_PROFILE_RANK, adapted_fits
from autofit.profiler.fit import TIME_TERMS, fit_shape
from autofit.profiler.measure_blocks import KEEP_LAYERS, WINDOWS, Subject, TimeSample, measure_time, prepared
from autofit.profiler.samples import fit_checks, fit_precisions, max_seq, memory_samples
from autofit.profiler.schema import BlockProfile, FitCheck, LinearLayer, Profile, TimeFit
from autofit.profiler.tracker import LiveBytes
from autofit.techniques import optimizer as optim

PRECISIONS = ("fp32", "bf16", "fp16")
TIME_SHAPES = ((1, 32), (2, 64), (4, 64), (4, 128))
CUDA_TIME_SHAPES = ((2, 128), (4, 256), (8, 512), (16, 512))
"""A GPU's: at the CPU's shapes it only waits on kernel launches, and the per-token slope a plan's micro-batches
run on would be extrapolated from noise. These take milliseconds on a card."""
VERSIONED = ("autofit", "torch", "transformers", "accelerate", "bitsandbytes", "optuna")


def profile_model(model: str | os.PathLike | PretrainedConfig | nn.Module, *, task: str | None = None,
                  timing: tuple[str, ...] = (), timing_device: str = "cpu",
                  attn_implementation: str | None = None, adapters: bool = False) -> Profile:
    """The Profile of `model` (an id or path resolved offline, a config, or a live nn.Module).

    Bytes and FLOPs are measured on a two-layer meta-device twin of the model (a plain nn.Module that is
    no PreTrainedModel is measured itself). For each precision in `timing`, per-block forward/backward seconds
    are measured on `timing_device` too: on the module itself when one is passed and sits there, else on a
    two-layer copy on `timing_device`.
    `adapters`: also measure the activations with LoRA adapters attached (`BlockProfile.adapted`), for every
    target set, plain and NF4 base and precision; a live module that is no PreTrainedModel gets none."""
    started = time.perf_counter()
    live = model if isinstance(model, nn.Module) else None
    if live is not None:
        config, model_id = live.config, _module_id(live)
        num_layers = find_layout(live).num_layers
        attn_implementation = getattr(config, "_attn_implementation", None) or attn_implementation
    else:
        model_id, config = (model.name_or_path or model.model_type, model) if isinstance(model, PretrainedConfig) \
            else resolve_config(model)
        num_layers = config.num_hidden_layers
    task = task or infer_task(live, config)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    twin = _fake_twin(live, config, task, attn_implementation, fake)
    subject_model = twin if twin is not None else live
    with fake if twin is not None else nullcontext(), \
            prepared(subject_model, find_layout(subject_model), task) as subject:
        samples, held_out, unpadded = memory_samples(subject, _device_of(subject_model))
        params = _block_params(subject, num_layers)
        tied = _tied_head_bytes(subject_model)
        linears = layer_linears(find_layout(subject_model).layers[-1])
        task_head = [p.numel() for p in task_head_params(subject_model)]
    times, timed_on = {}, timing_device
    if timing:
        timed = _timed_model(live, config, task, attn_implementation, timing_device)
        timed_on = _device_of(timed)
        with prepared(timed, find_layout(timed), task) as subject:
            times = {p: _time_samples(subject, p, timed_on) for p in timing}
    blocks, checks = _blocks(params, samples, unpadded, held_out, times)
    blocks = [b.model_copy(update={"linears": linears}) if b.kind == "layer" else b for b in blocks]
    blocks[-1] = blocks[-1].model_copy(update={"tied_embedding_bytes": tied, "task_head_numels": task_head})
    profile = Profile(
        model_id=model_id, model_type=config.model_type, task=task, num_layers=num_layers,
        hidden_size=config.hidden_size, vocab_size=config.vocab_size,
        max_positions=max_sequence_length(config),
        attn_implementation=getattr(subject_model.config, "_attn_implementation", None) or "eager",
        device=timed_on if timing else "meta",
        device_name=torch.cuda.get_device_name() if timing and timed_on == "cuda" else "",
        blocks=blocks, optimizer_transient_per_param=optimizer_transient(params["layer"][0]),
        profile_shapes=[(s.batch, s.seq) for s in samples["fp32"]], fit_checks=checks,
        seconds=time.perf_counter() - started, versions=package_versions(),
    )
    return add_adapters(profile, model, attn_implementation=attn_implementation) if adapters else profile


def add_adapters(profile: Profile, model: str | os.PathLike | PretrainedConfig | nn.Module, *,
                 attn_implementation: str | None = None) -> Profile:
    """`profile` (of `model`, made without adapters) with the LoRA fits measured too, for every target set,
    plain and NF4 base and precision: what `profile_model(..., adapters=True)` adds, without measuring the
    rest again. A live module that is no PreTrainedModel gets none."""
    started = time.perf_counter()
    live = model if isinstance(model, nn.Module) else None
    if live is not None and not isinstance(live, PreTrainedModel):
        return profile
    if live is not None:
        config = live.config
        attn_implementation = getattr(config, "_attn_implementation", None) or attn_implementation
    else:
        config = model if isinstance(model, PretrainedConfig) else resolve_config(model)[1]
    task = profile.task
    # where padding changed nothing for the plain model it changes nothing with adapters (no mask code touched)
    padding = {p for b in profile.blocks for p, acts in b.activations.items() if acts.unpadded is not None}
    adapted, checks = adapted_fits(lambda: _meta_twin(live, config, task, attn_implementation), task,
                                   _device_of(live) if live is not None else "cpu", padding_matters=padding)
    return profile.model_copy(update={
        "blocks": [b.model_copy(update={"adapted": adapted[b.kind]}) for b in profile.blocks],
        "fit_checks": profile.fit_checks + checks,
        "lora_profile_rank": LORA_PROFILE_RANK if any(adapted.values()) else 0,
        "seconds": profile.seconds + time.perf_counter() - started})


def package_versions() -> dict[str, str]:
    found = {}
    for name in VERSIONED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def _module_id(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return (getattr(config, "name_or_path", "") or getattr(config, "model_type", "") or type(model).__name__)


def _two_layer_config(config: PretrainedConfig) -> PretrainedConfig:
    small = copy.deepcopy(config)
    keep = min(KEEP_LAYERS, config.num_hidden_layers)
    small.num_hidden_layers = keep
    if isinstance(getattr(small, "layer_types", None), list):  # per-layer attention kinds (qwen2, gemma)
        small.layer_types = small.layer_types[:keep]
    return small


def _device_of(model: nn.Module) -> str:
    return next(model.parameters()).device.type


def _fake_twin(live: nn.Module | None, config: PretrainedConfig, task: str, attn: str | None,
               fake: FakeTensorMode) -> nn.Module | None:
    """A two-layer copy of the model made of fake tensors: same classes, dtype and device, no storage.

    Fake tensors carry their device's dispatch keys, so autocast and kernel choice are the real device's,
    but every op runs only its shape function: bytes are exact and nothing is computed."""
    with fake:
        if live is None:
            return build_model(_two_layer_config(config), task, device="cpu", attn_implementation=attn,
                               num_labels=config.num_labels)
        if not isinstance(live, PreTrainedModel):
            return None
        first = next(live.parameters())
        return _copy_of(live, config, attn, first.device, first.dtype)


def _timed_model(live: nn.Module | None, config: PretrainedConfig, task: str, attn: str | None,
                 device: str) -> nn.Module:
    """What block times are measured on: the live module where it sits on `device` (or cannot be copied),
    else a two-layer copy of it (or of the config's model) on `device`."""
    if live is not None and (_device_of(live) == device or not isinstance(live, PreTrainedModel)):
        return live
    if live is None:
        return build_model(_two_layer_config(config), task, device=device, attn_implementation=attn,
                           num_labels=config.num_labels)
    return _copy_of(live, config, attn, device, next(live.parameters()).dtype)


def _meta_twin(live: nn.Module | None, config: PretrainedConfig, task: str, attn: str | None) -> nn.Module:
    """A two-layer fp32 copy of the model on the meta device (peft adapts it there: its Module.to calls refuse
    fake tensors)."""
    if live is None:
        return build_model(_two_layer_config(config), task, device="meta", attn_implementation=attn,
                           num_labels=config.num_labels)
    return _copy_of(live, config, attn, "meta", torch.float32)


def _copy_of(live: PreTrainedModel, config: PretrainedConfig, attn: str | None, device: str | torch.device,
             dtype: torch.dtype) -> nn.Module:
    """A two-layer model of `live`'s class made from `config`, on `device` in `dtype` (fresh weights)."""
    kwargs = {"attn_implementation": attn} if attn else {}
    with torch.device(device):
        return type(live)._from_config(_two_layer_config(config), dtype=dtype, **kwargs)


def _time_samples(subject: Subject, precision: str, device: str) -> list[TimeSample]:
    limit = max_seq(subject.model)
    shapes = [(b, min(s, limit)) for b, s in (CUDA_TIME_SHAPES if device == "cuda" else TIME_SHAPES)]
    measure_time(subject, precision, shapes[0], device, repeats=1)  # warm-up: first calls pay set-up costs
    # a GPU picks kernels per shape on first sight (cuBLAS heuristics): more repeats, of which the fastest
    return [measure_time(subject, precision, shape, device, repeats=5 if device == "cuda" else 3)
            for shape in shapes]


def _block_params(subject: Subject, num_layers: int) -> dict[str, tuple[list[torch.Tensor], list[int], int]]:
    """Per block kind: (its parameter tensors, the numels of those that are embeddings, copies)."""
    layout = find_layout(subject.model)
    embedding_ids = {id(m.weight) for m in subject.model.modules() if isinstance(m, nn.Embedding)}
    params = {"embeddings": layout.embedding_params, "layer": list(layout.layers[-1].parameters()),
              "head": layout.head_params}
    return {kind: (ps, [p.numel() for p in ps if id(p) in embedding_ids], num_layers if kind == "layer" else 1)
            for kind, ps in params.items()}


def layer_linears(layer: nn.Module) -> list[LinearLayer]:
    """The linear layers of one transformer layer, with their shapes and whether they are attention's."""
    found = []
    for name, module in layer.named_modules():
        shape = linear_shape(module)
        if shape is not None:
            found.append(LinearLayer(name=name, out_features=shape[0], in_features=shape[1],
                                     attention=is_attention(name)))
    return found


def _tied_head_bytes(model: nn.Module) -> int:
    """Bytes of the input embeddings' weights that the output layer uses too (gpt2's tied LM head)."""
    get = getattr(model, "get_output_embeddings", None)
    output = get() if callable(get) else None
    if output is None:
        return 0
    embedding_ids = {id(p) for p in find_layout(model).embedding_params}
    return sum(p.numel() * p.element_size() for p in output.parameters() if id(p) in embedding_ids)


def _blocks(params: dict, samples: dict, unpadded: dict, held_out: dict,
            times: dict) -> tuple[list[BlockProfile], list[FitCheck]]:
    """Fit every block's quantities over the shapes, and check the fits of `saved` on the held-out shapes."""
    blocks, checks = [], []
    for kind in WINDOWS:
        activations = fit_precisions(samples, unpadded, kind)
        time_fits = {p: TimeFit(**{d: fit_shape([(t.batch, t.seq) for t in ts], [getattr(t, d)[kind] for t in ts],
                                                TIME_TERMS) for d in ("forward", "backward")})
                     for p, ts in times.items()}
        tensors, embedding_numels, count = params[kind]
        blocks.append(BlockProfile(
            name=kind, kind=kind, count=count, param_numels=[t.numel() for t in tensors],
            embedding_numels=embedding_numels, param_bytes=sum(t.numel() * t.element_size() for t in tensors),
            flops_forward=fit_shape([(x.batch, x.seq) for x in samples["fp32"]],
                                    [x.flops[kind] for x in samples["fp32"]]),
            activations=activations, time=time_fits))
        checks += fit_checks(kind, activations, held_out)
    return blocks, checks


def optimizer_transient(layer_params: list[torch.Tensor]) -> dict[str, float]:
    """Temporary bytes per trainable parameter of one steady-state optimizer.step(), for 32- and 8-bit
    AdamW as the executor builds them, measured on CPU copies of one layer's parameter shapes (foreach
    AdamW's temporaries are per-parameter lists; bitsandbytes' are per tensor)."""
    proxy = nn.Module()
    # At most 2**20 elements a tensor: the ratio is what counts, and a 7B layer need not be copied.
    proxy.params = nn.ParameterList(nn.Parameter(torch.zeros(min(p.numel(), 2**20))) for p in layer_params)
    numel = sum(p.numel() for p in proxy.parameters())
    result = {}
    for bits in (32, 8):
        for p in proxy.parameters():
            p.grad = torch.full_like(p, 1e-3)
        try:
            optimizer = optim.build_optimizer(proxy, Knobs(optimizer_bits=bits), lr=1e-5)
        except optim.OptimizerUnavailableError:
            continue  # no bitsandbytes here: 8-bit plans are rejected by the executor anyway
        optimizer.step()  # the first step creates the state; the second is the steady state
        state = [v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
        params = list(proxy.parameters())
        with LiveBytes(existing=[*params, *(p.grad for p in params), *state]) as tracker:
            optimizer.step()
        result[str(bits)] = tracker.peak / max(numel, 1)
    return result
