"""Multi-tensor kernels: ``_single``'s sequence of ops with ``torch._foreach_*`` ops (which have no
vmap rule). With ``out=None`` the first op of a chain makes new tensors, the next work in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import _robust
from ._scalars import Scalar, StepScalars
from ._single import Moments, Ts, _axpy, _l1, _op, _temp, _up, by_halves, effective_grads, layout
from ._state import Segment, SegmentResult, compute_dtype

__all__ = ["PURE", "gradients", "layout", "statistics", "update", "update_moments", "update_params"]

PURE = True


def gradients(seg: Segment, lay: Any, grads: Ts) -> list[Tensor]:
    return effective_grads(seg.params, grads, seg.exp_avg_sq, seg.hparams, foreach=True)


def statistics(seg: Segment, lay: Any, grads: Ts, sc: StepScalars) -> tuple[Tensor, Tensor]:
    xs, ss, p0s, slice_p = seg.params, seg.s, seg.p0, seg.hparams.slice_p
    g_sliced = [g.flatten()[::slice_p] for g in grads]
    diffs = torch._foreach_sub(list(p0s), [x.flatten()[::slice_p] for x in xs])
    dots = _sum_of_dots(g_sliced, diffs)
    del diffs
    if xs[0].device.type == "cpu":  # foreach ops are per-tensor loops on CPU: the passes of _single
        norms = []
        for s, g in zip(ss, g_sliced):  # the new s: one temporary at a time (``update`` writes it)
            t = _temp(s.shape, "a", s)
            norms.append(_l1(_axpy(_op("mul", s, sc.beta3, out=t), g, sc.s_scale, out=t), out=t))
    else:  # one fused launch per op on CUDA (addcmul with a 0-dim operand would loop per tensor)
        s_new = torch._foreach_mul(list(ss), sc.beta3)  # type: ignore[arg-type]  # the new s, as temporaries
        scaled = torch._foreach_mul(g_sliced, sc.s_scale)
        torch._foreach_add_(s_new, scaled)
        del scaled
        norms = list(torch._foreach_norm(s_new, 1, dtype=compute_dtype(s_new[0].dtype)))
    return dots, torch.stack(norms).sum()


_DOT_CAT_MAX = 1 << 16  # tensors below this size join one concatenated dot product


def _sum_of_dots(a: Ts, b: Ts) -> Tensor:
    """sum_i <a_i, b_i> in at least fp32 (a 0-dim ``b_i`` broadcasts): small tensors in one concatenated
    dot (no per-tensor Python work), large ones a ``torch.dot`` each (no concatenation copy)."""
    small = [i for i, t in enumerate(a) if t.numel() < _DOT_CAT_MAX]
    large = [i for i, t in enumerate(a) if t.numel() >= _DOT_CAT_MAX]
    parts: list[Tensor] = []
    if small:
        ca = torch.cat([a[i].reshape(-1) for i in small])
        cb = torch.cat([b[i].reshape(-1).expand(a[i].numel()) for i in small])
        parts.append(torch.dot(_up(ca), _up(cb)))
    parts.extend(torch.dot(_up(a[i].reshape(-1)), _up(b[i].reshape(-1).expand(a[i].numel()))) for i in large)
    return torch.stack(parts).sum()


def update_moments(
    gs: Ts, exp_avgs: Ts | None, exp_avg_sqs: Ts, ss: Ts, *, sc: StepScalars, slice_p: int, out: SegmentResult | None
) -> Moments:
    if sc.ok is not None:  # the skip is folded into the scalars: 0 * g must be 0
        gs = _robust.sanitize(gs)
    w1, w2 = sc.gains
    k1, k2 = sc.decays
    dg = torch._foreach_mul(list(gs), sc.weight)
    new_m = None
    if exp_avgs is not None:
        new_m = _mul(exp_avgs, k1, out is not None)
        torch._foreach_add_(new_m, dg, alpha=w1)
    new_v = _mul(exp_avg_sqs, k2, out is not None)
    torch._foreach_addcmul_(new_v, dg, dg, value=w2)
    del dg
    if sc.beta3 is None or not gs:
        return new_m, new_v, list(ss)
    g_sliced = [g.flatten()[::slice_p] for g in gs]
    new_s = _mul(ss, sc.beta3, out is not None)
    if gs[0].device.type == "cpu":
        for s, g in zip(new_s, g_sliced):
            _axpy(s, g, sc.s_scale, out=s)
    else:
        scaled = torch._foreach_mul(g_sliced, sc.s_scale)
        torch._foreach_add_(new_s, scaled)
    return new_m, new_v, new_s


def update_params(
    xs: Ts, gs: Ts, exp_avgs: Ts | None, exp_avg_sqs: Ts, *, sc: StepScalars, out: SegmentResult | None
) -> list[Tensor]:
    if not xs:
        return []
    assert sc.d_new is not None and sc.eps_d is not None, "update_params needs a finished StepScalars"
    den = torch._foreach_sqrt(list(exp_avg_sqs))
    _add_(den, sc.eps_d)  # sqrt(v) + d_new * eps
    torch._foreach_div_(den, -sc.dlr)  # den / (-dlr): the step below is one addcdiv
    if exp_avgs is not None:
        direction = list(exp_avgs)
    else:
        direction = list(torch._foreach_mul(list(gs) if sc.ok is None else _robust.sanitize(gs), sc.d_new))
    new_x = list(xs) if out is not None else [x.clone() for x in xs]
    if sc.decay is not None:  # x - decay * x (prodigyopt's form)
        decayed = torch._foreach_mul(list(xs), sc.decay)
        torch._foreach_sub_(new_x, decayed)
    torch._foreach_addcdiv_(new_x, direction, den)
    return new_x


update = by_halves(update_moments, update_params)


def _add_(ts: list[Tensor] | tuple[Tensor, ...], a: Scalar) -> None:
    """ts += a in place; a 0-dim tensor ``a`` through the Tensor overload (given ``a`` alone, the
    binding takes the Scalar one, which reads ``a`` on the host: a device sync)."""
    if isinstance(a, Tensor):
        torch._foreach_add_(ts, a, alpha=1)
    else:
        torch._foreach_add_(ts, a)


def _mul(ts: Sequence[Tensor], a: Scalar, inplace: bool) -> list[Tensor]:
    """a * ts, in place (the destinations are the inputs) or into new tensors."""
    ts = list(ts)
    if inplace:
        torch._foreach_mul_(ts, a)
        return ts
    return list(torch._foreach_mul(ts, a))
