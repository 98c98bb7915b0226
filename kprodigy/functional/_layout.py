"""The layout of the per-tensor state: which state tensors lie back to back in one buffer.

The compiled kernels (``_fused``) and the native path's buckets (``_native``) step the state of
a run of small params on one flat buffer per key instead of gathering copies; the state entries
stay views of it (shaped as their params), so checkpoints and users see ordinary tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["STATE_KEYS", "flat_span", "p0_full", "pack", "pack_states"]

STATE_KEYS = ("exp_avg", "exp_avg_sq", "s", "p0")  # the per-tensor state laid flat (``step`` is not)


def pack_states(states: list[dict[str, Any]]) -> None:
    """Lay each of ``exp_avg``, ``exp_avg_sq``, ``s`` and ``p0`` of these param states back to back
    in one new buffer (values unchanged) unless it already is, so that a kernel steps them on the
    buffer itself (``flat_span``): the layout of the fused path's small params and of the
    native path's buckets. A compact (0-dim) ``p0`` (all-zero param, e.g. LoRA B) stays compact:
    memory first (the kernels gather or copy it)."""
    for key in STATE_KEYS:
        if len(states) < 2 or not all(key in st for st in states):
            continue
        ts = [st[key] for st in states]
        if key == "p0" and any(t.dim() == 0 for t in ts):
            continue
        if flat_span(ts) is None:
            for st, packed in zip(states, pack(ts)):
                st[key] = packed


def flat_span(ts: Sequence[Tensor]) -> Tensor | None:
    """The 1-D tensor whose consecutive slices are ``ts``, when they lie back to back in one
    buffer (as ``pack`` leaves them), else None. Reads pointers only: no copy, no sync."""
    if not ts:
        return None
    first = ts[0]
    dtype, ptr, size = first.dtype, first.data_ptr(), first.element_size()
    total = 0
    for t in ts:
        if t.dtype != dtype or t.data_ptr() != ptr + total * size or not t.is_contiguous():
            return None
        total += t.numel()
    if (first.storage_offset() + total) * size > first.untyped_storage().nbytes():
        return None  # adjacent addresses, but not one buffer
    return first.as_strided((total,), (1,))


def pack(ts: Sequence[Tensor]) -> list[Tensor]:
    """Copies of ``ts`` (same shapes, dtype, device), laid back to back in one new flat buffer.

    The optimizer keeps the state of small params this way: the fused kernels then step all of
    them in one call on the buffer itself, with no gathering copies (``flat_span``).
    """
    return list(torch._C._nn.unflatten_dense_tensors(torch._C._nn.flatten_dense_tensors(list(ts)), list(ts)))


def p0_full(p0: Tensor, n: int) -> Tensor:
    """p0 as a flat tensor of ``n`` elements (a 0-dim zero p0 is broadcast)."""
    if p0.dim() == 1:
        return p0
    return p0.reshape(-1).expand(n) if p0.numel() == 1 and n != 1 else p0.reshape(-1)
