"""Checks that run before training touches anything: each bad input is one clear ExecutorInputError."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from autofit.data import TokenizedData
from autofit.intmath import is_whole
from autofit.layers import UnmappableModelError, find_layout
from autofit.limits import max_sequence_length
from autofit.models import head_task
from autofit.plan import Plan
from autofit.techniques import adapter
from autofit.techniques import precision as amp
from autofit.techniques.quantization import logical_numel
from autofit.techniques.bucketing import padded_length

PARAM_TOLERANCE = 0.01
"""Relative difference in parameter count accepted between plan and model (a head with another label
count differs by a few thousand parameters; another model size differs by far more)."""


class ExecutorInputError(ValueError):
    """Input the executor cannot train with: empty data, a plan for another model, an impossible knob."""


def run_device(plan: Plan) -> torch.device:
    """The device the plan was made for; a CUDA plan without a visible CUDA device is an error."""
    if plan.device.kind == "cuda":
        if not torch.cuda.is_available():
            raise ExecutorInputError(f"the plan is for a CUDA device ({plan.device.name}) but none is visible; "
                                     "plan again for the cpu or run where the GPU is")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _count(value: object) -> bool:
    """A whole number >= 1 (an int, not a bool or 1.5: a fractional epoch would train and then fail)."""
    return is_whole(value) and value >= 1


def check_inputs(model: PreTrainedModel, plan: Plan, train: TokenizedData, eval: TokenizedData | None,
                 *, epochs: int, max_steps: int | None, output_dir: str | None,
                 checkpoint_every: int | None, resume: bool) -> None:
    """Raise ExecutorInputError for anything that would fail later or silently train the wrong thing."""
    if len(train) == 0:
        raise ExecutorInputError("the training data is empty")
    if eval is not None and len(eval) == 0:
        raise ExecutorInputError("the evaluation data is empty (pass eval=None to skip evaluation)")
    if not _count(epochs) or (max_steps is not None and not _count(max_steps)):
        raise ExecutorInputError(f"epochs and max_steps must be whole numbers >= 1, got epochs={epochs!r}, "
                                 f"max_steps={max_steps!r}")
    if (checkpoint_every is not None or resume) and output_dir is None:
        raise ExecutorInputError("checkpoint_every (--checkpoint-every) and resume (--resume) need an output_dir "
                                 "(--output-dir) to keep checkpoints in")
    if checkpoint_every is not None and not _count(checkpoint_every):
        raise ExecutorInputError(f"checkpoint_every must be a whole number >= 1, got {checkpoint_every!r}")
    try:  # first: a model with adapters or 4-bit weights in it would fail the parameter count below unclearly
        amp.resolve(plan.knobs.precision, run_device(plan).type)
        adapter.check_model(model, plan.knobs, run_device(plan))
    except (amp.PrecisionError, adapter.AdapterError, UnmappableModelError) as error:
        raise ExecutorInputError(str(error)) from None
    _check_model_matches(model, plan)
    for name, data in (("training", train), ("evaluation", eval)):
        if data is not None:
            _check_data_fits(model, plan, data, name)


def _check_model_matches(model: PreTrainedModel, plan: Plan) -> None:
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if model_type != plan.model_type:
        raise ExecutorInputError(f"the plan is for a {plan.model_type} model ({plan.model_id}), "
                                 f"this model is {model_type}")
    try:
        num_layers = find_layout(model).num_layers
    except UnmappableModelError as error:
        raise ExecutorInputError(str(error)) from None
    if num_layers != plan.num_layers:
        raise ExecutorInputError(f"the plan is for {plan.num_layers} layers ({plan.model_id}), "
                                 f"this model has {num_layers}")
    num_params = sum(logical_numel(p) for p in model.parameters())  # a 4-bit weight packs two per byte
    if abs(num_params - plan.num_params) > PARAM_TOLERANCE * plan.num_params:
        raise ExecutorInputError(f"the plan is for {plan.num_params:,} parameters ({plan.model_id}), "
                                 f"this model has {num_params:,}")
    head = head_task(model)
    if head is not None and head != plan.task:
        raise ExecutorInputError(f"the plan trains {plan.task}, but this model ({type(model).__name__}) has a "
                                 f"{head} head")
    try:
        plan.knobs.validate_for(num_layers)
    except ValueError as error:
        raise ExecutorInputError(f"the plan's knobs do not fit this model: {error}") from None


def _check_data_fits(model: PreTrainedModel, plan: Plan, data: TokenizedData, name: str) -> None:
    config = model.config
    if data.task != plan.task:
        raise ExecutorInputError(f"the {name} data was prepared for {data.task}, the plan is for {plan.task}")
    if any(len(ids) == 0 for ids in data.input_ids):
        raise ExecutorInputError(f"the {name} data has an example with no tokens")
    if data.labels is None and data.task != "causal-lm":
        raise ExecutorInputError(f"the {name} data has no labels, which {data.task} needs")
    if data.labels is not None and len(data.labels) != len(data.input_ids):
        raise ExecutorInputError(f"the {name} data has {len(data.labels)} labels for {len(data.input_ids)} examples")
    vocab = getattr(config, "vocab_size", None)
    top = max(max(ids) for ids in data.input_ids)
    if vocab is not None and top >= vocab:
        raise ExecutorInputError(f"the {name} data has token id {top} but the model's vocabulary has "
                                 f"{vocab} entries: was it tokenized with another model's tokenizer?")
    _check_token_types(config, data, name)
    positions = max_sequence_length(config)
    longest = max(data.lengths)
    if positions is not None and longest > positions:
        raise ExecutorInputError(f"the {name} data has a {longest}-token example but the model takes at most "
                                 f"{positions} positions: prepare it with max_length <= {positions}")
    multiple = plan.knobs.pad_to_multiple_of
    if positions is not None and padded_length(longest, multiple) > positions:
        raise ExecutorInputError(f"the {name} data has a {longest}-token example, padded to a multiple of "
                                 f"{multiple} that is {padded_length(longest, multiple)} tokens, but the model "
                                 f"takes at most {positions} positions: prepare it with max_length <= "
                                 f"{positions // multiple * multiple} or plan with pad_to_multiple_of=None")
    labels = getattr(config, "num_labels", None)
    if data.num_labels is not None and labels is not None and data.task in ("classification",
                                                                            "token-classification") \
            and data.num_labels > labels:
        raise ExecutorInputError(f"the {name} data has class id {data.num_labels - 1} but the model's head has "
                                 f"{labels} classes (ids 0 to {labels - 1})")
    if data.num_labels == 1 and labels not in (None, 1) and data.task == "classification":
        raise ExecutorInputError(f"the {name} data's labels are numbers to regress (one output), but the model's "
                                 f"head has {labels}: build it with num_labels=1, or give class labels")


def _check_token_types(config, data: TokenizedData, name: str) -> None:
    """Segment ids beyond the model's token-type embeddings would index past its table (an IndexError deep in
    the forward); a model without one (type_vocab_size 0) takes none but 0."""
    kinds = getattr(config, "type_vocab_size", None)
    if data.token_type_ids is None or not isinstance(kinds, int):
        return
    top = max((max(ids) for ids in data.token_type_ids if len(ids)), default=0)
    if top >= max(kinds, 1):
        raise ExecutorInputError(f"the {name} data has token type id {top} but the model has {kinds} token "
                                 "types: drop token_type_ids, or tokenize with this model's tokenizer")


def short_data_notes(examples: int, batch_size: int, drop_last: bool) -> list[str]:
    """A note when the data holds less than one step: then each step trains fewer examples than the plan's
    effective batch promises (the plan counted them, but a user reads the batch they asked for)."""
    if examples >= batch_size or drop_last:
        return []
    return [f"the training data has {examples} examples, fewer than the plan's batch of {batch_size}: each step "
            f"trains all {examples}"]
