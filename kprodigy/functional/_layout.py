"""The layout of the per-tensor state: which state tensors lie back to back in one buffer.

The compiled kernels (``_fused``) and the native path's buckets (``_native``) step the state of
a run of small params on one flat buffer per key instead of gathering copies; the state entries
stay views of it (shaped as their params), so checkpoints and users see ordinary tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from ._state import Segment

__all__ = ["SMALL", "STATE_KEYS", "copy_segment", "flat_span", "p0_full", "pack", "pack_segment"]

STATE_KEYS = ("exp_avg", "exp_avg_sq", "s", "p0")  # the per-tensor state laid flat (``step`` is not)
SMALL = 1 << 16  # tensors below this many elements have their state packed (and are gathered)


def pack_segment(seg: Segment) -> Segment:
    """``seg`` with the state (``exp_avg``, ``exp_avg_sq``, ``s``, ``p0``) of its small
    contiguous params laid back to back in one new buffer per key (values unchanged), unless it
    already is: the layout of the fused-AdamW backend's buckets and of the compiled kernels'
    packed params. A compact (0-dim) ``p0`` (all-zero param, e.g. LoRA B) stays compact: memory
    first (the kernels gather it). Tensors left as they were are the same objects."""
    small = [i for i, x in enumerate(seg.params) if x.numel() < SMALL and x.is_contiguous()]
    changes: dict[str, list[Tensor]] = {}
    for key in STATE_KEYS:
        ts = getattr(seg, key)
        if len(small) < 2 or ts is None:
            continue
        sub = [ts[i] for i in small]
        if key == "p0" and any(t.dim() == 0 for t in sub) or key == "exp_avg_sq" and any(
            t.shape != seg.params[i].shape for t, i in zip(sub, small)
        ):
            continue  # compact p0, factored v: not laid flat
        if flat_span(sub) is None:
            new = list(ts)
            for i, t in zip(small, pack(sub)):
                new[i] = t
            changes[key] = new
    return replace(seg, **changes) if changes else seg  # type: ignore[arg-type]


def copy_segment(seg: Segment) -> Segment:
    """``seg`` with copies of its params, ``exp_avg``, ``exp_avg_sq`` and ``s`` (``p0`` and the
    gradients shared), the small params' ones laid flat as ``pack_segment`` lays them: the
    tensors a pure step writes into."""
    small = [i for i, x in enumerate(seg.params) if x.numel() < SMALL and x.is_contiguous()]
    changes: dict[str, list[Tensor]] = {}
    for key in ("params", "exp_avg", "exp_avg_sq", "s"):
        ts = getattr(seg, key)
        if ts is None:
            continue
        packed = small if len(small) > 1 and all(ts[i].is_contiguous() for i in small) else []
        new = list(ts)
        for i, t in zip(packed, pack([ts[i] for i in packed]) if packed else []):
            new[i] = t
        done = set(packed)
        changes[key] = [t if i in done else t.clone() for i, t in enumerate(new)]
    return replace(seg, **changes)  # type: ignore[arg-type]


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
    flat = torch.cat([t.reshape(-1) for t in ts])  # (flatten_dense_tensors copies 2.6x slower on CPU)
    return list(torch._C._nn.unflatten_dense_tensors(flat, list(ts)))


def p0_full(p0: Tensor, n: int) -> Tensor:
    """p0 as a flat tensor of ``n`` elements (a 0-dim zero p0 is broadcast)."""
    if p0.dim() == 1:
        return p0
    return p0.reshape(-1).expand(n) if p0.numel() == 1 and n != 1 else p0.reshape(-1)
