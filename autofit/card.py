"""The visible GPU: its DeviceSpec with this card's calibration (measured on first use, then cached), and the
profiles planned for it: block times measured on the card, layers' saved bytes corrected for its kernels.

Everything takes the device type, so that a dry run ("cpu") goes through the same code on a machine
without a GPU: its calibration reads the live-tensor tracker, its times the CPU, and its kernel correction
compares the CPU's kernels with their own fake twin (zero).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from autofit.calibration import Calibration, corrected, load_calibration, save_calibration, saved_key
from autofit.devices import DEVICES, DeviceSpec
from autofit.models import resolve_config
from autofit.profiler.cache import cached_profile
from autofit.profiler.device import measure_calibration, saved_corrections, software_stack
from autofit.profiler.schema import Profile

log = logging.getLogger("autofit")


def card_spec(*, calibrate: bool = True) -> DeviceSpec | None:
    """The visible GPU as a DeviceSpec (the catalog's entry for its name, else a generic CUDA card, with its
    real memory), with its cached calibration, measured now when there is none and `calibrate`. None
    without a GPU."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    spec = DEVICES[catalog_key(name)].model_copy(update={
        "memory_bytes": torch.cuda.get_device_properties(0).total_memory, "hardware": name})
    found = card_calibration("cuda", measure=calibrate)
    return found.apply(spec) if found is not None else spec


def catalog_key(hardware: str) -> str:
    """The autofit.devices entry for a card's name ("NVIDIA H100 80GB HBM3" -> "h100"), "cuda" if none."""
    words = re.split(r"[\s\-_]+", hardware.lower())
    names = set(words) | {a + b for a, b in zip(words, words[1:])}  # "RTX 4090" is rtx4090; "L40S" is not l4
    return next((key for key in DEVICES if key not in ("cuda", "cpu") and key in names), "cuda")


def visible_as(name: str) -> DeviceSpec | None:
    """The visible GPU's calibrated spec when `name` (a catalog entry, as --device gives it) is that card."""
    if not torch.cuda.is_available() or catalog_key(torch.cuda.get_device_name()) != name.lower():
        return None
    return card_spec()


def card_calibration(device_type: str, *, measure: bool = True, force: bool = False,
                     report: Callable[[str], None] | None = None) -> Calibration | None:
    """This card's cached calibration; measured (and cached) when there is none and `measure`, or `force`."""
    stack = software_stack(device_type)
    found = None if force else (load_calibration(**stack) if device_type == "cuda" else _DRY_RUN.get("cpu"))
    if found is None and (measure or force):
        log.warning("autofit: calibrating %s (once per card and torch version)", stack["hardware"])
        found = measure_calibration(device_type, log=report or (lambda line: log.info(line)))
        if device_type == "cuda":
            save_calibration(found)
        else:  # a dry run's numbers describe no card: kept for this process only
            _DRY_RUN["cpu"] = found
    return found


_DRY_RUN: dict[str, Calibration] = {}


def on_card(spec: DeviceSpec) -> bool:
    """Whether `spec` is the GPU this process sees, so that measuring on it measures the target."""
    return (spec.kind == "cuda" and spec.hardware is not None and torch.cuda.is_available()
            and torch.cuda.get_device_name() == spec.hardware)


def card_precisions(spec: DeviceSpec) -> tuple[str, ...]:
    return ("fp32", "bf16", "fp16") if spec.supports_bf16 else ("fp32", "fp16")


def card_profile(model: Any, task: str, spec: DeviceSpec, *, adapters: bool,
                 device_type: str = "cuda") -> Profile:
    """The model's profile with block times measured on the card for every precision it runs, and the
    layers' saved bytes corrected for its kernels."""
    timing = card_precisions(spec) if device_type == "cuda" else ("fp32", "bf16", "fp16")
    profile = cached_profile(model, task=task, timing=timing, timing_device=device_type, adapters=adapters)
    return with_kernel_correction(profile, model, device_type)


def with_kernel_correction(profile: Profile, model: Any, device_type: str = "cuda") -> Profile:
    """`profile` corrected by the card's saved-bytes correction for its architecture and attention, measured
    (one layer, four small shapes) and cached in the calibration on first sight of the architecture."""
    found = card_calibration(device_type)
    key = saved_key(profile.model_type, profile.attn_implementation)
    if key not in found.saved:
        config = model.config if isinstance(model, nn.Module) else (
            model if isinstance(model, PretrainedConfig) else resolve_config(model)[1])
        half = "bf16" if device_type != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
        measured = saved_corrections(config, profile.task, profile.attn_implementation, device_type, ("fp32", half))
        # autocast casts the same ops to either 2-byte type: one half precision stands for both
        found.saved[key] = {**measured, "bf16": measured[half], "fp16": measured[half]}
        if device_type == "cuda":
            save_calibration(found)
    return corrected(profile, found.saved[key], found.hardware)


def dry_run_spec() -> DeviceSpec:
    """The CPU spec with a dry-run calibration applied: the calibrated path, measured on the CPU."""
    return card_calibration("cpu").apply(DEVICES["cpu"])

