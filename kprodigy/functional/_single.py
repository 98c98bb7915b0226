"""Per-tensor kernels: the specification of the step's elementwise passes, one tensor at a time.

The backend contract, the same in every backend; ``seg`` is a ``Segment`` (one dtype), ``lay``
what ``layout(seg)`` returned for it (kept by the plan while the tensors stay; None here):

- ``gradients(seg, lay, grads)``: the effective gradients (``-g`` with ``maximize``, ``+ wd * x``
  with coupled decay, in the state's dtype), never written into ``p.grad``;
- ``statistics(seg, lay, grads, sc) -> (sum <g[::p], p0 - x[::p]>, sum ||beta3 s + s_scale
  g[::p]||_1)``: writes nothing; 0-dim tensors in the params' dtype (at least float32);
- ``update(seg, lay, grads, sc, out) -> SegmentResult``: the new m, v, s, x written into ``out``
  (the segment's tensors), or new tensors for ``out=None`` (``PURE`` backends only: safe under
  ``torch.func.vmap``); ``sc`` finished by the engine with the new D.

The eager backends' ``update`` is two halves, ``update_moments`` (m, v, s) and ``update_params``
(x), which ``_partial.py`` runs apart: the same ATen kernels in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import _robust, _scratch
from ._hyperparams import Hyperparams
from ._scalars import StepScalars
from ._state import Segment, SegmentResult, compute_dtype

__all__ = ["PURE", "gradients", "layout", "statistics", "update", "update_moments", "update_params"]

PURE = True  # update(out=None) computes new tensors with out-of-place ops
Ts = Sequence[Tensor]
Moments = tuple[list[Tensor] | None, list[Tensor], list[Tensor]]  # new m (None without it), v, s


def layout(seg: Segment) -> None:
    return None


def gradients(seg: Segment, lay: Any, grads: Ts) -> list[Tensor]:
    return effective_grads(seg.params, grads, seg.exp_avg_sq, seg.hparams, foreach=False)


def effective_grads(xs: Ts, gs: Ts, like: Ts, hp: Hyperparams, *, foreach: bool) -> list[Tensor]:
    """-g if maximize, plus wd * x if coupled weight decay (new tensors), each in the dtype of
    ``like[i]`` (float32 state of 16-bit params: ``d * g`` neither underflows nor rounds to 8 bits)."""
    out = list(gs)
    coupled = hp.coupled_decay
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


def statistics(seg: Segment, lay: Any, grads: Ts, sc: StepScalars) -> tuple[Tensor, Tensor]:
    return statistics_of(seg.params, grads, seg.s, seg.p0, sc=sc, slice_p=seg.hparams.slice_p)


def statistics_of(xs: Ts, gs: Ts, ss: Ts, p0s: Ts, *, sc: StepScalars, slice_p: int) -> tuple[Tensor, Tensor]:
    """The contract's statistics over lists; reads g, x, p0, s once."""
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
    xs: Ts, gs: Ts, ms: Ts | None, vs: Ts, ss: Ts, *, sc: StepScalars, slice_p: int, out: SegmentResult | None
) -> SegmentResult:
    """The contract's update over lists: ``update_moments``, then ``update_params`` with the new m, v."""
    m, v, s = update_moments(gs, ms, vs, ss, sc=sc, slice_p=slice_p, out=out)
    return SegmentResult(update_params(xs, gs, m, v, sc=sc, out=out), m, v, s)


def update_moments(
    gs: Ts, exp_avgs: Ts | None, exp_avg_sqs: Ts, ss: Ts, *, sc: StepScalars, slice_p: int, out: SegmentResult | None
) -> Moments:
    """m <- b1 m + (1 - b1) d g, v <- b2 v + (1 - b2) (d g)^2 and, where D is updated (``sc.beta3``
    not None), s <- beta3 s + s_scale g[::p]; reads g, m, v, s once. Returns the new lists (``out``'s,
    written in place, or new tensors); s as given when not updated."""
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
    xs: Ts, gs: Ts, exp_avgs: Ts | None, exp_avg_sqs: Ts, *, sc: StepScalars, out: SegmentResult | None
) -> list[Tensor]:
    """x <- x - decay * x - dlr * m / (sqrt(v) + d_new * eps), m and v the new moments; reads x, m, v
    once, writes x (into ``out.params``, or a new tensor). Without exp_avg (betas[0] == 0) the
    direction is ``d_new * g``, as in prodigyopt. ``decay``: wd * dlr, decoupled decay."""
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


def by_halves(moments: Callable[..., Moments], params: Callable[..., list[Tensor]]) -> Callable[..., SegmentResult]:
    """A backend's ``update`` from its halves: ``moments``, then ``params`` with the new m, v."""

    def update(seg: Segment, lay: Any, grads: Ts, sc: StepScalars, out: SegmentResult | None) -> SegmentResult:
        m, v, s = moments(grads, seg.exp_avg, seg.exp_avg_sq, seg.s, sc=sc, slice_p=seg.hparams.slice_p, out=out)
        return SegmentResult(params(seg.params, grads, m, v, sc=sc, out=out), m, v, s)

    return update


update = by_halves(update_moments, update_params)


def _op(name: str, t: Tensor, *args: Any, out: Tensor | None, **kwargs: Any) -> Tensor:
    """``torch.<name>(t, *args, **kwargs)`` into ``out``: ``t`` itself (in place), another tensor,
    or None (a new tensor)."""
    if out is t:
        return getattr(t, name + "_")(*args, **kwargs)
    if out is None:
        return getattr(torch, name)(t, *args, **kwargs)
    return getattr(torch, name)(t, *args, **kwargs, out=out)


def _axpy(t: Tensor, g: Tensor, a: Any, out: Tensor | None) -> Tensor:
    """``t + a * g`` into ``out`` (as ``_op``), ``a`` a Python number or a 0-dim tensor."""
    if isinstance(a, Tensor):
        return _op("addcmul", t, g, a, out=out)
    return _op("add", t, g, alpha=a, out=out)


def _own_temps() -> bool:
    """Whether later ops may work in place on our first op's temporary: not in the pure step (``sqrt``
    keeps its result for the backward) nor under torch.compile (values, not memory)."""
    return _scratch.active() and not torch.compiler.is_compiling()


def _at(ts: Ts | None, i: int) -> Tensor | None:
    return None if ts is None else ts[i]


def _l1(t: Tensor, out: Tensor | None = None) -> Tensor:
    """||t||_1 in at least fp32, as ``abs`` (into ``out``) then ``sum``: on CPU several times faster
    than ``torch.linalg.vector_norm(t, 1)`` (benchmarks/NOTES.md, change 3)."""
    return torch.abs(t, out=out).sum(dtype=compute_dtype(t.dtype))


def _temp(shape: torch.Size, slot: str, *operands: Tensor) -> Tensor | None:
    """Where an op on ``operands`` and the ops after it write in the in-place step: on CPU a reused
    buffer (a slot holds one temporary at a time; CPU ops run in order), else a new one; None (a
    new tensor per op) for small tensors, in the pure step and under torch.compile."""
    n = math.prod(shape)
    if n * operands[0].element_size() < _scratch.MIN_BYTES or not _scratch.active() or torch.compiler.is_compiling():
        return None
    dtype = torch.result_type(*operands) if len(operands) == 2 else operands[0].dtype
    buf = _scratch.buffer(n, dtype, operands[0].device, ("single", slot))
    return torch.empty(shape, dtype=dtype, device=operands[0].device) if buf is None else buf.view(shape)


def _up(t: Tensor) -> Tensor:
    return t.to(compute_dtype(t.dtype))
