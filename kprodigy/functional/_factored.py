"""Factored second moment (Adafactor-style), an opt-in: for a param with 2+ dims, seen as a
``rows x n`` matrix, ``exp_avg_sq`` holds the row and column means ``[r (rows), c (n)]``::

    r = b2 * r + mean_j((1 - b2) * d^2 * g_ij^2)     c = b2 * c + mean_i((1 - b2) * d^2 * g_ij^2)
    v_hat_ij = r_i * c_j / mean(r)                    (exact when v is rank one)

The kernels are ``_single``'s, a tensor at a time: ``update_moments`` on a zero ``v`` gives the
step's ``(1 - b2) * d^2 * g^2``, whose means update ``r`` and ``c``; ``update_params`` gets ``v_hat``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _single
from ._scalars import StepScalars
from ._single import Moments, Ts, _op, by_halves, gradients, layout, statistics
from ._state import SegmentResult

__all__ = ["PURE", "gradients", "is_factored", "layout", "statistics", "update", "update_moments", "update_params"]

PURE = True


def is_factored(xs: Ts, exp_avg_sqs: Ts) -> bool:
    """Whether any of these params keeps a factored (packed, not param-shaped) second moment."""
    return any(v.shape != x.shape for x, v in zip(xs, exp_avg_sqs))


def _check(x: Tensor, v: Tensor) -> int:
    """The number of rows of ``x``, whose ``v`` must be packed ``[r, c]``."""
    cols = x.shape[-1]
    rows = x.numel() // cols
    if x.dim() < 2 or v.shape != (rows + cols,):
        raise ValueError(
            f"exp_avg_sq of shape {tuple(v.shape)} is neither like its param {tuple(x.shape)} nor the "
            f"factored statistics ({rows + cols},) of it"
        )
    return rows


def _v_hat(x: Tensor, v: Tensor) -> Tensor:
    """The full second moment a packed ``[r, c]`` stands for, shaped like ``x``."""
    if v.shape == x.shape:
        return v
    rows = _check(x, v)
    r, c = v[:rows], v[rows:]
    scale = r.mean().clamp_min(torch.finfo(r.dtype).tiny)  # r == 0 (no gradient yet): v_hat = 0
    return (torch.outer(r, c) / scale).view(x.shape)


def update_moments(
    gs: Ts, exp_avgs: Ts | None, exp_avg_sqs: Ts, ss: Ts, *, sc: StepScalars, slice_p: int, out: SegmentResult | None
) -> Moments:
    """A factored ``v`` moves by the row and column means of this step's ``(1 - b2) (d g)^2`` (the
    reference kernel's new v from a zero v)."""
    new_m: list[Tensor] | None = None if exp_avgs is None else []
    new_v: list[Tensor] = []
    new_s: list[Tensor] = []
    for i, g in enumerate(gs):
        v = exp_avg_sqs[i]
        factored = v.shape != g.shape
        v_in = torch.zeros_like(g) if factored else v  # zero v: the kernel returns this step's (1 - b2) (d g)^2
        dest = None if out is None else SegmentResult([], _one(out.exp_avg, i), [v_in], [out.s[i]])
        moments = _single.update_moments([g], _one(exp_avgs, i), [v_in], [ss[i]], sc=sc, slice_p=slice_p, out=dest)
        m, (v_out,), (s,) = moments
        if factored:
            g2 = v_out.reshape(_check(g, v), -1)
            o = v if out is not None else None  # (elementwise on [r, c]: the values of r and c apart)
            v_out = _op("add", _op("mul", v, sc.decays[1], out=o), torch.cat([g2.mean(1), g2.mean(0)]), out=o)
        if new_m is not None and m is not None:
            new_m.extend(m)
        new_v.append(v_out)
        new_s.append(s)
    return new_m, new_v, new_s


def update_params(
    xs: Ts, gs: Ts, exp_avgs: Ts | None, exp_avg_sqs: Ts, *, sc: StepScalars, out: SegmentResult | None
) -> list[Tensor]:
    new_x: list[Tensor] = []
    for i, x in enumerate(xs):  # one v_hat at a time
        dest = None if out is None else SegmentResult([out.params[i]], None, [], [])
        new_x += _single.update_params([x], [gs[i]], _one(exp_avgs, i), [_v_hat(x, exp_avg_sqs[i])], sc=sc, out=dest)
    return new_x


update = by_halves(update_moments, update_params)


def _one(ts: Ts | None, i: int) -> list[Tensor] | None:
    return None if ts is None else [ts[i]]
