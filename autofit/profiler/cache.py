"""An on-disk cache of Profiles, so a second `autofit plan` or `autofit train` of the same model skips the
profiling (tens of seconds on a CPU target, where block times are measured for real).

The key covers everything a Profile depends on: the model's config, the task, the attention
implementation, the timed precisions, the torch/transformers versions and the profiler's own source, so a
changed profiler never reads an old profile. A live nn.Module is keyed by its config too, plus its class,
its weights' dtype and the device it sits on (they change what is measured). AUTOFIT_CACHE=0 switches the
cache off; AUTOFIT_CACHE=DIR moves it (default ~/.cache/autofit/profiles).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from pydantic import ValidationError
from torch import nn
from transformers import PretrainedConfig

from autofit.models import resolve_config
from autofit.profiler.profile import add_adapters, package_versions, profile_model
from autofit.profiler.schema import Profile

log = logging.getLogger("autofit")

_SOURCES = sorted(Path(__file__).parent.glob("*.py")) + [Path(__file__).parent.parent / name for name in (
    "layers.py", "techniques/lora.py")]  # lora.py: what the adapted twin's adapters are
_SOURCE_DIGEST = hashlib.sha256(b"".join(source.read_bytes() for source in _SOURCES)).digest()
"""Read once, at import: the code that makes a profile is the code this process runs, even when the files
change on disk while it runs (a profile made by the old code must not be stored under the new code's key)."""

RUNTIME_SETTINGS = ("problem_type", "transformers_version")
"""Config fields that change without changing the model: a classifier sets problem_type on its first forward,
so a trained model's profile would otherwise be measured again (and, timed anew, could plan differently)."""


ADAPTERS_SUFFIX = "-lora"
"""Appended to the key of a profile made with adapters (`BlockProfile.adapted` filled)."""


def cache_root() -> Path | None:
    """AUTOFIT_CACHE's folder, else ~/.cache/autofit; None when AUTOFIT_CACHE switches caching off."""
    setting = os.environ.get("AUTOFIT_CACHE", "")
    if setting.lower() in ("0", "off", "false", "no"):
        return None
    return Path(setting) if setting else Path.home() / ".cache" / "autofit"


def cache_dir() -> Path | None:
    """Where profiles live: AUTOFIT_CACHE's folder itself, else ~/.cache/autofit/profiles."""
    root = cache_root()
    return root if root is None or os.environ.get("AUTOFIT_CACHE") else root / "profiles"


def cache_key(config: PretrainedConfig, task: str | None, timing: tuple[str, ...], attn: str | None,
              module: str = "", timed_on: str = "cpu") -> str:
    settings = config.to_dict()
    for name in RUNTIME_SETTINGS:
        settings.pop(name, None)
    digest = hashlib.sha256()
    on = f"@{timed_on}" if timing and timed_on != "cpu" else ""  # a CPU-timed key stays what it was
    for part in (json.dumps(settings, sort_keys=True, default=str), str(task), ",".join(timing) + on, str(attn),
                 str(sorted(package_versions().items())), module):
        digest.update(part.encode())
    digest.update(_SOURCE_DIGEST)
    return digest.hexdigest()[:24]


def cached_profile(spec: str | os.PathLike | PretrainedConfig | nn.Module, *, task: str | None = None,
                   timing: tuple[str, ...] = (), timing_device: str = "cpu", attn_implementation: str | None = None,
                   adapters: bool = False) -> Profile:
    """profile_model(spec, ...) read from the cache when it was made before, else made and stored. A profile
    made with `adapters` is stored under its own key and also serves a request without them (it holds
    everything such a profile holds). Times measured on a GPU are keyed by the card's name."""
    folder = cache_dir()
    made = dict(task=task, timing=timing, timing_device=timing_device, attn_implementation=attn_implementation)
    if folder is None:
        return profile_model(spec, **made, adapters=adapters)
    module = ""
    if isinstance(spec, nn.Module):
        first = next(spec.parameters())
        config = spec.config
        attn = getattr(config, "_attn_implementation", None)
        module = f"{type(spec).__qualname__} {first.dtype} {first.device.type} {attn}"
    elif isinstance(spec, PretrainedConfig):
        config = spec
    else:
        config = resolve_config(spec)[1]
    timed_on = torch.cuda.get_device_name() if timing_device == "cuda" else timing_device
    key = cache_key(config, task, timing, attn_implementation, module, timed_on)
    with_adapters = folder / f"{key}{ADAPTERS_SUFFIX}.json"
    candidates = [with_adapters] if adapters else [folder / f"{key}.json", with_adapters]
    for path in candidates:
        found = _read(path)
        if found is not None:
            return found
    path = candidates[0]
    plain = _read(folder / f"{key}.json") if adapters else None
    if plain is not None:  # made earlier without adapters: measure only what they add
        profile = add_adapters(plain, spec, attn_implementation=attn_implementation)
    else:
        if timing:  # seconds for a small model, minutes for billions of parameters: say why nothing shows
            log.info(f"timing every block of {getattr(config, 'name_or_path', '') or config.model_type} on the "
                     f"{timing_device} at a few shapes, once (cached in {folder})")
        profile = profile_model(spec, **made, adapters=adapters)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(profile.model_dump_json())
        tmp.replace(path)
    except OSError:
        pass  # a read-only home: planning still works, only slower
    return profile


def _read(path: Path) -> Profile | None:
    """The profile stored at `path`; None when there is none, or it is unreadable or of an older schema."""
    if not path.is_file():
        return None
    try:
        return Profile.model_validate_json(path.read_text())
    except (ValidationError, OSError):
        return None
