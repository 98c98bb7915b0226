"""Per-tensor kernels: the specification of the step's elementwise passes, one tensor at a time.

The kernel contract, the same in every backend (``_foreach``, ``_fused``, ``_factored``):

- ``statistics(xs, gs, ss, p0s, *, sc, slice_p) -> (numerator_delta, denom)`` reads params,
  gradients, s and p0 and writes nothing (the new s is a temporary here);
- the scalar D update (``_scalars.reduce_d``, after the all-reduce seam) runs in between;
- ``update(xs, gs, exp_avgs, exp_avg_sqs, ss, *, sc, slice_p, out) -> SegmentResult`` writes the
  new m, v, s and x into ``out``: the input lists themselves (the optimizer, in place) or None
  (new tensors: the pure step, differentiable and safe under ``torch.func.vmap``).

``sc`` is the segment's ``StepScalars`` (finished, for ``update``). The eager backends build
``update`` from two halves, ``update_moments`` (m, v, s) and ``update_params`` (x), which
``_partial.py`` runs apart (m, v, s while the gradient is alive, x once D is known). Both modes
call the same ATen kernels in the same order, so they give bit-identical results.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import _robust, _scratch
from ._scalars import StepScalars
from ._state import SegmentResult

__all__ = ["statistics", "update", "update_moments", "update_params"]


def statistics(
    xs: Sequence[Tensor], gs: Sequence[Tensor], ss: Sequence[Tensor], p0s: Sequence[Tensor], *, sc: StepScalars, slice_p: int
) -> tuple[Tensor, Tensor]:
    """The D statistics of one group; reads g, x, p0, s once and writes nothing.

    Returns ``numerator_scale * sum <g[::p], p0 - x[::p]>`` and ``sum ||beta3 * s + s_scale *
    g[::p]||_1`` (the norm of the new s), 0-dim tensors in the statistics dtype."""
    dtype, own = sc.dlr.dtype, _own_temps()
    dots: list[Tensor] = []
    norms: list[Tensor] = []
    for x, g, s, p0 in zip(xs, gs, ss, p0s):
        g, x = g.flatten()[::slice_p], x.flatten()[::slice_p]
        diff = torch.sub(p0, x, out=_temp(x.shape, "a", p0, x))
        dots.append(torch.dot(_up(g), _up(diff)).to(dtype))
        del diff
        s_new = _op("mul", s, sc.beta3, out=_temp(s.shape, "a", s))  # the new s: a temporary (``update`` writes it)
        s_new = _op("addcmul", s_new, g, sc.s_scale, out=s_new if own else None)  # s + g * s_scale
        norms.append(_l1(s_new, out=s_new if own else None).to(dtype))
    if not dots:
        zero = torch.zeros((), dtype=dtype, device=sc.dlr.device)
        return zero, zero
    return sc.numerator_scale * torch.stack(dots).sum(), torch.stack(norms).sum()


def update(
    xs: Sequence[Tensor],
    gs: Sequence[Tensor],
    exp_avgs: Sequence[Tensor] | None,
    exp_avg_sqs: Sequence[Tensor],
    ss: Sequence[Tensor],
    *,
    sc: StepScalars,
    slice_p: int,
    out: SegmentResult | None,
) -> SegmentResult:
    """The update pass of one group: ``update_moments``, then ``update_params`` with the new m, v."""
    m, v, s = update_moments(gs, exp_avgs, exp_avg_sqs, ss, sc=sc, slice_p=slice_p, out=out)
    return SegmentResult(update_params(xs, gs, m, v, sc=sc, out=out), m, v, s)


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
    """m <- b1 m + (1 - b1) d g, v <- b2 v + (1 - b2) (d g)^2 and, where D is updated (``sc.beta3``
    not None), s <- beta3 s + s_scale g[::p]; reads g, m, v, s once. Returns the new lists
    (``out``'s, written in place, or new tensors); s is returned as given when not updated."""
    b1, b2 = sc.betas
    k1, k2 = sc.decays
    om, ov, os_ = (None, None, None) if out is None else (out.exp_avg, out.exp_avg_sq, out.s)
    new_m: list[Tensor] | None = None if exp_avgs is None else []
    new_v: list[Tensor] = []
    new_s: list[Tensor] = []
    for i, g in enumerate(gs):
        if sc.ok is not None:  # the skip is folded into the scalars: 0 * g must be 0
            g = _robust.zero_nonfinite(g, out=_temp(g.shape, "g", g))
        dg = torch.mul(g, sc.weight, out=_temp(g.shape, "a", g, sc.weight))
        if exp_avgs is not None and new_m is not None:
            o = _at(om, i)
            new_m.append(_op("add", _op("mul", exp_avgs[i], k1, out=o), dg, alpha=1 - b1, out=o))
        o = _at(ov, i)
        new_v.append(_op("addcmul", _op("mul", exp_avg_sqs[i], k2, out=o), dg, dg, value=1 - b2, out=o))
        del dg
        if sc.beta3 is None:
            new_s.append(ss[i])
            continue
        o = _at(os_, i)
        new_s.append(_op("addcmul", _op("mul", ss[i], sc.beta3, out=o), g.flatten()[::slice_p], sc.s_scale, out=o))
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
    """x <- x * keep - dlr * m / (sqrt(v) + d_new * eps), with m, v the new moments; reads x, m, v
    once, writes x (into ``out.params``, or a new tensor). With no exp_avg (betas[0] == 0) the
    direction is ``d_new * g``, as in prodigyopt. ``keep``: the decoupled weight-decay factor."""
    assert sc.d_new is not None and sc.eps_d is not None, "update_params needs a finished StepScalars"
    neg_dlr, own = -sc.dlr, _own_temps()
    new_x = []
    for i, x in enumerate(xs):
        o = None if out is None else out.params[i]
        # den = (sqrt(v) + d_new * eps) / (-dlr), then one addcdiv: x + direction / den
        v = exp_avg_sqs[i]
        den = torch.sqrt(v, out=_temp(v.shape, "a", v))
        den = _op("div", _op("add", den, sc.eps_d, out=den if own else None), neg_dlr, out=den if own else None)
        if exp_avgs is not None:
            direction = exp_avgs[i]
        else:
            g = gs[i] if sc.ok is None else _robust.zero_nonfinite(gs[i], out=_temp(gs[i].shape, "g", gs[i]))
            direction = torch.mul(g, sc.d_new, out=_temp(g.shape, "b", g, sc.d_new))
        if sc.keep is not None:
            x = _op("mul", x, sc.keep, out=o)
        new_x.append(_op("addcdiv", x, direction, den, out=o))
    return new_x


def _op(name: str, t: Tensor, *args: Any, out: Tensor | None, **kwargs: Any) -> Tensor:
    """``torch.<name>(t, *args, **kwargs)`` written into ``out``: ``t`` itself (in place), another
    tensor, or None (a new tensor)."""
    if out is t:
        return getattr(t, name + "_")(*args, **kwargs)
    if out is None:
        return getattr(torch, name)(t, *args, **kwargs)
    return getattr(torch, name)(t, *args, **kwargs, out=out)


def _own_temps() -> bool:
    """Whether the ops after the first on a temporary of ours may work in place on it: in the
    optimizer's step, not in the pure one (whose ops stay differentiable: ``sqrt`` keeps its
    result for the backward) nor under torch.compile (values, not memory)."""
    return _scratch.active() and not torch.compiler.is_compiling()


def _at(ts: Sequence[Tensor] | None, i: int) -> Tensor | None:
    return None if ts is None else ts[i]


def _l1(t: Tensor, out: Tensor | None = None) -> Tensor:
    """||t||_1 accumulated in at least fp32, as ``abs`` (into ``out`` if given) then ``sum``: on
    CPU several times faster than ``torch.linalg.vector_norm(t, 1)`` (benchmarks/NOTES.md, change 3)."""
    return torch.abs(t, out=out).sum(dtype=_up_dtype(t.dtype))


def _temp(shape: torch.Size, slot: str, *operands: Tensor) -> Tensor | None:
    """Where the kernels put the result of an op on ``operands`` and the ops that follow on it:
    in the optimizer's step (``_scratch.active``) on CPU, a buffer reused by later steps (each
    slot holds one temporary at a time; CPU ops run in order) or, off CPU, a new one; None for
    small tensors (the heap serves them cheaply), in the pure step and under torch.compile:
    every op then makes a new tensor (a value)."""
    n = math.prod(shape)
    if n * operands[0].element_size() < _scratch.MIN_BYTES or not _scratch.active() or torch.compiler.is_compiling():
        return None
    dtype = torch.result_type(*operands) if len(operands) == 2 else operands[0].dtype
    buf = _scratch.buffer(n, dtype, operands[0].device, ("single", slot))
    return torch.empty(shape, dtype=dtype, device=operands[0].device) if buf is None else buf.view(shape)


def _up_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16-bit floats, else the dtype itself: reductions accumulate in at least fp32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _up(t: Tensor) -> Tensor:
    return t.to(_up_dtype(t.dtype))
