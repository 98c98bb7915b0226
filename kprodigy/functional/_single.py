"""Per-tensor kernels: the specification of the step's elementwise passes, one tensor at a time.

The backend contract, the same in every backend (``_foreach``, ``_fused``, ``_factored``,
``_adamw``); ``seg`` is a ``Segment`` (one param group's tensors of one dtype), ``lay`` what
``layout`` returned for it (kept by the plan while the tensors stay the same):

- ``layout(seg)``: what the backend keeps between steps (None here);
- ``gradients(seg, lay, grads)``: the effective gradients the passes read (``-g`` with
  ``maximize``, ``+ wd * x`` with coupled weight decay, in the state's dtype); never written
  into ``p.grad``;
- ``statistics(seg, lay, grads, sc) -> (sum <g[::p], p0 - x[::p]>, sum ||beta3 s + s_scale
  g[::p]||_1)``: reads params, gradients, ``s`` and ``p0``, writes nothing; 0-dim tensors in
  the params' dtype (at least float32);
- the engine reduces them, updates D (``_scalars.next_d``) and finishes the scalars;
- ``update(seg, lay, grads, sc, out) -> SegmentResult`` writes the new m, v, s and x into
  ``out``: the segment's own tensors (in place), or None for new tensors (backends with
  ``PURE = True`` only: differentiable and safe under ``torch.func.vmap``; the engine steps
  copies in place for the others).

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
from ._hyperparams import Hyperparams
from ._scalars import StepScalars
from ._state import Segment, SegmentResult

__all__ = ["PURE", "gradients", "layout", "statistics", "update", "update_moments", "update_params"]

PURE = True  # update(out=None) computes new tensors with out-of-place ops


def layout(seg: Segment) -> None:
    return None


def gradients(seg: Segment, lay: Any, grads: Sequence[Tensor]) -> list[Tensor]:
    """-g if maximize, plus wd * x if coupled weight decay, in the state's dtype; new tensors."""
    return effective_grads(seg.params, grads, seg.exp_avg_sq, seg.hparams, foreach=False)


def effective_grads(
    xs: Sequence[Tensor], gs: Sequence[Tensor], like: Sequence[Tensor], hp: Hyperparams, *, foreach: bool
) -> list[Tensor]:
    """-g if maximize, plus wd * x if coupled weight decay (new tensors, never ``p.grad``), each
    in the dtype of ``like[i]`` (float32 state of 16-bit params: ``d * g`` neither underflows nor
    rounds to 8 bits), with per-tensor or ``_foreach`` ops."""
    out = list(gs)
    coupled = hp.weight_decay > 0 and not hp.decouple
    if foreach and out:
        if hp.maximize:
            out = list(torch._foreach_neg(out))
        if coupled:
            out = list(torch._foreach_add(out, list(xs), alpha=hp.weight_decay))
    else:
        if hp.maximize:
            out = [torch.neg(g) for g in out]
        if coupled:
            out = [torch.add(g, x, alpha=hp.weight_decay) for g, x in zip(out, xs)]
    return [g if g.dtype == v.dtype else g.to(v.dtype) for g, v in zip(out, like)]


def statistics(seg: Segment, lay: Any, grads: Sequence[Tensor], sc: StepScalars) -> tuple[Tensor, Tensor]:
    """The contract's statistics (``statistics_of`` over the segment)."""
    return statistics_of(seg.params, grads, seg.s, seg.p0, sc=sc, slice_p=seg.hparams.slice_p)


def update(seg: Segment, lay: Any, grads: Sequence[Tensor], sc: StepScalars, out: SegmentResult | None) -> SegmentResult:
    """The contract's update (``update_of`` over the segment)."""
    return update_of(seg.params, grads, seg.exp_avg, seg.exp_avg_sq, seg.s, sc=sc, slice_p=seg.hparams.slice_p, out=out)


def statistics_of(
    xs: Sequence[Tensor], gs: Sequence[Tensor], ss: Sequence[Tensor], p0s: Sequence[Tensor], *, sc: StepScalars, slice_p: int
) -> tuple[Tensor, Tensor]:
    """The D statistics of one group; reads g, x, p0, s once and writes nothing.

    Returns ``sum <g[::p], p0 - x[::p]>`` and ``sum ||beta3 * s + s_scale * g[::p]||_1`` (the
    norm of the new s), 0-dim tensors in the params' dtype (at least float32)."""
    own = _own_temps()
    dots: list[Tensor] = []
    norms: list[Tensor] = []
    for x, g, s, p0 in zip(xs, gs, ss, p0s):
        g, x = g.flatten()[::slice_p], x.flatten()[::slice_p]
        diff = torch.sub(p0, x, out=_temp(x.shape, "a", p0, x))
        dots.append(torch.dot(_up(g), _up(diff)))
        del diff
        s_new = _op("mul", s, sc.beta3, out=_temp(s.shape, "a", s))  # the new s: a temporary (``update`` writes it)
        s_new = _axpy(s_new, g, sc.s_scale, out=s_new if own else None)  # s + s_scale * g
        norms.append(_l1(s_new, out=s_new if own else None))
    return torch.stack(dots).sum(), torch.stack(norms).sum()


def update_of(
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
    w1, w2 = sc.gains
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
            new_m.append(_op("add", _op("mul", exp_avgs[i], k1, out=o), dg, alpha=w1, out=o))
        o = _at(ov, i)
        new_v.append(_op("addcmul", _op("mul", exp_avg_sqs[i], k2, out=o), dg, dg, value=w2, out=o))
        del dg
        if sc.beta3 is None:
            new_s.append(ss[i])
            continue
        o = _at(os_, i)
        new_s.append(_axpy(_op("mul", ss[i], sc.beta3, out=o), g.flatten()[::slice_p], sc.s_scale, out=o))
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
    """x <- x - decay * x - dlr * m / (sqrt(v) + d_new * eps), with m, v the new moments; reads x,
    m, v once, writes x (into ``out.params``, or a new tensor). With no exp_avg (betas[0] == 0)
    the direction is ``d_new * g``, as in prodigyopt. ``decay``: wd * dlr, decoupled decay."""
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
        if sc.decay is not None:
            x = _axpy(x, x, -sc.decay, out=o)
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


def _axpy(t: Tensor, g: Tensor, a: Any, out: Tensor | None) -> Tensor:
    """``t + a * g`` into ``out`` (as ``_op``): ``a`` a Python number or a 0-dim tensor."""
    if isinstance(a, Tensor):
        return _op("addcmul", t, g, a, out=out)
    return _op("add", t, g, alpha=a, out=out)


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
