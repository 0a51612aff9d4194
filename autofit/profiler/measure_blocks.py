"""Measure embeddings, one layer and the head of a model at one (precision, batch, seq).

The layer stack is cut to two identical layers for the measurement: layer 1 is "the" layer (its input needs
a gradient), layer 0 is the lowest trainable layer. Bytes that layer 0 saves beyond layer 1 are the model's
shared per-step tensors (masks, rotary tables, relative-position embeddings) that whichever layer uses them
first saves; they are charged to the embeddings, which sit below every layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from pydantic import BaseModel, create_model
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from autofit.layers import ModelLayout
from autofit.models import UnsupportedTaskError
from autofit.profiler.instrument import EventClock, StepStopped, Timeline, WallClock, Window, run_step
from autofit.profiler.schema import MEASURED_QUANTITIES
from autofit.profiler.tracker import LiveBytes, SavedBytes
from autofit.techniques import checkpointing

KEEP_LAYERS = 2
WINDOWS = {"embeddings": "emb", "layer": "layer{last}", "head": "head"}


ShapeSample = create_model(
    "ShapeSample",
    __doc__="Bytes (and forward FLOPs) of each block kind at one shape and precision, one dict per measured "
            "quantity (schema.MEASURED_QUANTITIES; see BlockActivations), keyed by block kind.",
    batch=(int, ...), seq=(int, ...), flops=(dict[str, float], ...),
    **{quantity: (dict[str, float], ...) for quantity in MEASURED_QUANTITIES},
)


class TimeSample(BaseModel):
    batch: int
    seq: int
    forward: dict[str, float]
    backward: dict[str, float]


@dataclass
class Subject:
    """The model made ready to measure: two layers, train mode, no checkpointing."""

    model: nn.Module
    layers: nn.ModuleList
    embedding_params: list[nn.Parameter]
    task: str

    @property
    def layer_window(self) -> str:
        return f"layer{len(self.layers) - 1}"

    def window(self, kind: str) -> str:
        return WINDOWS[kind].format(last=len(self.layers) - 1)


@contextmanager
def prepared(model: nn.Module, layout: ModelLayout, task: str, *, whole: bool = True) -> Iterator[Subject]:
    """Truncate the layer stack, switch to train mode, switch off checkpointing and, with `whole`, make every
    weight trainable (a plain profile is of the whole model training: the memory model freezes what a plan
    freezes; an adapters' twin keeps peft's frozen base); undo all of it after."""
    layers = layout.layers
    tail = list(layers[KEEP_LAYERS:])
    params = list(model.parameters())
    requires_grad = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    was_training = model.training
    checkpointing = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    config = model.config
    pad_token_id = getattr(config, "pad_token_id", None)
    try:
        del layers[KEEP_LAYERS:]
        model.train()
        for p in params if whole else ():
            if p.is_floating_point():
                p.requires_grad_(True)
        for module in checkpointing:
            module.gradient_checkpointing = False
        if task == "classification" and pad_token_id is None:
            config.pad_token_id = 0  # decoder classifiers find each row's last token through it
        yield Subject(model, layers, list(layout.embedding_params), task)
    finally:
        layers.extend(tail)
        model.train(was_training)
        for module in checkpointing:
            module.gradient_checkpointing = True
        config.pad_token_id = pad_token_id
        for p, flag, grad in zip(params, requires_grad, grads):
            p.requires_grad_(flag)
            p.grad = grad


@contextmanager
def frozen(params: list[nn.Parameter]) -> Iterator[None]:
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


@contextmanager
def masks_readable(readable: bool) -> Iterator[None]:
    """Let transformers read fake attention masks (readable=True) or not (False: its default).

    Transformers skips building the 4-D attention mask when it can read that the 2-D one is all ones (no
    padding), but takes a fake tensor for tracing and then always builds it. Unreadable masks measure a batch
    with pad tokens; readable ones a batch of equal lengths (LiveBytes answers the mask's .all() with True)."""
    try:
        import transformers.masking_utils as masking
    except ImportError:  # transformers < 4.53 has no shared mask code; padding then changes nothing here
        masking = None
    original = getattr(masking, "is_tracing", None)
    if not readable or original is None:
        yield
        return
    masking.is_tracing = lambda tensor=None: original(None if isinstance(tensor, FakeTensor) else tensor)
    try:
        yield
    finally:
        masking.is_tracing = original


def make_batch(config, task: str, batch: int, seq: int, device: str) -> dict[str, torch.Tensor]:
    """Synthetic inputs: random ids, an all-ones mask, labels as the task's loss expects them."""
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task == "causal-lm":
        inputs["labels"] = ids.clone()  # a collator's copy: its own storage, as in training
    elif task == "classification":
        num_labels = getattr(config, "num_labels", 2)
        if getattr(config, "problem_type", None) == "multi_label_classification":
            inputs["labels"] = torch.rand(batch, num_labels, device=device).round()
        elif num_labels == 1:
            inputs["labels"] = torch.randn(batch, device=device)
        else:
            inputs["labels"] = torch.randint(0, num_labels, (batch,), device=device)
    elif task == "token-classification":
        inputs["labels"] = torch.randint(0, getattr(config, "num_labels", 2), (batch, seq), device=device)
    else:
        raise UnsupportedTaskError(f"cannot profile task {task!r}; expected 'classification', 'causal-lm' or "
                                   "'token-classification'")
    return inputs


def _memory_run(subject: Subject, precision: str, shape: tuple[int, int], device_type: str,
                *, count_flops: bool, below_frozen: bool, padded: bool, checkpointed: bool = False,
                backward_reads: set[str] | None = None, backward: bool = True) -> Timeline:
    """One windowed step; its backward only until the windows in `backward_reads` have closed (None: all of
    it), none without `backward` (or `below_frozen`: a forward only)."""
    if checkpointed:  # the executor's own checkpointing, on the measured layer only
        checkpointing.apply(subject.model, [len(subject.layers) - 1])
        try:
            return _memory_run(subject, precision, shape, device_type, count_flops=count_flops,
                               below_frozen=below_frozen, padded=padded, backward_reads=backward_reads,
                               backward=backward)
        finally:
            checkpointing.remove(subject.model)
    params = list(subject.model.parameters())
    for p in params:  # each run starts without gradients, as a training step after zero_grad does
        p.grad = None
    tracker = LiveBytes(count_flops=count_flops,
                        existing=[*params, *subject.model.buffers()])
    timeline = Timeline(params, tracker, backward_reads=backward_reads)
    with tracker, masks_readable(not padded):
        timeline.saved = SavedBytes(params, timeline.phase)
        batch = make_batch(subject.model.config, subject.task, *shape, device_type)
        try:
            run_step(subject.model, subject.layers, batch, timeline, precision=precision,
                     device_type=device_type, backward=backward and not below_frozen,
                     detach_last=below_frozen)
        except StepStopped:
            pass
        del batch
    return timeline


def measure_saved(subject: Subject, precision: str, shape: tuple[int, int], device_type: str,
                  padded: bool = True) -> dict[str, float]:
    """Bytes each block kind saves for backward at one shape: one full step, no other quantity. `padded`
    as in measure_memory (a real model reads its all-ones mask: compare it with a twin at padded=False)."""
    # Saved tensors are all counted by the forward's end: no backward needed.
    return _saved_by_kind(subject, _memory_run(subject, precision, shape, device_type, count_flops=False,
                                               below_frozen=False, padded=padded, backward=False))


def _saved_by_kind(subject: Subject, full: Timeline) -> dict[str, float]:
    saved = {k: float(full.saved.by_phase[f"fwd:{subject.window(k)}"]) for k in WINDOWS}
    if subject.layer_window != "layer0":  # shared tensors that layer 0 saves are charged to the embeddings
        saved["embeddings"] += max(0, full.saved.by_phase["fwd:layer0"] - saved["layer"])
    return saved


def measure_memory(subject: Subject, precision: str, shape: tuple[int, int], device_type: str,
                   count_flops: bool = False, padded: bool = True) -> ShapeSample:
    """Three runs: a full step with everything trainable; the same with the measured layer checkpointed; and
    a forward with the embeddings and layer 0 frozen and the last layer's output detached (layer 1 and the
    head then sit right above a frozen boundary).
    `padded`: a batch with pad tokens, or one of equal lengths (see masks_readable)."""
    layer = subject.layer_window
    # Backward windows read from each run: below them, the layers' backward (and the embeddings', in the
    # checkpointed run, or when frozen as under LoRA) need not run.
    full = _memory_run(subject, precision, shape, device_type, count_flops=count_flops, below_frozen=False,
                       padded=padded, backward_reads={f"bwd:{subject.window(k)}" for k in WINDOWS})
    recomputing = _memory_run(subject, precision, shape, device_type, count_flops=False, below_frozen=False,
                              padded=padded, checkpointed=True, backward_reads={f"bwd:{layer}"})
    two_layers = layer != "layer0"
    with frozen(subject.embedding_params + (list(subject.layers[0].parameters()) if two_layers else [])):
        first = _memory_run(subject, precision, shape, device_type, count_flops=False, below_frozen=True,
                            padded=padded)
    saved = _saved_by_kind(subject, full)
    fwd = {k: full.windows[f"fwd:{subject.window(k)}"] for k in WINDOWS}
    # No backward reaches frozen embeddings (LoRA's base): their window never opens, and holds nothing.
    bwd = {k: full.windows.get(f"bwd:{subject.window(k)}", Window()) for k in WINDOWS}
    resident = {k: float(max(0, w.end_live - w.saved_live_end - w.output - full.batch_unsaved))
                for k, w in fwd.items()}
    # What the first trainable layer above frozen ones finds live beyond its own resident: the embeddings'
    # output, which no frozen layer saved but the model's code still references.
    above = first.windows[f"fwd:{layer}"]
    held = max(0.0, above.end_live - above.saved_live_end - above.output - first.batch_unsaved - resident["layer"])
    return ShapeSample(
        batch=shape[0], seq=shape[1], saved=saved,
        saved_first_trainable={"embeddings": saved["embeddings"],
                               "layer": float(first.saved.by_phase[f"fwd:{layer}"]),
                               "head": float(first.saved.by_phase["fwd:head"])},
        output={k: float(w.output) for k, w in fwd.items()},
        forward_transient={k: float(max(0, w.peak - w.end_live)) for k, w in fwd.items()},
        backward_transient={k: float(max(0, w.peak - w.saved_live_start - w.grads_start - full.batch_unsaved))
                            for k, w in bwd.items()},
        resident=resident,
        held={"embeddings": held if two_layers else 0.0, "layer": 0.0, "head": 0.0},
        **_checkpointed(recomputing, full, layer, saved["layer"]),
        flops={k: w.flops for k, w in fwd.items()},
    )


def _checkpointed(recomputing: Timeline, full: Timeline, layer: str, saved: float) -> dict[str, dict[str, float]]:
    """The checkpointed layer's quantities, from the run that checkpoints it against the one that does not."""
    forward, backward = recomputing.windows[f"fwd:{layer}"], recomputing.windows[f"bwd:{layer}"]
    # Live once the forward has returned with the layer checkpointed, against without: its saved tensors
    # are gone, its arguments stay (the input hidden state and whatever else the model passes, such as
    # masks). Autocast's weight copies are gone by then too: its cache empties when the forward returns.
    kept = recomputing.windows["fwd:head"].end_live - full.windows["fwd:head"].end_live + saved
    # What the layer's own forward left beyond its output until then: autocast's cached weight copies.
    leftover = max(0.0, forward.end_live - forward.start_live - forward.output)
    # Above everything live when its backward opens, less the recompute's saved bytes. Of what is live there
    # unsaved, only the gradient flowing in (live in the plain run too) belongs to this transient: what
    # checkpointing keeps alive unsaved (the layer's input, DeBERTa's int64 relative positions) the memory
    # model counts as the layer's kept bytes.
    flowing_in = min(_unsaved_live(backward, recomputing), _unsaved_live(full.windows[f"bwd:{layer}"], full))
    recompute = backward.peak - backward.start_live + flowing_in - saved
    quantities = {
        "checkpointed_forward_transient": max(0, forward.peak - forward.end_live),
        "recompute_backward_transient": max(0, recompute),
        "checkpoint_args": max(0.0, kept - full.windows[f"fwd:{layer}"].output),
        "checkpointed_leftover": leftover,
    }
    return {name: {"embeddings": 0.0, "layer": float(value), "head": 0.0} for name, value in quantities.items()}


def _unsaved_live(window: Window, timeline: Timeline) -> int:
    """Bytes live when `window` opened that are no saved tensor, no parameter gradient and no batch tensor."""
    return window.start_live - window.saved_live_start - window.grads_start - timeline.batch_unsaved


def measure_time(subject: Subject, precision: str, shape: tuple[int, int], device_type: str,
                 repeats: int = 3) -> TimeSample:
    """Fastest per-block seconds of `repeats` plain steps (no byte tracking), after the caller's warm-up."""
    runs = []
    params = list(subject.model.parameters())
    for _ in range(repeats):
        timeline = Timeline(params, clock=EventClock() if device_type == "cuda" else WallClock())
        batch = make_batch(subject.model.config, subject.task, *shape, device_type)
        run_step(subject.model, subject.layers, batch, timeline, precision=precision, device_type=device_type)
        subject.model.zero_grad(set_to_none=True)
        runs.append(timeline.finish())
    # The fastest repeat: other processes only ever add time, so the minimum is the least disturbed.
    fastest = {d: {k: min(r[f"{d}:{subject.window(k)}"].seconds for r in runs) for k in WINDOWS}
              for d in ("fwd", "bwd")}
    return TimeSample(batch=shape[0], seq=shape[1], forward=fastest["fwd"], backward=fastest["bwd"])
