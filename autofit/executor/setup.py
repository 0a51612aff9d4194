"""Set a run up once: accelerate's state, the plan's techniques in the one order that works, the optimizer.

Order: adapters (peft puts them on the stored base) or freezing, then checkpointing (it wraps the layers'
forward on the instance), then, with several processes, DDP or FSDP2 around the result (techniques/sharding.py:
FSDP shards a twin, DDP wraps the module), and the optimizer over what that exposes (FSDP's sharded
parameters). accelerate picks the device and supplies the GradScaler where it makes one (CUDA fp16).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import set_seed
import torch
from torch import nn

from autofit.executor.distributed import World, check_world
from autofit.executor.loop import StepContext
from autofit.executor.validate import ExecutorInputError, run_device
from autofit.models import padding_id
from autofit.plan import Plan
from autofit.techniques import adapter, checkpointing, freeze, sharding
from autofit.techniques import optimizer as optim
from autofit.techniques import precision as amp
from autofit.techniques.padding import PaddingCollator, align_model_padding

log = logging.getLogger("autofit")


def make_accelerator(mixed_precision: str, *, cpu: bool) -> Accelerator:
    """An Accelerator for this run. accelerate's state is a process-wide singleton fixed by the first
    Accelerator; a later run in the same process (a notebook) with another precision resets it, keeping the
    process group of a launched run (its processes are still the same)."""
    try:
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    except ValueError:
        launched = bool(PartialState._shared_state) and PartialState().num_processes > 1
        AcceleratorState._reset_state(reset_partial_state=not launched)
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


@dataclass
class Setup:
    trained: nn.Module
    """What trains: the model, or under LoRA peft's wrapper around it."""
    wrapped: nn.Module
    """What runs forward: `trained`, or with several processes its DDP wrapper or FSDP twin."""
    ctx: StepContext
    collator: PaddingCollator


def set_up(model: nn.Module, plan: Plan, world: World, *, seed: int, lr: float, weight_decay: float,
           max_grad_norm: float | None, pad_token_id: int | None) -> Setup:
    """Apply the plan's techniques to `model` and build what a step needs."""
    knobs, device_type = plan.knobs, run_device(plan).type
    precision = amp.resolve(knobs.precision, device_type)  # bf16 on an old card runs as fp16
    accelerator = make_accelerator(amp.accelerate_mixed_precision(precision), cpu=device_type == "cpu")
    check_world(plan, accelerator.num_processes)
    trained = model
    if knobs.adapter == "lora":
        set_seed(seed)  # the adapters' initial weights follow the seed
        trained = adapter.prepare(model, knobs, plan.task, precision_dtype=amp.autocast_dtype(precision))
    else:
        freeze.apply(model, knobs)
    checkpointing.apply(model, knobs.checkpoint_layers)
    sharded = world.distributed and knobs.strategy == "fsdp"
    # FSDP shards a twin aliasing the model's tensors, and fully_shard moves only the shards to the device:
    # the whole model waits on the CPU (on the device it would be the replica FSDP saves)
    trained.to("cpu" if sharded else accelerator.device)
    if accelerator.device.type == "cuda":
        # a model cast or quantized on the card left its fp32 blocks in the allocator's cache: the plan's
        # reserved peak starts from what the run holds, not from what setting it up once held
        torch.cuda.empty_cache()
    trained.train()
    wrapped = sharding.wrap(trained, knobs, world.size, accelerator.device) if world.distributed else trained
    try:
        optimizer = optim.build_optimizer(wrapped, knobs, lr=lr, weight_decay=weight_decay)
    except (optim.OptimizerUnavailableError, optim.NoTrainableParametersError) as error:
        raise ExecutorInputError(str(error)) from None
    scaler = accelerator.scaler or amp.grad_scaler(precision, device_type)
    if sharded and scaler.is_enabled():  # each process sees only its shard's overflow: all must skip together
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        scaler = ShardedGradScaler(device_type)
    ddp = world.distributed and not sharded
    ctx = StepContext(wrapped, optimizer, scaler, precision, accelerator.device, plan.task, max_grad_norm,
                      processes=world.size, no_sync=wrapped.no_sync if ddp else None, grads_to_none=not ddp)
    pad_token_id = _pad_id(model, pad_token_id)
    note = align_model_padding(model, pad_token_id, plan.task)
    if note and world.main:
        log.info(note)
    return Setup(trained, wrapped, ctx, PaddingCollator(pad_token_id, knobs.pad_to_multiple_of, task=plan.task))


def _pad_id(model: nn.Module, tokenizer_pad: int | None) -> int:
    """The id batches are padded with: the tokenizer's pad token, else the config's, else its end-of-text
    token (as a model built from a config pads: gpt2 and llama have no pad token), else 0; one the
    embeddings hold (a config may keep gpt2's 50256 under a small vocabulary)."""
    from_config = padding_id(model.config)
    found = next((i for i in (tokenizer_pad, from_config) if i is not None), 0)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    if vocab is not None and not 0 <= found < vocab:
        raise ExecutorInputError(f"the padding id {found} (the tokenizer's pad token, else the config's pad or "
                                 f"end-of-text id) is not in the model's vocabulary of {vocab}: set "
                                 "tokenizer.pad_token or config.pad_token_id")
    return found
