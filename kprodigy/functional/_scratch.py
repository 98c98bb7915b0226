"""Reused CPU buffers for the in-place step's temporaries, from a store its caller owns: a fresh
CPU tensor of a few hundred kilobytes is faulted in page by page on every step, which costs more
than the arithmetic on it (benchmarks/NOTES.md, changes 6 and 8).
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from typing import Any

import torch
from torch import Tensor

__all__ = ["active", "buffer", "owned_by", "step_memo"]

_LOCAL = threading.local()  # per thread: the store of the step running (None: fresh temporaries)
MAX_ENTRIES = 16
MIN_BYTES = 1 << 17  # smaller temporaries come from the C heap cheaply (glibc maps 128 KiB+ apart)


class owned_by:  # noqa: N801 (a context manager used as a function; a class: cheaper per step)
    """Within this block (this thread), temporaries are reused from ``store``: a dict the caller
    keeps between steps, {(device, dtype, key): 1-D buffer}, most recently used last."""

    __slots__ = ("previous", "store")

    def __init__(self, store: dict[Hashable, Tensor]) -> None:
        self.store = store

    def __enter__(self) -> None:
        self.previous = getattr(_LOCAL, "store", None), getattr(_LOCAL, "memo", None)
        _LOCAL.store, _LOCAL.memo = self.store, {}

    def __exit__(self, *exc: object) -> None:
        _LOCAL.store, _LOCAL.memo = self.previous


def step_memo() -> dict[Hashable, Any] | None:
    """A dict living for the current ``owned_by`` block (one optimizer step), else None: for values
    of tensors alive and unchanged between their uses in the block, keyed by their ids."""
    memo: dict[Hashable, Any] | None = getattr(_LOCAL, "memo", None)
    return memo


def active() -> bool:
    """Whether a store is set (the optimizer's step runs, not the pure one)."""
    return getattr(_LOCAL, "store", None) is not None


def buffer(n: int, dtype: torch.dtype, device: torch.device, key: Hashable) -> Tensor | None:
    """A 1-D buffer of ``n`` elements reused under ``key`` (valid until the next call with it); None
    without a store, off CPU, while compiling or under ``MIN_BYTES`` (the heap serves those cheaply)."""
    bufs: dict[Hashable, Tensor] | None = getattr(_LOCAL, "store", None)
    if bufs is None or device.type != "cpu" or n * dtype.itemsize < MIN_BYTES or torch.compiler.is_compiling():
        return None
    full_key = (device, dtype, key)
    buf = bufs.pop(full_key, None)
    if buf is None or buf.numel() < n:
        buf = torch.empty(n, dtype=dtype, device=device)
    bufs[full_key] = buf
    while len(bufs) > MAX_ENTRIES:
        del bufs[next(iter(bufs))]
    return buf[:n]
