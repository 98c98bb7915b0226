"""Factored second moment (Adafactor-style row/column statistics), an explicit opt-in.

For a param ``x`` with two or more dimensions, seen as a matrix of ``rows = x.numel() // n`` by
``n = x.shape[-1]``, the second moment ``v`` (as many words as ``x``) is replaced by its row and
column means, packed in one 1-D tensor ``[r (rows), c (n)]``::

    r = b2 * r + mean_j((1 - b2) * d^2 * g_ij^2)     c = b2 * c + mean_i((1 - b2) * d^2 * g_ij^2)
    v_hat_ij = r_i * c_j / mean(r)                    (exact when v is rank one)

and the step uses ``v_hat`` where it would use ``v``. A param is factored exactly when its
``exp_avg_sq`` state has that packed shape (``_state.init_tensor_state(factored=True)``); other tensors keep a full ``v``.

The kernels (the contract of ``_single.py``) run the per-tensor reference kernels one tensor at a
time: the statistics do not read v; ``update_moments`` on a zero ``v`` gives this step's
contribution ``(1 - b2) * d^2 * g^2``, whose row and column means update ``r`` and ``c``;
``update_params`` gets ``v_hat``. So nothing of the step but
the factoring is stated here; the price is one param-sized temporary at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import _single
from ._scalars import StepScalars
from ._state import Segment, SegmentResult

__all__ = [
    "PURE",
    "gradients",
    "is_factored",
    "layout",
    "statistics",
    "update",
    "update_moments",
    "update_params",
]


def is_factored(xs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor]) -> bool:
    """Whether any of these params keeps a factored (packed, not param-shaped) second moment."""
    return any(v.shape != x.shape for x, v in zip(xs, exp_avg_sqs))


def _split(x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    cols = x.shape[-1]
    rows = x.numel() // cols
    if x.dim() < 2 or v.shape != (rows + cols,):
        raise ValueError(
            f"exp_avg_sq of shape {tuple(v.shape)} is neither like its param {tuple(x.shape)} nor the "
            f"factored statistics ({rows + cols},) of it"
        )
    return v[:rows], v[rows:]


def _v_hat(x: Tensor, v: Tensor) -> Tensor:
    """The full second moment a packed ``[r, c]`` stands for, shaped like ``x``."""
    if v.shape == x.shape:
        return v
    r, c = _split(x, v)
    scale = r.mean().clamp_min(torch.finfo(r.dtype).tiny)  # r == 0 (no gradient yet): v_hat = 0
    return (torch.outer(r, c) / scale).view(x.shape)


PURE = True
layout, gradients = _single.layout, _single.gradients
statistics = _single.statistics  # the D statistics do not read v


def update(seg: Segment, lay: Any, gs: Sequence[Tensor], sc: StepScalars, out: SegmentResult | None) -> SegmentResult:
    """Same contract as ``_single.update``; factored entries of ``exp_avg_sq`` are packed ``[r, c]``."""
    m, v, s = update_moments(gs, seg.exp_avg, seg.exp_avg_sq, seg.s, sc=sc, slice_p=seg.hparams.slice_p, out=out)
    return SegmentResult(update_params(seg.params, gs, m, v, sc=sc, out=out), m, v, s)


def update_moments(
    gs: Sequence[Tensor],
    exp_avgs: Sequence[Tensor] | None,
    exp_avg_sqs: Sequence[Tensor],
    ss: Sequence[Tensor],
    *,
    sc: StepScalars,
    slice_p: int,
    out: SegmentResult | None,
) -> tuple[list[Tensor] | None, list[Tensor], list[Tensor]]:
    """Same contract as ``_single.update_moments``; a factored ``v`` is updated from the row and
    column means of this step's ``(1 - b2) (d g)^2`` (the reference kernel's new v from a zero v)."""
    b2 = sc.decays[1]
    new_m: list[Tensor] | None = None if exp_avgs is None else []
    new_v: list[Tensor] = []
    new_s: list[Tensor] = []
    for i, g in enumerate(gs):
        v = exp_avg_sqs[i]
        factored = v.shape != g.shape
        v_in = torch.zeros_like(g) if factored else v  # zero v: the kernel returns this step's (1 - b2) (d g)^2
        dest = None if out is None else SegmentResult([], _one(out.exp_avg, i), [v_in], [out.s[i]])
        m, (v_out,), (s,) = _single.update_moments(
            [g], _one(exp_avgs, i), [v_in], [ss[i]], sc=sc, slice_p=slice_p, out=dest
        )
        if factored:
            r, col = _split(g, v)
            g2 = v_out.reshape(r.shape[0], col.shape[0])
            inplace = out is not None
            r = r.mul_(b2) if inplace else torch.mul(r, b2)
            col = col.mul_(b2) if inplace else torch.mul(col, b2)
            r = r.add_(g2.mean(1)) if inplace else torch.add(r, g2.mean(1))
            col = col.add_(g2.mean(0)) if inplace else torch.add(col, g2.mean(0))
            v_out = v if inplace else torch.cat([r, col])
        if new_m is not None and m is not None:
            new_m.extend(m)
        new_v.append(v_out)
        new_s.append(s)
    return new_m, new_v, new_s


def update_params(
    xs: Sequence[Tensor],
    gs: Sequence[Tensor],
    exp_avgs: Sequence[Tensor] | None,
    exp_avg_sqs: Sequence[Tensor],
    *,
    sc: StepScalars,
    out: SegmentResult | None,
) -> list[Tensor]:
    """Same contract as ``_single.update_params``, with ``v_hat`` for the factored entries."""
    new_x: list[Tensor] = []
    for i, x in enumerate(xs):  # one v_hat at a time
        dest = None if out is None else SegmentResult([out.params[i]], None, [], [])
        new_x += _single.update_params([x], [gs[i]], _one(exp_avgs, i), [_v_hat(x, exp_avg_sqs[i])], sc=sc, out=dest)
    return new_x


def _one(ts: Sequence[Tensor] | None, i: int) -> list[Tensor] | None:
    return None if ts is None else [ts[i]]
