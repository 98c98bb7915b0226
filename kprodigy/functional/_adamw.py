"""The fused-AdamW backend: torch's fused AdamW kernel for m, v, x after a read-only statistics
pass (D on the host only: the kernel takes ``eps`` as a float), where ``usable`` says it is the math.

It steps ``Bucket``s: runs of small tensors whose m, v, s lie back to back (``PACKS``; gradients
gathered into a buffer), or slices of a large tensor; on CPU at most ``PACK_MAX`` / ``SLICE``
elements, so the scratch stays in cache: a dozen ops per bucket whatever the number of tensors.
``update`` runs ``torch._fused_adamw_`` with a state step of 1e9 (Adam's bias corrections exactly 1).

Scaled state (``FlatGroup.scaled``: the optimizer's kept plans). The tensors hold M = m / A,
V = v / B and T = s / C, with A, B the EMAs of d and d^2 (A <- b1 A + (1 - b1) d, B likewise with
b2 and d^2) and C the product of the beta3s. Prodigy's m <- b1 m + (1 - b1) d g is then Adam's
M <- b1' M + (1 - b1') g with b1' = b1 A_old / A, v's likewise, and its step is Adam's with
lr' = dlr A / sqrt(B), eps' = d_new eps / sqrt(B): the kernel takes the raw gradient, no
``d * g`` pass. ``s`` moves by one axpy, T <- T + (s_scale / C) g (``_s_rule``; rescaled to
C = 1 before C underflows). ``normalize`` multiplies the scales back in; the optimizer does so
before anything reads its state (``KProdigy.state``). Equal to the per-tensor kernels up to
float rounding (benchmarks/NOTES.md, "Scaled state").

Unscaled (the functional steps): the gradient times ``d_old`` in scratch (the CPU kernel's
``grad_scale`` would write the unscaled gradient into ``p.grad``), lr = dlr, eps = d_new eps:
bit-identical to the per-tensor kernels in float32 and float64 on CPU. With betas[0] == 0,
``m`` is a zeroed scratch (m = d_old g, scaled: m = g) and the step takes d_new instead of A.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor

from ._hyperparams import Hyperparams
from ._layout import SMALL, flat_span, p0_full, views
from ._scalars import StepScalars
from ._single import Ts
from ._state import Segment, SegmentResult, is_wrapped

__all__ = ["PACKS", "PURE", "SMALL", "S_FIRST", "Bucket", "FlatGroup", "dots", "gradients", "layout", "norms"]
__all__ += ["norm_scale", "normalize", "statistics", "unscaled_kwargs", "update", "usable"]

PURE = False  # update works in place; the engine steps copies for a pure step
PACKS = True  # the small params' state lies back to back (the plan lays it so)
S_FIRST = True  # ``dots`` then ``norms`` write ``s`` once per step where the engine can (``_engine``)

HUGE_STEP = 1e9  # Adam's bias corrections 1 - b^step are exactly 1 in float64
PACK_MAX = 1 << 18  # elements of small tensors in one bucket on CPU
SLICE = 1 << 17  # elements of a large tensor's slice on CPU (benchmarks/NOTES.md, "Native path")
RUN_MIN = 4  # tensors per run, on average, from which a packed bucket is gathered by ``cat``
_FIXED = {"weight_decay": 0.0, "amsgrad": False, "maximize": False, "grad_scale": None, "found_inf": None}


def usable(seg: Segment) -> bool:
    """Whether these kernels compute exactly this segment's step: plain float32/float64 tensors on
    one CPU or CUDA device, contiguous or (slice_p 1, betas[0] > 0, the raw gradient) dense with
    dim 0 outermost and x, g, m, v of one layout (channels_last: ``_in_rows``), state of their
    dtype and shape, no stochastic rounding."""
    hp = seg.hparams
    if hp.stochastic_rounding or not seg.params or (hp.betas[0] > 0) != (seg.exp_avg is not None):
        return False
    x0 = seg.params[0]
    device, dtype = x0.device, x0.dtype
    if device.type not in ("cpu", "cuda") or dtype not in (torch.float32, torch.float64):
        return False
    grad_mode = torch.is_grad_enabled()
    frozen = _frozen(seg)
    plain = hp.slice_p == 1 and hp.betas[0] > 0 and not _remade(hp)  # (what rows of a strided tensor take)
    ms = seg.exp_avg if seg.exp_avg is not None else seg.exp_avg_sq
    for x, g, m, v, s, p0 in zip(seg.params, seg.grads, ms, seg.exp_avg_sq, seg.s, seg.p0):
        if type(x) not in (Tensor, torch.nn.Parameter) or type(g) is not Tensor:
            return False
        if x.device != device or x.dtype != dtype or g.dtype != dtype or g.device != device:
            return False
        if m.dtype != dtype or v.dtype != dtype or s.dtype != dtype or v.shape != x.shape or m.shape != x.shape:
            return False
        if not (x.is_contiguous() and g.is_contiguous() and m.is_contiguous() and v.is_contiguous()):
            if not (_in_rows(x) and g.stride() == m.stride() == v.stride() == x.stride() and plain):
                return False
        n_s = 0 if frozen else -(-x.numel() // hp.slice_p)
        if s.numel() != n_s or (p0.numel() != n_s and not (p0.dim() == 0 and not frozen)):
            return False
        if grad_mode and x.requires_grad:
            return False
        if is_wrapped(x) or is_wrapped(g):
            return False
    return True


@dataclass(eq=False)
class Bucket:
    """Elements [lo, hi) of a group stepped together, ``s``, ``p0`` their (n_s,) statistics spans.
    Packed (``grad`` not None): the small tensors ``index``, ``grad`` (n,) its buffer of their
    gathered gradients (``grad_views``; ``work_views`` the same of the scratch), ``sliced`` the
    gathered ``g[::slice_p]`` (slice_p > 1). Slice (``grad`` None): 1-D views of ``index[0]``."""

    index: list[int]
    lo: int
    hi: int
    params: list[Tensor]
    m: list[Tensor]
    v: list[Tensor]
    s: Tensor
    p0: Tensor
    grad: Tensor | None = None
    grad_views: list[Tensor] = field(default_factory=list)
    work_views: list[Tensor] = field(default_factory=list)
    sliced: Tensor | None = None
    sliced_views: list[Tensor] = field(default_factory=list)
    x_views: list[Tensor] = field(default_factory=list)
    strided: list[list[Tensor]] = field(default_factory=list)  # slice_p > 1: each g[::p], x[::p] (views)
    whole: list[Tensor] = field(default_factory=list)  # a tensor's first slice: its flat x, m, v
    x_s: Tensor | None = None  # a slice's ``x[::slice_p]`` (a view, made once)
    logical: bool = False  # rows of a strided tensor (``_in_rows``): x, g copied in order for statistics
    split: int = 0  # a sliced tensor's gradient cut into slices of this many elements (rows if logical)
    grad_runs: list[tuple[Tensor, int, int]] = field(default_factory=list)  # ``_gather``'s into ``grad``
    work_runs: list[tuple[Tensor, int, int]] = field(default_factory=list)  # and into ``work``
    work_s: list[Tensor] = field(default_factory=list)  # the scratch ``work``, ``work2`` cut to (n_s,)


@dataclass(eq=False)
class FlatGroup:
    """A param group's buckets and their shared scratch: ``work``, ``work2`` (largest bucket,):
    ``p0 - x`` then ``|s_new|``; ``s_new`` then a slice's ``d_old * g``; ``work`` the zeroed ``m``
    when betas[0] == 0; ``work3`` a slice's effective gradient (made on first use). ``steps``: the
    huge state step of Adam's kernel (one 0-dim float32 tensor, repeated per tensor).

    ``scaled``: the state tensors hold m / A, v / B, s / C with ``scales`` = [A, B, C] (host
    floats; ``normalize`` multiplies them back in). Then Adam's kernel takes the raw gradients
    and ``s`` one axpy per step (module docstring); else the scales stay 1."""

    buckets: list[Bucket]
    work: Tensor
    work2: Tensor
    steps: list[Tensor]
    slice_p: int = 1
    work3: Tensor | None = None
    scaled: bool = False
    scales: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    anchored: bool = False  # A, B are set from d (``update``), not 1 (after ``normalize``)
    whole: tuple[Any, ...] | None = None  # ``_update_whole``'s lists, made on its first call


def layout(seg: Segment) -> FlatGroup:
    """The buckets of a ``usable`` segment laid out by ``_layout.pack_segment``."""
    p = seg.hparams.slice_p
    frozen = _frozen(seg)
    xs, vs, ss, p0s = list(seg.params), list(seg.exp_avg_sq), list(seg.s), list(seg.p0)
    ms = list(seg.exp_avg) if seg.exp_avg is not None else None
    on_cpu = xs[0].device.type == "cpu"
    runs: list[list[int]] = []  # packed runs of small tensors, and single large ones
    total = 0
    alone = [x.numel() >= SMALL or not x.is_contiguous() for x in xs]  # (sliced; the others packed)
    for i, x in enumerate(xs):
        n = x.numel()
        if alone[i]:
            runs.append([i])
            continue
        if not runs or runs[-1] and alone[runs[-1][0]] or on_cpu and total + n > PACK_MAX:
            runs.append([])
            total = 0
        runs[-1].append(i)
        total += n
    empty = xs[0].new_empty(0)
    buckets = []
    for idx in runs:
        x = xs[idx[0]]
        if alone[idx[0]] and not x.is_contiguous():
            buckets += _rows(idx[0], x, cast(list, ms), vs, ss, p0s, frozen, on_cpu)
            continue
        if alone[idx[0]]:
            i, n = idx[0], x.numel()
            p0 = empty if frozen else p0_full(p0s[i], -(-n // p))
            width = (SLICE // p) * p if on_cpu else n
            for lo in range(0, n, width):
                hi = min(lo + width, n)
                s_lo, s_hi = (0, 0) if frozen else (lo // p, -(-hi // p))
                m = [] if ms is None else [ms[i].view(-1)[lo:hi]]
                v = [vs[i].view(-1)[lo:hi]]
                buckets.append(Bucket([i], lo, hi, [x.view(-1)[lo:hi]], m, v, ss[i][s_lo:s_hi], p0[s_lo:s_hi]))
                buckets[-1].split = width
                if lo == 0 and ms is not None:
                    buckets[-1].whole = [x.view(-1), ms[i].view(-1), vs[i].view(-1)]
            continue
        params = [xs[i] for i in idx]
        laid = ([] if ms is None else [ms]) + [vs] + ([] if frozen else [ss])
        spans = [flat_span([ts[i] for i in idx]) for ts in laid]
        if any(span is None for span in spans):
            raise ValueError("the state of small params is not packed (_layout.pack_segment)")
        if frozen:
            s, p0 = empty, empty
        else:
            s = cast(Tensor, spans[-1])
            full = all(p0s[i].numel() == ss[i].numel() for i in idx)
            p0_span = flat_span([p0s[i] for i in idx]) if full else None
            p0 = p0_span if p0_span is not None else torch.cat([p0_full(p0s[i], ss[i].numel()) for i in idx])
        grad = torch.empty(sum(x.numel() for x in params), dtype=x.dtype, device=x.device)
        m = [] if ms is None else [ms[i] for i in idx]
        bucket = Bucket(idx, 0, grad.numel(), params, m, [vs[i] for i in idx], s, p0, grad, views(grad, params))
        if p > 1 and not frozen:
            bucket.sliced = torch.empty_like(s)
            bucket.sliced_views = views(bucket.sliced, [ss[i] for i in idx])
        buckets.append(bucket)
    width = max(b.hi - b.lo for b in buckets)
    work, work2 = (torch.empty(width, dtype=xs[0].dtype, device=xs[0].device) for _ in range(2))
    for b in buckets:
        b.work_s = [work[: b.s.numel()], work2[: b.s.numel()]]
        if b.grad is None and not b.logical:
            b.x_s = b.params[0][::p]
        else:
            b.work_views = views(work[: b.hi - b.lo], b.params)
            cats = _runs(b.params)
            b.grad_runs, b.work_runs = (_run_views(buf, b.params, cats) for buf in (cast(Tensor, b.grad), work))
            if b.sliced is not None:
                b.x_views = views(work[: b.s.numel()], b.sliced_views)
                b.strided = [[t.view(-1)[::p] for t in ts] for ts in (b.grad_views, b.params)]
    step = torch.full((), HUGE_STEP, dtype=torch.float32, device=xs[0].device)
    steps = [step] * max(len(b.params) for b in buckets)
    return FlatGroup(buckets, work, work2, steps, p)


def _rows(
    i: int, x: Tensor, ms: list[Tensor], vs: list[Tensor], ss: list[Tensor], p0s: list[Tensor], frozen: bool, on_cpu: bool
) -> list[Bucket]:
    """The buckets of strided tensor ``i`` (``_in_rows``; slice_p 1): runs of rows of about
    ``SLICE`` elements on CPU (at least one row), all of them elsewhere; ``whole`` on the first."""
    rows, row = x.size(0), x.numel() // x.size(0)
    step = max(1, SLICE // row) if on_cpu else rows
    p0 = p0s[i].new_empty(0) if frozen else p0_full(p0s[i], x.numel())
    out = []
    for a in range(0, rows, step):
        b = min(a + step, rows)
        lo, hi = a * row, b * row
        s, p0_ = (ss[i], p0) if frozen else (ss[i][lo:hi], p0[lo:hi])
        out.append(Bucket([i], lo, hi, [x[a:b]], [ms[i][a:b]], [vs[i][a:b]], s, p0_, logical=True, split=step))
    out[0].whole = [x, ms[i], vs[i]]
    return out


def _in_rows(x: Tensor) -> bool:
    """Whether ``x``'s memory is one dense block with dim 0 outermost (channels_last, for one):
    its rows ``x[a:b]`` are blocks too, stepped as they lie, their statistics on copies in
    ``x``'s logical (row-major) order, the order of ``p0`` and ``s`` (``Bucket.logical``)."""
    if x.dim() < 2 or not x.numel():
        return False
    expected = 1
    for size, stride in sorted(zip(x.shape, x.stride()), key=lambda pair: pair[1]):
        if size != 1 and stride != expected:
            return False  # (overlapping, or gaps)
        expected *= size
    return x.size(0) == 1 or x.stride(0) == x.numel() // x.size(0)


def _runs(xs: list[Tensor]) -> list[tuple[int, int]]:
    """Runs [i, j) of ``xs`` that ``torch.cat`` joins along dim 0 (one ndim >= 1, the same trailing
    dims), where they average at least ``RUN_MIN`` tensors (one cat per run is then cheaper than a
    copy per tensor: benchmarks/NOTES.md, "gathers by cat"), else none (``_gather`` copies)."""
    runs: list[tuple[int, int]] = []
    for i, x in enumerate(xs):
        if x.dim() == 0 or not x.numel():  # (cat takes neither a 0-dim nor a (5, 0) run's view)
            return []
        if runs and xs[runs[-1][0]].shape[1:] == x.shape[1:] and xs[runs[-1][0]].dim() == x.dim():
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs if len(runs) * RUN_MIN <= len(xs) else []


def _run_views(flat: Tensor, xs: list[Tensor], runs: list[tuple[int, int]]) -> list[tuple[Tensor, int, int]]:
    """Per run, the part of ``flat`` its tensors fill, shaped (rows, *trailing dims)."""
    out, at = [], 0
    for i, j in runs:
        n = sum(x.numel() for x in xs[i:j])
        out.append((flat[at : at + n].view(-1, *xs[i].shape[1:]), i, j))
        at += n
    return out


def _gather(runs: list[tuple[Tensor, int, int]], views_: list[Tensor], ts: list[Tensor]) -> None:
    """``ts`` copied into a packed bucket's buffer: one ``cat`` per run, else a copy per tensor."""
    if not runs:
        torch._foreach_copy_(views_, ts)
        return
    for out, i, j in runs:
        torch.cat(ts[i:j], out=out)


def _frozen(seg: Segment) -> bool:
    """Whether D is frozen for this segment: ``s`` and ``p0`` are empty placeholders."""
    return not any(s.numel() for s in seg.s) and any(x.numel() for x in seg.params)


def gradients(seg: Segment, lay: FlatGroup, grads: Ts) -> list[Tensor]:
    """Each bucket's (n,) gradient: a packed one's buffer of its effective gradients (gathered), a
    slice's view of its raw gradient (made effective by ``_grad``)."""
    hp = seg.hparams
    out: list[Tensor] = []
    pieces: Iterator[Tensor] = iter(())  # the slices of the current large tensor's gradient
    for b in lay.buckets:
        if b.grad is None:
            if b.lo == 0:  # (its first slice: one ``split`` for all)
                g = grads[b.index[0]]
                pieces = iter(g.split(b.split) if b.logical else g.view(-1).split(b.split))
            out.append(next(pieces))
            continue
        _gather(b.grad_runs, b.grad_views, [grads[i] for i in b.index])
        if hp.maximize:
            b.grad.neg_()
        if hp.coupled_decay:
            torch._foreach_add_(b.grad_views, b.params, alpha=hp.weight_decay)
        if b.sliced is not None:
            torch._foreach_copy_(b.sliced_views, b.strided[0])
        out.append(b.grad)
    return out


def _remade(hp: Hyperparams) -> bool:
    """Whether the effective gradient differs from the raw one (``maximize``, coupled decay): a
    slice's is then made in scratch (``_grad``)."""
    return hp.maximize or hp.coupled_decay


def _grad(fg: FlatGroup, b: Bucket, g: Tensor, hp: Hyperparams) -> Tensor:
    """A bucket's effective gradient: a slice's into ``work3``, from the params before ``update``."""
    if b.grad is not None or not _remade(hp):
        return g
    out = _work3(fg)[: b.hi - b.lo]
    if hp.maximize:
        torch.neg(g, out=out)
        return out.add_(b.params[0], alpha=hp.weight_decay) if hp.coupled_decay else out
    return torch.add(g, b.params[0], alpha=hp.weight_decay, out=out)


def _work3(fg: FlatGroup) -> Tensor:
    if fg.work3 is None:
        fg.work3 = torch.empty_like(fg.work)
    return fg.work3


def _in_order(buf: Tensor, t: Tensor) -> Tensor:
    """``t`` (rows of a strided tensor) copied into ``buf`` in logical order, flat."""
    return buf[: t.numel()].view(t.shape).copy_(t).view(-1)


def _sliced(fg: FlatGroup, b: Bucket, g: Tensor) -> Tensor:
    """The bucket's (n_s,) ``g[::slice_p]`` of its effective gradient ``g`` (in logical order)."""
    if b.sliced is not None:
        return b.sliced
    if b.logical:
        return _in_order(_work3(fg), g)
    return g if fg.slice_p == 1 else g[:: fg.slice_p]


def statistics(seg: Segment, lay: FlatGroup, grads: Ts, sc: StepScalars) -> tuple[Tensor, Tensor]:
    """Writes only scratch: per bucket ``_dot`` and ``_norm`` (``s`` read, not written); the norm
    is that of the stored ``s / C``: times ``norm_scale``, taken before, it is sum ||s||_1."""
    dots, norms = [], []
    rule = _s_rule(lay, sc)
    for b, gb in zip(lay.buckets, grads):
        g = _sliced(lay, b, _grad(lay, b, gb, seg.hparams))
        dots.append(_dot(lay, b, g))
        norms.append(_norm(lay, b, g, rule, write_s=False))
    return _total(dots), _total(norms)


def dots(seg: Segment, lay: FlatGroup, grads: Ts, sc: StepScalars) -> Tensor:
    """The first half of ``statistics`` alone (reads only): sum <g, p0 - x>. With ``norms(...,
    write_s=True)`` after it, the engine writes ``s`` once per step (``S_FIRST``)."""
    return _total([_dot(lay, b, _sliced(lay, b, _grad(lay, b, gb, seg.hparams))) for b, gb in zip(lay.buckets, grads)])


def norms(seg: Segment, lay: FlatGroup, grads: Ts, sc: StepScalars) -> Tensor:
    """The second half of ``statistics``, writing this step's ``s`` in place (``update`` must then
    leave it: ``sc.beta3`` None there): sum ||beta3 s + s_scale g||_1 / ``norm_scale`` (taken before)."""
    out = []
    rule = _s_rule(lay, sc)
    for b, gb in zip(lay.buckets, grads):  # (one bucket at a time: ``_grad`` may reuse scratch)
        out.append(_norm(lay, b, _sliced(lay, b, _grad(lay, b, gb, seg.hparams)), rule, write_s=True))
    lay.scales[2] = rule[2]
    return _total(out)


def norm_scale(lay: FlatGroup, sc: StepScalars) -> float:
    """C after this step's ``s`` update (``_s_rule``): the factor of the norms ``statistics`` and
    ``norms`` return (the engine multiplies it in on the host: no op per step)."""
    return _s_rule(lay, sc)[2] if sc.beta3 is not None else lay.scales[2]


def _dot(fg: FlatGroup, b: Bucket, g: Tensor) -> Tensor:
    """<g, p0 - x> of a bucket (``g`` its sliced effective gradient)."""
    work = b.work_s[0]
    if b.logical:
        x = _in_order(work, b.params[0])
    elif b.x_s is not None:
        x = b.x_s
    elif b.sliced is not None:
        torch._foreach_copy_(b.x_views, b.strided[1])
        x = work
    else:
        _gather(b.work_runs, b.work_views, b.params)
        x = work
    return torch.dot(g, torch.sub(b.p0, x, out=work))


S_FLOOR = 2.0**-20  # the s scale C below which ``s`` is rescaled to C = 1 as it is written


def _s_rule(fg: FlatGroup, sc: StepScalars) -> tuple[float | None, float, float]:
    """How this step writes the stored ``s`` (s / C) of a part: (decay, alpha, C after). Scaled,
    while C beta3 >= ``S_FLOOR``: s / C <- s / C + (s_scale / (C beta3)) g, one axpy, C <- C beta3
    (decay None). Else s <- (C beta3) (s / C) + s_scale g and C <- 1, prodigyopt's ops."""
    c = fg.scales[2] * cast(float, sc.beta3)
    if fg.scaled and c >= S_FLOOR:
        return None, sc.s_scale / c, c
    return c, sc.s_scale, 1.0


def _norm(fg: FlatGroup, b: Bucket, g: Tensor, rule: tuple[float | None, float, float], *, write_s: bool) -> Tensor:
    """||s_new / C||_1 of a bucket (``_s_rule``): the new ``s`` in scratch, or written into ``s``
    (the ops of ``update``)."""
    s_new = _s_write(b.s, g, rule, None if write_s else b.work_s[1])
    return torch.abs(s_new, out=b.work_s[0]).sum()


def _s_write(s: Tensor, g: Tensor, rule: tuple[float | None, float, float], out: Tensor | None) -> Tensor:
    """The new stored ``s`` of a bucket (``_s_rule``): in place, or into ``out``."""
    decay, alpha, _ = rule
    if decay is None:
        return s.add_(g, alpha=alpha) if out is None else torch.add(s, g, alpha=alpha, out=out)
    return (s.mul_(decay) if out is None else torch.mul(s, decay, out=out)).add_(g, alpha=alpha)


def _total(ts: list[Tensor]) -> Tensor:
    return ts[0] if len(ts) == 1 else torch.stack(ts).sum()


def update(seg: Segment, lay: FlatGroup, grads: Ts, sc: StepScalars, out: SegmentResult | None) -> SegmentResult:
    """In place only (not ``PURE``), D on the host."""
    assert out is not None and sc.d_new is not None and sc.ok is None, "in place, with D on the host"
    fg, hp = lay, seg.hparams
    (b1, b2), (a, b) = hp.betas, fg.scales[:2]
    d_old, d_new, dlr = sc.weight, sc.d_new, sc.dlr
    if fg.scaled and not fg.anchored:  # A, B of this d: then b1' <= b1, b2' <= b2 (d never decreases)
        _multiply(fg, [a / d_old, b / (d_old * d_old), 1.0])
        fg.scales[:2] = a, b = d_old, d_old * d_old
        fg.anchored = True
    if fg.scaled:  # m = A M, v = B V: Adam's update of M, V on the raw gradient (module docstring)
        a_new, beta1 = _ema(b1, sc.gains[0], a, d_old) if b1 > 0 else (1.0, b1)
        b_new, beta2 = _ema(b2, sc.gains[1], b, d_old * d_old)
        root, factor = math.sqrt(b_new), None  # (sqrt(fl(d * d)) == d: lr == dlr while d stays)
        lr, eps = (dlr * a_new if b1 > 0 else dlr * d_new) / root, d_new * hp.eps / root
        kwargs: dict[str, Any] = {**_FIXED, "lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps}
    else:  # the gradient times d_old in scratch
        kwargs, factor = unscaled_kwargs(sc, b1 > 0), d_old
    rule = _s_rule(fg, sc) if sc.beta3 is not None else None
    if rule is None and factor is None and b1 > 0 and not _remade(hp):
        _update_whole(fg, grads, sc.decay, kwargs)  # (nothing per bucket: one kernel call)
    else:
        _update_buckets(fg, hp, grads, rule, factor, sc.decay, kwargs)
    if fg.scaled:
        fg.scales[:2] = [a_new, b_new]
    if rule is not None:
        fg.scales[2] = rule[2]
    return out


def unscaled_kwargs(sc: StepScalars, keeps_m: bool) -> dict[str, Any]:
    """The keywords that make ``torch._fused_adamw_`` Prodigy's m, v, x update of unscaled state,
    the gradient given times d_old (``sc.weight``): lr = dlr, eps = d_new * eps, Adam's bias
    corrections 1 (``HUGE_STEP`` state steps, the caller's); without m (betas[0] == 0, a zeroed
    scratch m = d_old g) lr = dlr d_new / d_old: the step dlr * d_new * g / den. Decoupled decay
    apart (x - decay * x as prodigyopt, not x * (1 - decay))."""
    lr = sc.dlr if keeps_m else sc.dlr * sc.d_new / sc.weight
    return {**_FIXED, "lr": lr, "beta1": sc.decays[0], "beta2": sc.decays[1], "eps": sc.eps_d}


def _update_whole(fg: FlatGroup, grads: Ts, decay: Any, kwargs: dict[str, Any]) -> None:
    """The update as one kernel call over whole tensors (where no bucket needs scratch): the
    packed buckets' params with their gathered gradients, each sliced tensor whole."""
    if fg.whole is None:  # (the lists but the sliced tensors' gradients are the same every step)
        fg.whole = _whole_lists(fg)
    xs, gs, ms, vs, steps, slots = fg.whole
    gs = list(gs)
    for at, j in slots:  # a sliced tensor's contiguous gradient, from its first slice
        gs[at] = grads[j].as_strided(xs[at].shape, xs[at].stride())
    if decay:
        torch._foreach_add_(xs, xs, alpha=-decay)
    torch._fused_adamw_(xs, gs, ms, vs, [], steps, **kwargs)


def _whole_lists(fg: FlatGroup) -> tuple[Any, ...]:
    """``_update_whole``'s x, g (None where a sliced tensor's comes each step), m, v and step lists,
    and (position, bucket) of those gradients."""
    xs, ms, vs, slots = [], [], [], []
    gs: list[Tensor | None] = []
    for j, b in enumerate(fg.buckets):
        if b.grad is not None:
            xs += b.params
            gs += b.grad_views
            ms += b.m
            vs += b.v
        elif b.whole:
            x, m, v = b.whole
            slots.append((len(xs), j))
            xs.append(x)
            gs.append(None)
            ms.append(m)
            vs.append(v)
    return xs, gs, ms, vs, [fg.steps[0]] * len(xs), slots


def _update_buckets(
    fg: FlatGroup, hp: Hyperparams, grads: Ts, rule: Any, factor: Any, decay: Any, kwargs: dict[str, Any]
) -> None:
    """The update bucket by bucket: ``s`` written (``rule``), the gradient times ``factor`` or
    a zeroed ``m`` (betas[0] == 0) in scratch, or the effective gradient of a slice."""
    b1 = hp.betas[0]
    for bk, gb in zip(fg.buckets, grads):
        n = bk.hi - bk.lo
        g = _grad(fg, bk, gb, hp)
        if rule is not None:
            _s_write(bk.s, _sliced(fg, bk, g), rule, None)
        if bk.grad is not None:
            gs = bk.grad_views
            if factor is not None:
                bk.grad.mul_(factor)
        else:
            gs = [g if factor is None else torch.mul(g, factor, out=fg.work2[:n].as_strided(g.shape, g.stride()))]
        ms = bk.m
        if b1 <= 0:
            fg.work[:n].zero_()
            ms = bk.work_views if bk.grad is not None else [fg.work[:n]]
        if decay:
            torch._foreach_add_(bk.params, bk.params, alpha=-decay)
        torch._fused_adamw_(bk.params, gs, ms, bk.v, [], fg.steps[: len(bk.params)], **kwargs)


def _ema(beta: float, gain: float, old: float, value: float) -> tuple[float, float]:
    """A scale's EMA step and Adam's beta for it: (beta old + gain value, beta old / new); while
    the scale equals ``value`` (d unchanged), exactly (old, beta), so that 1 - beta loses nothing."""
    if old == value:
        return old, beta
    new = beta * old + gain * value
    return new, beta * old / new


def normalize(lay: FlatGroup) -> None:
    """Multiply the scales into the stored m, v, s (``FlatGroup``): they hold prodigyopt's values
    again, and the scales are 1 (the next ``update`` sets A, B from d again)."""
    if lay.scales != [1.0, 1.0, 1.0]:  # (a read of the optimizer's state after another: nothing to do)
        _multiply(lay, lay.scales)
    lay.scales[:] = [1.0, 1.0, 1.0]
    lay.anchored = False


def _multiply(lay: FlatGroup, factors: list[float]) -> None:
    """The stored m, v, s times ``factors`` (one each; 1 leaves it)."""
    for key, factor in zip(("m", "v", "s"), factors):
        ts = [t for b in lay.buckets for t in ([b.s] if key == "s" else getattr(b, key)) if t.numel()]
        if ts and factor != 1.0:
            torch._foreach_mul_(ts, factor)
