"""Per-tensor kernels: the readable reference statement of the two elementwise passes.

Each op runs in place (``inplace=True``: the optimizer shell, no extra copies) or out of place
(the pure step, safe under ``torch.func.vmap``). The two modes call the same ATen kernels in the
same order, so they produce bit-identical results. ``_foreach.py`` states the same sequence with
``torch._foreach_*`` ops; tests prove the two agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _robust, _scratch
from ._scalars import Coefficients

__all__ = ["accumulate", "apply"]

Scalar = float | Tensor


def accumulate(
    xs: Sequence[Tensor],
    gs: Sequence[Tensor],
    exp_avgs: Sequence[Tensor] | None,
    exp_avg_sqs: Sequence[Tensor],
    ss: Sequence[Tensor],
    p0s: Sequence[Tensor],
    *,
    betas: tuple[float, float],
    beta3: Scalar,
    d: Tensor,
    c: Coefficients,
    slice_p: int,
    update_d: bool,
    inplace: bool,
    decay: tuple[Scalar, Scalar] | None = None,
    sanitize: bool = False,
    write: bool = True,
    stats: bool = True,
) -> tuple[list[Tensor] | None, list[Tensor], list[Tensor], Tensor, Tensor]:
    """Moments and D statistics of one group; reads g, x, p0, s, m, v once.

    Returns (exp_avgs, exp_avg_sqs, ss, numerator_delta, denom): the new moment and ``s`` lists
    (the same tensors when ``inplace``), ``numerator_scale * sum <g[::p], p0 - x[::p]>`` and
    ``sum ||s||_1`` as 0-dim tensors of ``d``'s dtype (zeros when not ``update_d``).
    ``decay``: multipliers of m and v (default ``betas``); 0-dim tensors let a skipped step keep
    the moments exactly (decay 1 with a zeroed gradient). ``sanitize``: use ``g`` with its
    non-finite entries zeroed (``_robust.sanitize``, one tensor at a time).

    The fused path splits the pass in two (benchmarks/NOTES.md, change 9): ``write=False``
    computes only the statistics (the new ``s`` as a temporary; m, v, s unchanged and returned
    as given), ``stats=False`` only the new m, v, s (statistics returned as zeros).
    """
    b1, b2 = betas
    k1, k2 = betas if decay is None else decay
    new_m: list[Tensor] | None = [] if exp_avgs is not None else None
    new_v: list[Tensor] = []
    new_s: list[Tensor] = []
    dots: list[Tensor] = []
    norms: list[Tensor] = []
    for i, (x, g) in enumerate(zip(xs, gs)):
        if sanitize:
            g = _zero_nonfinite(g, inplace)
        if write:
            dg = torch.mul(g, d, out=_temp(g.shape, "a", inplace, g, d))
            if exp_avgs is not None and new_m is not None:
                m = _mul(exp_avgs[i], k1, inplace)
                new_m.append(_add(m, dg, 1 - b1, inplace))
            v = _mul(exp_avg_sqs[i], k2, inplace)
            new_v.append(_addcmul(v, dg, dg, 1 - b2, inplace))
            del dg
        if not update_d:
            new_s.append(ss[i])
            continue
        g_sliced = g.flatten()[::slice_p]
        if stats:
            x_sliced = x.flatten()[::slice_p]
            diff = torch.sub(p0s[i], x_sliced, out=_temp(x_sliced.shape, "a", inplace, p0s[i], x))
            dots.append(torch.dot(_up(g_sliced), _up(diff)).to(d.dtype))
        s = _mul(ss[i], beta3, inplace and write)
        s = _addcmul(s, g_sliced, c.s_scale, 1, inplace and write)  # s + g * s_scale: no temporary
        new_s.append(s if write else ss[i])
        if stats:
            norms.append(_l1(s, out=_temp(s.shape, "a", inplace, s)).to(d.dtype))
    if not write:
        new_m = None if exp_avgs is None else list(exp_avgs)
        new_v = list(exp_avg_sqs)
    if not update_d or not dots:
        zero = torch.zeros_like(d)
        return new_m, new_v, new_s, zero, zero
    numerator = c.numerator_scale * torch.stack(dots).sum()
    return new_m, new_v, new_s, numerator, torch.stack(norms).sum()


def apply(
    xs: Sequence[Tensor],
    gs: Sequence[Tensor],
    exp_avgs: Sequence[Tensor] | None,
    exp_avg_sqs: Sequence[Tensor],
    *,
    dlr: Tensor,
    d_new: Tensor,
    eps: float,
    keep: Tensor | None,
    inplace: bool,
    sanitize: bool = False,
) -> list[Tensor]:
    """x <- x * keep - dlr * m / (sqrt(v) + d_new * eps); reads x, m, v once, writes x.

    With no exp_avg (betas[0] == 0) the direction is ``d_new * g`` (``g`` sanitized as in
    ``accumulate`` if ``sanitize``), as in prodigyopt. ``keep`` is the decoupled weight-decay
    factor ``1 - wd * dlr``, or None for no decoupled decay.
    """
    eps_d = d_new * eps
    neg_dlr = -dlr
    out = []
    for i, x in enumerate(xs):
        # den = (sqrt(v) + d_new * eps) / (-dlr), then one addcdiv: x + direction / den.
        # den is a temporary of ours: updated in place when ``inplace`` (no further copies).
        v = exp_avg_sqs[i]
        den = torch.sqrt(v, out=_temp(v.shape, "a", inplace, v))
        den = _add(den, eps_d, 1, inplace)
        den = _div(den, neg_dlr, inplace)
        if exp_avgs is not None:
            direction = exp_avgs[i]
        else:
            g = _zero_nonfinite(gs[i], inplace) if sanitize else gs[i]
            direction = torch.mul(g, d_new, out=_temp(g.shape, "b", inplace, g, d_new))
        if keep is not None:
            x = _mul(x, keep, inplace)
        out.append(x.addcdiv_(direction, den) if inplace else torch.addcdiv(x, direction, den))
    return out


def _mul(t: Tensor, a: Scalar, inplace: bool) -> Tensor:
    return t.mul_(a) if inplace else torch.mul(t, a)


def _div(t: Tensor, a: Tensor, inplace: bool) -> Tensor:
    return t.div_(a) if inplace else torch.div(t, a)


def _zero_nonfinite(g: Tensor, inplace: bool) -> Tensor:
    """``_robust.zero_nonfinite(g)``, into a reused buffer when in place."""
    return _robust.zero_nonfinite(g, out=_temp(g.shape, "g", inplace, g))


def _l1(t: Tensor, out: Tensor | None = None) -> Tensor:
    """||t||_1 accumulated in at least fp32, as ``abs`` (into ``out`` if given) then ``sum``: on
    CPU several times faster than ``torch.linalg.vector_norm(t, 1)`` (benchmarks/NOTES.md, change 3)."""
    return torch.abs(t, out=out).sum(dtype=_up_dtype(t.dtype))


def _temp(shape: torch.Size, slot: str, inplace: bool, *operands: Tensor) -> Tensor | None:
    """Where the in-place kernels put the result of an op on ``operands``: a reused CPU buffer
    (``_scratch``), or None (a fresh tensor: the pure mode, off CPU, under torch.compile). Each
    slot holds one temporary at a time; CPU ops run in order, so the next use may overwrite it."""
    if not inplace or torch.compiler.is_compiling():
        return None
    n = math.prod(shape)
    if n * operands[0].element_size() < _scratch.MIN_BYTES:  # cheap exit: most tensors are small
        return None
    dtype = torch.result_type(*operands) if len(operands) == 2 else operands[0].dtype
    buf = _scratch.buffer(n, dtype, operands[0].device, ("single", slot))
    return None if buf is None else buf.view(shape)


def _add(t: Tensor, u: Tensor, alpha: float, inplace: bool) -> Tensor:
    return t.add_(u, alpha=alpha) if inplace else torch.add(t, u, alpha=alpha)


def _addcmul(t: Tensor, u: Tensor, w: Tensor, value: float, inplace: bool) -> Tensor:
    return t.addcmul_(u, w, value=value) if inplace else torch.addcmul(t, u, w, value=value)


def _up_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16-bit floats, else the dtype itself: reductions accumulate in at least fp32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _up(t: Tensor) -> Tensor:
    return t.to(_up_dtype(t.dtype))
