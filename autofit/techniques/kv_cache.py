"""No key/value cache while training or profiling: a decoder (gpt2, llama, qwen2) builds one by default
(`config.use_cache`), and a step never reads it.

Trade-off: none to pay. What it saves: a frozen layer's keys and values, which no op saves for backward
but the cache keeps until the forward's output is dropped (with trained layers the cache shares the
tensors autograd saves, and costs nothing). The profiler measures with it off, as the executor trains, so
the memory model has no term for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def no_kv_cache(model: nn.Module) -> Iterator[None]:
    """`use_cache` off on every config of `model` (a wrapper's, peft's and the base model's) while the block
    runs."""
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None
               and getattr(c, "use_cache", None)}
    for config in configs.values():
        config.use_cache = False
    try:
        yield
    finally:
        for config in configs.values():
            config.use_cache = True
