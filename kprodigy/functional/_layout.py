"""The layout of the per-tensor state: ``_fused`` and ``_adamw`` step the state of small params on
one flat buffer per key, not on gathered copies; the entries stay views shaped as their params.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from ._state import STATE_KEYS, Segment

__all__ = ["SMALL", "copy_segment", "flat_span", "p0_full", "pack", "pack_segment", "views"]

SMALL = 1 << 16  # tensors below this many elements have their state packed (and are gathered)


def _small(seg: Segment) -> list[int]:
    return [i for i, x in enumerate(seg.params) if x.numel() < SMALL and x.is_contiguous()]


def _packed(ts: Sequence[Tensor], idx: list[int]) -> list[Tensor]:
    """``ts`` with the entries ``idx`` replaced by copies laid back to back (``pack``)."""
    new = list(ts)
    for i, t in zip(idx, pack([ts[i] for i in idx]) if idx else []):
        new[i] = t
    return new


def pack_segment(seg: Segment) -> Segment:
    """``seg`` with the state of its small contiguous params laid back to back in one new buffer per
    key, unless it already is; a compact (0-dim) ``p0`` stays so (memory first: the kernels gather it)."""
    small = _small(seg)
    changes = {key: laid for key in STATE_KEYS if (laid := _laid_flat(seg, key, small)) is not None}
    return replace(seg, **changes) if changes else seg  # type: ignore[arg-type]


def _laid_flat(seg: Segment, key: str, small: list[int]) -> list[Tensor] | None:
    """``seg``'s ``key`` list with the entries ``small`` laid back to back in a new buffer, or None
    where they are already, or are not laid flat: fewer than two, a compact p0, a factored v, int8
    moments (``_formats``)."""
    ts = getattr(seg, key)
    if len(small) < 2 or ts is None:
        return None
    sub = [ts[i] for i in small]
    if key == "p0" and any(t.dim() == 0 for t in sub):
        return None
    if key in ("exp_avg", "exp_avg_sq") and any(t.shape != seg.params[i].shape for t, i in zip(sub, small)):
        return None
    return _packed(ts, small) if flat_span(sub) is None else None


def copy_segment(seg: Segment) -> Segment:
    """``seg`` with copies of its params, exp_avg, exp_avg_sq and s laid as ``pack_segment`` lays them,
    which a pure step writes into (each copied apart under ``torch.compile``, whose fake tensors
    ``unflatten_dense_tensors`` does not take), and ``p0`` laid flat if it is not (a copy, once)."""
    small = _small(seg)
    changes: dict[str, list[Tensor]] = {}
    for key in ("params", "exp_avg", "exp_avg_sq", "s"):
        ts = getattr(seg, key)
        if ts is None:
            continue
        sub = [ts[i] for i in small]
        same = all(t.is_contiguous() and t.dtype == sub[0].dtype for t in sub)  # (int8 beside bfloat16 moments)
        packed = small if len(small) > 1 and same and not torch.compiler.is_compiling() else []
        done = set(packed)
        changes[key] = [t if i in done else t.clone() for i, t in enumerate(_packed(ts, packed))]
    p0 = None if torch.compiler.is_compiling() else _laid_flat(seg, "p0", small)  # (read only)
    if p0 is not None:  # laid flat once, as ``pack_segment`` lays it: later pure steps find it so
        changes["p0"] = p0
    return replace(seg, **changes)  # type: ignore[arg-type]


def flat_span(ts: Sequence[Tensor]) -> Tensor | None:
    """The 1-D tensor whose consecutive slices are ``ts``, when they lie back to back in one
    buffer (as ``pack`` leaves them; empty ones lie anywhere), else None. Reads pointers only: no
    copy, no sync."""
    if not ts or any(t.dtype != ts[0].dtype for t in ts):
        return None
    first = next((t for t in ts if t.numel()), None)
    if first is None:
        return ts[0].new_empty(0)
    ptr, size = first.data_ptr(), first.element_size()
    total = 0
    for t in ts:
        if not t.numel():
            continue
        if t.data_ptr() != ptr + total * size or not t.is_contiguous():
            return None
        total += t.numel()
    if (first.storage_offset() + total) * size > first.untyped_storage().nbytes():
        return None  # adjacent addresses, but not one buffer
    return first.as_strided((total,), (1,))


def pack(ts: Sequence[Tensor]) -> list[Tensor]:
    """Copies of ``ts`` (same shapes, dtype, device) laid back to back in one new flat buffer, which
    the fused kernels step in one call with no gathering copies (``flat_span``); ``ts`` laid so
    already (a pure step's outputs): one copy of their span."""
    span = flat_span(ts)
    if span is not None:
        return views(span.clone(), ts)  # (half the time of cat over 300 64x64 views, CPU)
    return views(torch.cat([t.reshape(-1) for t in ts]), ts)  # (flatten_dense_tensors: 2.6x slower on CPU)


def views(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Consecutive slices of ``flat`` shaped as ``like`` (an empty one shaped too: torch 2.7 gave (0,))."""
    out = torch._C._nn.unflatten_dense_tensors(flat, list(like))
    return [v if v.shape == t.shape else flat[:0].view(t.shape) for v, t in zip(out, like)]


def p0_full(p0: Tensor, n: int) -> Tensor:
    """p0 as a flat tensor of ``n`` elements (a 0-dim zero p0 is broadcast)."""
    if p0.dim() == 1:
        return p0
    return p0.reshape(-1).expand(n) if p0.numel() == 1 and n != 1 else p0.reshape(-1)
