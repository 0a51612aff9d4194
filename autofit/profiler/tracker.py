"""Byte accounting for one profiled step: live storages, saved-for-backward storages, forward FLOPs.

`LiveBytes` is a TorchDispatchMode that sees every op's outputs and counts each distinct storage once, until
a weakref finalizer on the storage says it was freed. Storages created before it was entered (parameters)
are never counted. It is written for the profiler alone: the executor's measurement is independent on
purpose, so that one can check the other.

`SavedBytes` is a pair of saved-tensors hooks that counts each storage autograd saves for backward once,
charging it to whatever block is running when it is first saved.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
from torch._subclasses.fake_tensor import FakeTensor, in_kernel_invocation_manager
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry, sdpa_flop_count

aten = torch.ops.aten


def _storage(t: torch.Tensor):
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse or otherwise storage-less tensors
        return None


class _StorageCounter:
    """Bytes of distinct storages, each counted from first sight until it is freed."""

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        self.live = 0
        self._sizes: dict[int, int] = {}
        # Storages that existed before (weights, grads, optimizer state): an op returning a view of one
        # (a weight's .t(), a detach) allocates nothing. Kept referenced so their ids stay unique.
        self._existing = [s for t in existing if (s := _storage(t)) is not None]
        self._existing_ids = {id(s) for s in self._existing}

    def add(self, storage) -> int:
        """Count `storage`; returns the bytes newly counted (0 when already counted at this size)."""
        if id(storage) in self._existing_ids:
            return 0
        key, nbytes = id(storage), storage.nbytes()
        old = self._sizes.get(key)
        if old is None:
            self._sizes[key] = nbytes
            weakref.finalize(storage, self._free, key)
        elif old == nbytes:
            return 0
        self._sizes[key] = nbytes  # a resized storage (out= ops) is re-measured
        delta = nbytes - (old or 0)
        self.live += delta
        return delta

    def __contains__(self, storage) -> bool:
        return id(storage) in self._sizes

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)


def _cpu_flash_attention_flops(query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


# FlopCounterMode's formulas, plus the CPU flash-attention kernel that its registry lacks.
_FLOP_FORMULAS = {**flop_registry, aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops}


class LiveBytes(TorchDispatchMode):
    """Live bytes of tensors created while active, their peak, and (optionally) FLOPs of the ops run.
    Storages of `existing` tensors (parameters, buffers) never count, even when an op returns a view of one.

    On meta/fake tensors it also answers the two data-dependent questions HF models ask of all-ones masks
    and non-negative labels: `.item()` of a bool (True: "all ones") and `nonzero` (every element)."""

    def __init__(self, count_flops: bool = False, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.count_flops = count_flops
        self.flops = 0.0
        self.peak = 0
        self._counter = _StorageCounter(existing)

    @property
    def live(self) -> int:
        return self._counter.live

    def reset_peak(self) -> None:
        self.peak = self._counter.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # Most ops a fake-tensor step dispatches are C++ kernels asking a fake tensor its device: answered
        # here, as FakeTensorMode answers them, without a second trip through Python dispatch.
        if func is _DEVICE and isinstance(args[0], FakeTensor):
            return args[0].fake_device
        kwargs = kwargs or {}
        if func in _VIEWS and _plain_fake(args) and not kwargs:
            out = _fake_view(func, args)
        elif func in _DATA_QUESTIONS and _is_shape_only(args):
            out = _shape_only_answer(func, args[0])
        else:
            out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor):  # the common case, without flattening
            if (storage := _storage(out)) is not None:
                self._counter.add(storage)
        else:
            for leaf in tree_leaves(out):
                if isinstance(leaf, torch.Tensor) and (storage := _storage(leaf)) is not None:
                    self._counter.add(storage)
        self.peak = max(self.peak, self._counter.live)
        if self.count_flops and func.overloadpacket in _FLOP_FORMULAS:
            self.flops += _FLOP_FORMULAS[func.overloadpacket](*args, **kwargs, out_val=out)
        return out


_DEVICE = torch.ops.prim.device.default
_VIEWS = {aten.t.default, aten.view.default, aten._unsafe_view.default, aten.transpose.int, aten.expand.default,
          aten.unsqueeze.default, aten.detach.default, aten.permute.default, aten.slice.Tensor, aten.select.int}
"""Ops that only view their one tensor argument (matmul's _unsafe_view too: a view below autograd)."""


def _plain_fake(args) -> bool:
    """One FakeTensor (no constant behind it) first, and no other tensor."""
    first = args[0] if args else None
    return (type(first) is FakeTensor and first.constant is None
            and not any(isinstance(a, torch.Tensor) for a in args[1:]))


def _fake_view(func, args) -> FakeTensor:
    """A view of a fake tensor made as FakeTensorMode makes one, without its cache: the meta kernel on the
    fake tensor's meta data, wrapped on the same fake device. Views are half the ops of a step and the cache's
    key costs far more than the kernel (and refuses _unsafe_view outright: its slow path costs more still)."""
    tensor = args[0]
    with in_kernel_invocation_manager(tensor.fake_mode):
        out = func(*args)
    return FakeTensor(tensor.fake_mode, out, tensor.fake_device)
_DATA_QUESTIONS = (aten._local_scalar_dense.default, aten.nonzero.default)


def _is_shape_only(args) -> bool:
    first = args[0] if args else None
    return isinstance(first, torch.Tensor) and (first.device.type == "meta" or isinstance(first, FakeTensor))


def _shape_only_answer(func, tensor: torch.Tensor):
    if func is aten.nonzero.default:  # assume every element is non-zero (labels >= 0, masks all ones)
        return torch.empty((tensor.numel(), tensor.dim()), dtype=torch.long, device=tensor.device)
    if tensor.dtype != torch.bool:
        raise RuntimeError(f"cannot read a {tensor.dtype} value of a shape-only tensor (meta device)")
    return True  # all()/any() of all-ones masks


class SavedBytes:
    """Saved-tensors hooks: bytes of each distinct non-parameter storage saved for backward, charged to the
    phase `current_phase()` names when that storage is first saved."""

    def __init__(self, params: Iterable[torch.Tensor], current_phase: Callable[[], str]) -> None:
        self._param_storages = [s for p in params if (s := _storage(p)) is not None]  # kept: ids stay unique
        self._param_ids = {id(s) for s in self._param_storages}
        self._current_phase = current_phase
        self._counter = _StorageCounter()
        self.by_phase: dict[str, int] = defaultdict(int)

    @property
    def live(self) -> int:
        """Bytes of saved storages still alive (backward frees them as it goes)."""
        return self._counter.live

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = _storage(tensor)
        if storage is not None and id(storage) not in self._param_ids and storage not in self._counter:
            self.by_phase[self._current_phase()] += self._counter.add(storage)
        return tensor

    def __contains__(self, storage) -> bool:
        return storage in self._counter

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
