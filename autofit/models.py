"""Resolve a model spec offline: a local directory → the local Hugging Face cache → the built-in catalog.

Nothing here touches the network: every transformers/hub call passes `local_files_only=True` and runs with
huggingface_hub forced offline. Planning a model needs only its config (shipped in `autofit/catalog/*.json`
for popular fine-tuning models); training needs weights only if the user has them on disk.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from pydantic import BaseModel
from safetensors import SafetensorError
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
)

from autofit.limits import check_config

log = logging.getLogger("autofit")
CATALOG_DIR = Path(__file__).parent / "catalog"
# task -> (auto class that adds its head, the model_types that have that head)
TASK_HEADS = {
    "classification": (AutoModelForSequenceClassification, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
    "causal-lm": (AutoModelForCausalLM, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
    "token-classification": (AutoModelForTokenClassification, MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES),
}
WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = (
    "tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
)


class ModelNotFoundError(ValueError):
    """The spec is no local model directory, is not in the local HF cache, and is not in the catalog."""


class UnsupportedTaskError(ValueError):
    """The task name is unknown, or the model family has no head for it."""


class RandomWeightsWarning(UserWarning):
    """A model was built with random weights because no pretrained weights exist on this machine."""


class CatalogEntry(BaseModel):
    """One `autofit/catalog/*.json` file: a model's hub id, its other hub names, its real config.json."""

    id: str
    aliases: list[str] = []
    config: dict


@contextmanager
def _hub_offline():
    """Force huggingface_hub offline while it runs: `local_files_only` alone still lets it reach the Hub (its
    user-agent builder fetches a registry), and HF_HUB_OFFLINE is read once, when the hub is imported."""
    previous = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = previous


@cache
def _catalog() -> dict[str, CatalogEntry]:
    """Catalog entries keyed by lower-cased id and alias (hub ids are matched case-insensitively)."""
    by_name = {}
    for path in sorted(CATALOG_DIR.glob("*.json")):
        entry = CatalogEntry.model_validate_json(path.read_text())
        for name in (entry.id, *entry.aliases):
            by_name[name.lower()] = entry
    return by_name


def known_models() -> list[str]:
    """Canonical ids of the catalog models (aliases left out), sorted case-insensitively."""
    return sorted({entry.id for entry in _catalog().values()}, key=str.lower)


def _local_dir(spec: str) -> Path | None:
    """The model directory `spec` names on this machine, or None."""
    path = Path(spec).expanduser()
    return path.resolve() if (path / "config.json").is_file() else None


def _has_file(source: Path | str, names: tuple[str, ...]) -> bool:
    """Whether a local directory, or a hub id's snapshot in the local HF cache, holds any of `names`."""
    if isinstance(source, Path):
        return any((source / name).is_file() for name in names)
    try:
        return any(isinstance(try_to_load_from_cache(source, name), str) for name in names)
    except ValueError:  # not a valid hub repo id (e.g. a path that does not exist)
        return False


def _cached_config(spec: str) -> PretrainedConfig | None:
    """The config of hub id `spec` from the local HF cache, or None; never downloads."""
    try:
        return AutoConfig.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError):  # not cached, not a valid repo id, or an unknown model_type
        return None


def _config_from_dict(model_id: str, config: dict) -> PretrainedConfig:
    kwargs = dict(config)
    result = CONFIG_MAPPING[kwargs.pop("model_type")](**kwargs)
    result.name_or_path = model_id
    return result


@_hub_offline()
def _resolve(spec: str | os.PathLike) -> tuple[str, PretrainedConfig, Path | str | None]:
    """(canonical id, config, where pretrained weights are or None)."""
    spec = os.fspath(spec)
    local = _local_dir(spec)
    if local is not None:
        model_id = str(local)
        config = check_config(_local_config(local))
        return model_id, config, local if _has_file(local, WEIGHT_FILES) else None
    cached = _cached_config(spec)
    if cached is not None:
        return spec, check_config(cached), spec if _has_file(spec, WEIGHT_FILES) else None
    entry = _catalog().get(spec.lower())
    if entry is not None:
        return entry.id, _config_from_dict(entry.id, entry.config), None
    raise _not_found(spec)


def _local_config(directory: Path) -> PretrainedConfig:
    """The config.json of a local model directory; one line when transformers cannot read it."""
    try:
        return AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelNotFoundError(f"cannot read {directory / 'config.json'}: {first}") from None


def _not_found(spec: str) -> ModelNotFoundError:
    where = f"directory {spec!r} has no config.json" if Path(spec).is_dir() else f"unknown model {spec!r}"
    return ModelNotFoundError(
        f"{where}: not a local model directory, not in the local Hugging Face cache, and not in autofit's "
        f"catalog; known models: {', '.join(known_models())}"
    )


def resolve_config(spec: str | os.PathLike) -> tuple[str, PretrainedConfig]:
    """(canonical model id, config) for a local directory, a cached hub id, or a catalog id/alias."""
    model_id, config, _ = _resolve(spec)
    return model_id, config


def default_task(config: PretrainedConfig) -> str:
    """"causal-lm" for decoder-only families (gpt2, llama, qwen2, mistral, ...), else "classification"."""
    # Decoder-only = has a causal-LM head but no masked-LM head (bert/roberta have both: they are encoders).
    model_type = config.model_type
    decoder_only = (
        model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
        and not getattr(config, "is_encoder_decoder", False)
    )
    return "causal-lm" if decoder_only else "classification"


HEAD_SUFFIXES = {"ForCausalLM": "causal-lm", "LMHeadModel": "causal-lm", "ForSequenceClassification": "classification",
                 "ForTokenClassification": "token-classification"}


def head_task(model: torch.nn.Module) -> str | None:
    """The task a live model's head trains, read off its class name (peft's wrappers included); None when
    the name does not say."""
    name = type(model).__name__
    return next((task for suffix, task in HEAD_SUFFIXES.items() if name.endswith(suffix)), None)


def infer_task(model: object, config: PretrainedConfig, *, labelled: bool = False) -> str:
    """The task to train when none is given: a live model's head; else the head a saved model's config names
    (config.architectures), unless that is a language-model head and the data has labels (a pretrained LM
    fine-tuned as a classifier, as HF's run_glue does with gpt2); else the family's default (default_task)."""
    if isinstance(model, torch.nn.Module) and head_task(model) is not None:
        return head_task(model)
    named = next((task for arch in getattr(config, "architectures", None) or []
                  for suffix, task in HEAD_SUFFIXES.items() if arch.endswith(suffix)), None)
    if named not in (None, "causal-lm"):
        return named
    if labelled:
        return "classification"
    return named or default_task(config)


def check_module(model: torch.nn.Module) -> None:
    """A live model autofit can plan: a Hugging Face model (it has a config) with float32 weights, which
    autofit keeps as master weights while autocast computes in half precision."""
    if not hasattr(model, "config"):
        raise ValueError(f"autofit plans Hugging Face models: pass a PreTrainedModel, a config, a model id or a "
                         f"path, not a plain {type(model).__name__} (it has no .config)")
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("the model's weights are on the meta device (no values): load them first, e.g. with "
                         "from_pretrained, or pass its config or id")
    if getattr(model, "base_model", None) is model and head_task(model) is None:
        raise ValueError(f"{type(model).__name__} has no task head, so its output has no loss to train: pass a "
                         "model with one (e.g. AutoModelForSequenceClassification), or its id or config")
    floats = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if floats and floats <= {torch.float16, torch.bfloat16}:
        raise ValueError(f"the model's weights are {sorted(map(str, floats))[0].removeprefix('torch.')}: pass it "
                         "in float32 (model.float()); plans keep fp32 master weights and compute in half "
                         "precision with autocast")


def _head_class(config: PretrainedConfig, task: str):
    """The auto class that builds `config`'s model with `task`'s head."""
    if task not in TASK_HEADS:
        raise UnsupportedTaskError(f"unknown task {task!r}; expected one of: {', '.join(TASK_HEADS)}")
    head, model_types = TASK_HEADS[task]
    if config.model_type not in model_types:
        raise UnsupportedTaskError(f"{config.model_type} models have no {task} head in transformers")
    if task == "causal-lm" and default_task(config) != "causal-lm":
        # transformers has an LM head for bert & co., but they are bidirectional encoders, not causal LMs
        raise UnsupportedTaskError(f"{config.model_type} is an encoder (a masked language model), not a causal "
                                   "LM: fine-tune it for classification")
    return head


def _prepare_config(config: PretrainedConfig, task: str, num_labels: int) -> PretrainedConfig:
    """A copy of `config` ready for `task`: label count, and a pad id so batched classification works."""
    config = copy.deepcopy(config)  # from_config/from_pretrained mutate it (dtype, attention choice)
    if task != "causal-lm":
        config.num_labels = num_labels
    # gpt2/llama have no pad token; sequence classification finds each row's last token via pad_token_id.
    config.pad_token_id = padding_id(config)
    return config


def padding_id(config: PretrainedConfig) -> int | None:
    """The id a batch for `config`'s model pads with: its pad token, else its end-of-text token (the first,
    when it names several); None with neither."""
    pad = getattr(config, "pad_token_id", None)
    if pad is not None:
        return pad
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, list | tuple):
        return eos[0] if eos else None
    return eos


def build_model(
    config: PretrainedConfig,
    task: str = "classification",
    *,
    device: str = "cpu",
    num_labels: int = 2,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """A randomly initialised fp32 model with `task`'s head; device "meta" allocates nothing."""
    head = _head_class(config, task)
    config = _prepare_config(config, task, num_labels)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    # fp32 always: the catalog's `dtype` is the checkpoint's storage dtype, not the training dtype.
    with torch.device(device):
        return head.from_config(config, dtype=torch.float32, **kwargs)


@_hub_offline()
def load_model(spec: str | os.PathLike, task: str = "classification", num_labels: int = 2, *,
               nf4: dict | None = None) -> PreTrainedModel:
    """Pretrained weights from a local directory or the HF cache; else random weights (with a warning).

    `nf4` (`double_quant`, `compute_dtype`) loads the blocks' linear layers straight into 4-bit NF4 with
    transformers' BitsAndBytesConfig, the layers quantization.quantize_block_linears would quantize (random
    weights are built unquantized: the executor quantizes them in memory)."""
    model_id, config, weights = _resolve(spec)
    head = _head_class(config, task)
    if weights is None:
        where = (f"{model_id} has a config.json but no weights file ({', '.join(WEIGHT_FILES[::2])})"
                 if _local_dir(os.fspath(spec)) else f"no pretrained weights for {model_id} on this machine")
        warnings.warn(f"{where}: its weights are RANDOM", RandomWeightsWarning)
        return build_model(config, task, num_labels=num_labels)
    saved_labels = getattr(config, "num_labels", None)
    config = _prepare_config(config, task, num_labels)
    has_head = any("Classification" in name for name in getattr(config, "architectures", None) or ())
    if task != "causal-lm" and has_head and saved_labels not in (None, num_labels):
        classes = "1 class (a regression)" if num_labels == 1 else f"{num_labels} classes"
        log.warning(f"{model_id} was saved with a {saved_labels}-label head and the data has {classes}: a new "
                    "head is trained")
    try:
        # A classifier checkpoint fine-tuned for other labels: its head is replaced by a new one of the right
        # size (randomly initialised, as for any new head); the rest of the weights load as usual.
        extra = {"quantization_config": _nf4_config(config, task, **nf4)} if nf4 else {}
        return head.from_pretrained(weights, config=config, local_files_only=True, dtype=torch.float32,
                                    ignore_mismatched_sizes=True, **extra)
    except (OSError, RuntimeError, ValueError, SafetensorError) as error:  # a damaged or foreign weights file
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        found = [name for name in WEIGHT_FILES if isinstance(weights, Path) and (weights / name).is_file()]
        what = weights / found[0] if found else f"the weights of {model_id}"
        raise ModelNotFoundError(f"cannot load {what}: {type(error).__name__}: {first}") from None


def _nf4_config(config: PretrainedConfig, task: str, *, double_quant: bool, compute_dtype: torch.dtype):
    """The BitsAndBytesConfig for `config`'s model with `task`'s head, worked out on a meta-device build."""
    from autofit.techniques.quantization import load_config

    skeleton = build_model(config, task, device="meta", num_labels=getattr(config, "num_labels", 2))
    return load_config(skeleton, double_quant=double_quant, compute_dtype=compute_dtype)


@_hub_offline()
def load_tokenizer(spec: str | os.PathLike) -> PreTrainedTokenizerFast | None:
    """The (fast) tokenizer from a local model or tokenizer directory or the HF cache; None when none is on
    this machine. A directory with neither config.json nor tokenizer files is a ModelNotFoundError, as
    resolve_config says: its cause is a wrong --model, not a missing tokenizer."""
    spec = os.fspath(spec)
    source = _tokenizer_source(spec)
    # Without vocabulary files AutoTokenizer would build an empty tokenizer from config.json alone.
    if not _has_file(source, TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True, use_fast=True)
    except (OSError, ValueError, ImportError):  # unreadable files, or a slow-only tokenizer lacking its deps
        return None


def _tokenizer_source(spec: str) -> Path | str:
    """The model or tokenizer directory `spec` names, else `spec` itself (a hub id for the cache)."""
    local = _local_dir(spec)
    if local is not None:
        return local
    path = Path(spec).expanduser()
    if not path.is_dir():
        return spec
    if _has_file(path, TOKENIZER_FILES):
        return path.resolve()  # a tokenizer saved on its own: no config.json, but its vocabulary
    # Neither a model nor a tokenizer: unless `spec` is also a cached or catalog id (an empty folder named
    # "gpt2" in the working directory), say what resolve_config says rather than "no tokenizer".
    _resolve(spec)
    return spec
