"""Measured peak memory of a training run: the independent check on the memory model's predictions.

On CUDA the caching allocator keeps exact statistics (`max_memory_allocated`). The CPU has no such
counter, so a live-tensor tracker stands in for it: a TorchDispatchMode sees every tensor an op returns
(forward, backward — the autograd engine runs CPU backward on the calling thread — checkpoint
recomputation, autocast casts, optimizer math, bitsandbytes' ops registered with torch.library),
registers each *storage* once with its size, and subtracts it when the storage dies. Views share their
base's storage, so they are never counted twice. Tensors that exist before the meter starts (weights,
buffers, grads, optimizer state) are found by walking what `track` names.

FSDP2 (sharded parameters, torch.distributed.fsdp.fully_shard) needs three things more: a DTensor counts
as its local shard (its own storage is a data-less wrapper sized like the *global* tensor); the mode lets
DTensor ops desugar into local-tensor ops, which it then sees; and FSDP2 frees and re-allocates gathered
parameters with `storage.resize_(0)` / `resize_(n)`, which no dispatch mode sees, so `resize_` is watched
while the meter is open. Memory a collective backend allocates on its own threads stays invisible (modes
are thread-local).

This module deliberately imports nothing from autofit's profiler or memory model: it is the verifier.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support has no sharded tensors to meet
    DTensor = None

Trackable = torch.Tensor | nn.Module | torch.optim.Optimizer


def _is_dtensor_type(kind: type) -> bool:
    return DTensor is not None and issubclass(kind, DTensor)


class _LiveStorageCounter:
    """Bytes of the distinct live storages registered on one device type, and their running peak."""

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self.current = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}  # StorageImpl address -> bytes counted for it

    def add(self, tensor: object) -> None:
        if DTensor is not None and isinstance(tensor, DTensor):
            tensor = tensor._local_tensor  # the memory is the local shard's storage
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # wrapper subclasses without storage
            return
        if storage.device.type != self.device_type:
            return
        key, nbytes = storage._cdata, storage.nbytes()
        known = self._sizes.get(key)
        if known is None:
            # A storage's Python object lives exactly as long as its StorageImpl (PyObject preservation),
            # so the finalizer runs when the memory is really released, before the address can be reused.
            weakref.finalize(storage, self._release, key)
        elif known == nbytes:
            return
        self._sizes[key] = nbytes  # new, or resized in place by an out= op
        self.current += nbytes - (known or 0)
        self.peak = max(self.peak, self.current)

    def _release(self, key: int) -> None:
        self.current -= self._sizes.pop(key, 0)

    def resized(self, storage: torch.UntypedStorage) -> None:
        """A known storage resized in place (FSDP2 frees and re-allocates gathered parameters so)."""
        key = storage._cdata
        if key in self._sizes:
            nbytes = storage.nbytes()
            self.current += nbytes - self._sizes[key]
            self._sizes[key] = nbytes
            self.peak = max(self.peak, self.current)


class _TensorTracker(TorchDispatchMode):
    """Registers every tensor an op reads or returns (inputs catch tensors made outside the dispatcher)."""

    def __init__(self, counter: _LiveStorageCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(_is_dtensor_type(t) for t in types):
            return NotImplemented  # DTensor then runs its local-tensor ops, which this mode sees
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten((out, args, kwargs))[0]:
            self.counter.add(tensor)
        return out


def _tensors_of(thing: Trackable) -> Iterator[torch.Tensor]:
    if isinstance(thing, torch.Tensor):
        yield thing
    elif isinstance(thing, nn.Module):
        for p in thing.parameters():
            yield p
            if p.grad is not None:
                yield p.grad
            yield from _attached_tensors(getattr(p, "quant_state", None))
        yield from thing.buffers()
    elif isinstance(thing, torch.optim.Optimizer):
        yield from _optimizer_state_tensors(thing)
    else:
        raise TypeError(f"cannot track {type(thing).__name__}: pass tensors, modules or optimizers")


def _attached_tensors(state: object, depth: int = 0) -> Iterator[torch.Tensor]:
    """Every tensor held by an object hung on a parameter (bitsandbytes' 4-bit quant_state: scales, code
    books, nested states), found by walking its attributes: they occupy memory though no module lists them."""
    if state is None or depth > 3:
        return
    for value in vars(state).values() if hasattr(state, "__dict__") else ():
        if isinstance(value, torch.Tensor):
            yield value
        elif hasattr(value, "__dict__") and not isinstance(value, (nn.Module, type)):
            yield from _attached_tensors(value, depth + 1)


def _optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                yield value


class PeakMemoryMeter:
    """Peak bytes of live tensors on `device` while the context is open.

    with PeakMemoryMeter("cpu", track=[model, optimizer]) as meter:
        train_step()
    meter.peak_bytes  # includes what was alive at the start (weights, grads, optimizer state)
    """

    def __init__(self, device: str | torch.device, *, track: Iterable[Trackable] = ()) -> None:
        self.device = torch.device(device)
        self.track = list(track)
        self._counter = _LiveStorageCounter(self.device.type)
        self._mode: _TensorTracker | None = None
        self._hooks: list = []
        self._resize = None

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def __enter__(self) -> PeakMemoryMeter:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        for thing in self.track:
            self._walk(thing)
            if isinstance(thing, torch.optim.Optimizer):
                # State made by the first step outside the dispatcher (e.g. from numpy) is found here.
                self._hooks.append(thing.register_step_post_hook(lambda opt, *_: self._walk(opt)))
        self.track = []  # walked: the counter follows each storage's life from here, without holding it
        self._counter.peak = self._counter.current
        self._watch_resizes()
        self._mode = _TensorTracker(self._counter)
        self._mode.__enter__()
        return self

    def _watch_resizes(self) -> None:
        """Count `UntypedStorage.resize_` while open: no dispatch mode sees it (FSDP2 uses it)."""
        self._resize = original = torch.UntypedStorage.resize_
        counter = self._counter

        def resize_(storage, size):
            result = original(storage, size)
            counter.resized(storage)
            return result

        torch.UntypedStorage.resize_ = resize_

    def __exit__(self, *exc) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            return
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._mode = None
        if self._resize is not None:
            torch.UntypedStorage.resize_ = self._resize
            self._resize = None
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def _walk(self, thing: Trackable) -> None:
        for tensor in _tensors_of(thing):
            self._counter.add(tensor)

    @property
    def peak_bytes(self) -> int:
        """Most bytes allocated at any moment since the start or the last `reset_peak()`."""
        if self.is_cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        return self._counter.peak

    @property
    def current_bytes(self) -> int:
        if self.is_cuda:
            return int(torch.cuda.memory_allocated(self.device))
        return self._counter.current

    @property
    def peak_reserved_bytes(self) -> int:
        """CUDA: the caching allocator's reserved peak (allocated + its slack). CPU: same as peak_bytes."""
        if self.is_cuda:
            return int(torch.cuda.max_memory_reserved(self.device))
        return self._counter.peak

    def reset_peak(self) -> None:
        """Start a new peak from what is allocated now (e.g. to measure steady-state steps only)."""
        if self.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._counter.peak = self._counter.current


class SteadyStatePeak:
    """Peak memory of the steady-state run: everything after the call's first optimizer step (before it no
    optimizer state exists, which the memory model assumes), evaluation included."""

    def __init__(self, meter: PeakMemoryMeter | None) -> None:
        self.meter, self.steps = meter, 0
        self.first: tuple[int, int] | None = None

    def _read(self) -> tuple[int, int]:
        return self.meter.peak_bytes, self.meter.peak_reserved_bytes

    def after_step(self) -> None:
        self.steps += 1
        if self.meter is not None and self.steps == 1:
            self.first = self._read()
            self.meter.reset_peak()

    def result(self) -> tuple[int | None, int | None]:
        if self.meter is None or self.steps == 0:
            return None, None
        now = self._read()  # since the first step, evaluation included
        return tuple(map(max, self.first, now)) if self.steps == 1 else now
