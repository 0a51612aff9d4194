"""Split one real training step into per-block windows and record what happens in each.

The forward timeline is cut at each layer's forward pre-hook and after the last layer's forward hook:
`fwd:emb` (model start .. layer 0 starts: embeddings and the glue before the layers: masks, rotary
tables, relative-position embeddings), `fwd:layer<i>`, `fwd:head` (last layer ends .. the loss exists and
the ModelOutput is dropped). Backward is cut by gradient hooks on the hidden states between blocks:
`bwd:head` (backward starts .. gradient of the last layer's output is ready), `bwd:layer<i>` (.. gradient of
its input is ready), `bwd:emb` (.. backward returns).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from autofit.knobs import Precision
from autofit.profiler.tracker import LiveBytes, SavedBytes
from autofit.techniques.kv_cache import no_kv_cache
from autofit.techniques.precision import autocast_dtype



@dataclass
class Window:
    """What one block did during its forward or backward."""

    start_live: int = 0
    end_live: int = 0
    peak: int = 0
    saved_live_start: int = 0
    """Bytes of saved-for-backward storages alive when the window opened."""
    saved_live_end: int = 0
    """Bytes of saved-for-backward storages alive when the window closed."""
    grads_start: int = 0
    """Bytes of parameter gradients held when the window opened (backward windows)."""
    flops: float = 0.0
    seconds: float = 0.0
    output: int = 0
    """Bytes of the hidden state the block hands on (forward windows)."""


class WallClock:
    """Host time: exact on the CPU, where ops run on the calling thread."""

    @staticmethod
    def mark() -> float:
        return time.perf_counter()

    @staticmethod
    def seconds(start: float, end: float) -> float:
        return end - start


class EventClock:
    """CUDA events on the current stream: the GPU's own time between two points, read after the step, so the
    step runs without a host sync at every window (which would add the launch latency to each block)."""

    @staticmethod
    def mark() -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @staticmethod
    def seconds(start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        end.synchronize()
        return start.elapsed_time(end) / 1000.0


class StepStopped(Exception):
    """Raised out of a step when the window a Timeline was asked to stop after closes."""


class Timeline:
    """The windows of one step. `enter(name)` closes the open window and opens the next one.

    `backward_reads`: the backward windows the caller reads (None: all). Once each of them that this step
    opens has closed, StepStopped ends the step: nothing done after a window changes what it measured, so a
    run that reads only the first windows of a backward need not run the rest."""

    def __init__(self, params: list[nn.Parameter], tracker: LiveBytes | None = None,
                 clock: WallClock | EventClock | None = None, backward_reads: set[str] | None = None) -> None:
        self.params = params
        self.backward_reads = backward_reads
        self.expected: set[str] = set()
        """Backward windows a gradient hook will open."""
        self.tracker = tracker
        self.saved: SavedBytes | None = None
        self.clock = clock or WallClock()
        self._spans: list[tuple[Window, object, object]] = []
        """(window, start mark, end mark): their seconds are read by `finish`, after the step."""
        self.windows: dict[str, Window] = {}
        self.batch_unsaved = 0
        """Bytes of the batch's tensors that no op saved (attention mask, unsaved labels)."""
        self.current: str | None = None
        self._started: object = 0.0
        self._flops_start = 0.0

    def phase(self) -> str:
        return self.current or "outside"

    def enter(self, name: str) -> None:
        self.close()
        if name.startswith("bwd:") and self.backward_reads is not None and name not in self.backward_reads:
            coming = (self.backward_reads & self.expected) - self.windows.keys()
            if not coming:
                raise StepStopped(name)
        window = self.windows.setdefault(name, Window())
        if self.tracker is not None:
            self.tracker.reset_peak()
            window.start_live = self.tracker.live
            self._flops_start = self.tracker.flops
            if name.startswith("bwd:"):
                window.grads_start = grad_bytes(self.params)
        if self.saved is not None:
            window.saved_live_start = self.saved.live
        self.current = name
        self._started = self.clock.mark()

    def close(self) -> None:
        if self.current is None:
            return
        window = self.windows[self.current]
        self._spans.append((window, self._started, self.clock.mark()))
        if self.saved is not None:
            window.saved_live_end = self.saved.live
        if self.tracker is not None:
            window.end_live, window.peak = self.tracker.live, self.tracker.peak
            window.flops = self.tracker.flops - self._flops_start
        self.current = None

    def finish(self) -> dict[str, Window]:
        """The windows, with the seconds of every span read off the clock (each window's last)."""
        for window, start, end in self._spans:
            window.seconds = self.clock.seconds(start, end)
        self._spans.clear()
        return self.windows


def grad_bytes(params: list[nn.Parameter]) -> int:
    storages = {id(s): s.nbytes() for p in params if p.grad is not None for s in [p.grad.untyped_storage()]}
    return sum(storages.values())


def _first_tensor(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return next((v for v in value if isinstance(v, torch.Tensor)), None)
    return None


def _hidden_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    return _first_tensor(args) if _first_tensor(args) is not None else _first_tensor(kwargs.get("hidden_states"))


def _nbytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.untyped_storage().nbytes()


def _detached(output, hidden: torch.Tensor):
    """`output` with its hidden state cut from the graph: the head then sees an input needing no grad."""
    if isinstance(output, torch.Tensor):
        return hidden.detach()
    if isinstance(output, tuple):
        return tuple(hidden.detach() if v is hidden else v for v in output)
    return output


def _on_grad(timeline: Timeline, tensor: torch.Tensor | None, name: str) -> None:
    """Open window `name` when the gradient of `tensor` is complete (its producer's backward is next)."""
    if tensor is not None and tensor.requires_grad:
        timeline.expected.add(name)
        tensor.register_hook(lambda grad: timeline.enter(name))


@contextmanager
def windows_on(layers: nn.ModuleList, timeline: Timeline, detach_last: bool = False) -> Iterator[None]:
    """Hooks on every layer that move `timeline` from block to block, forward and backward.

    `detach_last` cuts the last layer's output from the graph, as if every layer were frozen."""
    last = len(layers) - 1

    def pre_hook(index: int):
        def hook(module, args, kwargs):
            hidden = _hidden_input(args, kwargs)
            if index == 0:
                timeline.windows[timeline.phase()].output = _nbytes(hidden)
                _on_grad(timeline, hidden, "bwd:emb")
            timeline.enter(f"fwd:layer{index}")
        return hook

    def post_hook(index: int):
        def hook(module, args, kwargs, output):
            hidden = _first_tensor(output)
            timeline.windows[timeline.phase()].output = _nbytes(hidden)
            _on_grad(timeline, hidden, f"bwd:layer{index}")
            if index == last:
                timeline.enter("fwd:head")
                if detach_last and hidden is not None:
                    return _detached(output, hidden)
        return hook

    handles = []
    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre_hook(index), with_kwargs=True))
        handles.append(layer.register_forward_hook(post_hook(index), with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_step(model: nn.Module, layers: nn.ModuleList, batch: dict[str, torch.Tensor], timeline: Timeline,
             *, precision: str, device_type: str, backward: bool = True, detach_last: bool = False) -> None:
    """One forward and backward as a training loop runs them (`loss = model(**batch).loss`), windowed."""
    dtype = autocast_dtype(Precision(precision))
    autocast = torch.autocast(device_type, dtype=dtype) if dtype is not None else nullcontext()
    saved_hooks = timeline.saved.hooks() if timeline.saved is not None else nullcontext()
    with windows_on(layers, timeline, detach_last):
        timeline.enter("fwd:emb")
        with saved_hooks, autocast, no_kv_cache(model):  # as the executor trains: no key/value cache
            loss = model(**batch).loss  # the ModelOutput (and its logits) is dropped right here
        timeline.windows["fwd:head"].output = _nbytes(loss)
        timeline.close()
        if timeline.saved is not None:
            timeline.batch_unsaved = sum({id(s): s.nbytes() for t in batch.values()
                                          if (s := t.untyped_storage()) not in timeline.saved}.values())
        if not backward:
            return
        timeline.enter("bwd:head")
        loss.backward()
        timeline.close()
