"""Reused CPU buffers for the step's temporaries.

On CPU a fresh tensor of more than a few hundred kilobytes is mapped and faulted in page by page
on every step, which costs more than the arithmetic on it (benchmarks/NOTES.md, changes 6 and
8). The in-place kernels therefore write their temporaries into buffers kept per thread and
reused by later steps. Off CPU (caching allocators) and while ``torch.compile`` traces (where a
temporary should stay a register, not memory) they get fresh tensors.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable

import torch
from torch import Tensor

__all__ = ["buffer"]

_LOCAL = threading.local()  # per thread: {(device, dtype, key): 1-D buffer}, most recently used last
MAX_ENTRIES = 16
MIN_BYTES = 1 << 17  # smaller temporaries come from the C heap cheaply (glibc maps 128 KiB+ apart)


def buffer(n: int, dtype: torch.dtype, device: torch.device, key: Hashable) -> Tensor | None:
    """A 1-D tensor of ``n`` elements kept for reuse under ``key``, or None where temporaries
    should be fresh tensors (off CPU, while compiling). Its contents are arbitrary; it is valid
    until the next call with the same key in this thread. Temporaries under ``MIN_BYTES`` are
    fresh tensors too: the heap serves them without page faults, and a lookup would cost more."""
    if device.type != "cpu" or n * dtype.itemsize < MIN_BYTES or torch.compiler.is_compiling():
        return None
    bufs: dict[Hashable, Tensor] = _LOCAL.__dict__.setdefault("bufs", {})
    full_key = (device, dtype, key)
    buf = bufs.pop(full_key, None)
    if buf is None or buf.numel() < n:
        buf = torch.empty(n, dtype=dtype, device=device)
    bufs[full_key] = buf
    while len(bufs) > MAX_ENTRIES:
        del bufs[next(iter(bufs))]
    return buf[:n]
