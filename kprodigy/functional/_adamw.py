"""The fused-AdamW backend: torch's fused AdamW kernel for m, v, x after a read-only statistics
pass (D on the host only: the kernel takes ``eps`` as a float), where ``usable`` says it is the math.

It steps ``Bucket``s: runs of small tensors whose m, v, s lie back to back (``PACKS``; gradients
gathered into a buffer), or slices of a large tensor; on CPU at most ``PACK_MAX`` / ``SLICE``
elements, so the scratch stays in cache: a dozen ops per bucket whatever the number of tensors.
``update`` runs ``torch._fused_adamw_`` with ``lr = dlr``, ``eps = d_new * eps``, the gradient
times ``d_old`` in scratch (the CPU kernel's ``grad_scale`` would write the unscaled gradient into
``p.grad``) and a state step of 1e9 (Adam's bias corrections exactly 1): bit-identical to the
per-tensor kernels in float32 and float64 on CPU (benchmarks/NOTES.md, "Native path"). With
betas[0] == 0, ``m`` is a zeroed scratch (m = d_old g) and lr = dlr d_new / d_old.
"""

from __future__ import annotations

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
__all__ += ["statistics", "update", "usable"]

PURE = False  # update works in place; the engine steps copies for a pure step
PACKS = True  # the small params' state lies back to back (the plan lays it so)
S_FIRST = True  # ``dots`` then ``norms`` write ``s`` once per step where the engine can (``_engine``)

HUGE_STEP = 1e9  # Adam's bias corrections 1 - b^step are exactly 1 in float64
PACK_MAX = 1 << 18  # elements of small tensors in one bucket on CPU
SLICE = 1 << 17  # elements of a large tensor's slice on CPU (benchmarks/NOTES.md, "Native path")
_FIXED = {"weight_decay": 0.0, "amsgrad": False, "maximize": False, "grad_scale": None, "found_inf": None}


def usable(seg: Segment) -> bool:
    """Whether these kernels compute exactly this segment's step: plain contiguous float32/float64
    tensors on one CPU or CUDA device, state of their dtype and shape, no stochastic rounding."""
    hp = seg.hparams
    if hp.stochastic_rounding or not seg.params or (hp.betas[0] > 0) != (seg.exp_avg is not None):
        return False
    x0 = seg.params[0]
    device, dtype = x0.device, x0.dtype
    if device.type not in ("cpu", "cuda") or dtype not in (torch.float32, torch.float64):
        return False
    grad_mode = torch.is_grad_enabled()
    frozen = _frozen(seg)
    ms = seg.exp_avg if seg.exp_avg is not None else seg.exp_avg_sq
    for x, g, m, v, s, p0 in zip(seg.params, seg.grads, ms, seg.exp_avg_sq, seg.s, seg.p0):
        if type(x) not in (Tensor, torch.nn.Parameter) or type(g) is not Tensor:
            return False
        if x.device != device or x.dtype != dtype or g.dtype != dtype or g.device != device:
            return False
        if m.dtype != dtype or v.dtype != dtype or s.dtype != dtype or v.shape != x.shape or m.shape != x.shape:
            return False
        if not (x.is_contiguous() and g.is_contiguous() and m.is_contiguous() and v.is_contiguous()):
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


@dataclass(eq=False)
class FlatGroup:
    """A param group's buckets and their shared scratch: ``work``, ``work2`` (largest bucket,):
    ``p0 - x`` then ``|s_new|``; ``s_new`` then a slice's ``d_old * g``; ``work`` the zeroed ``m``
    when betas[0] == 0; ``work3`` a slice's effective gradient (made on first use). ``steps``: the
    huge state step of Adam's kernel (one 0-dim float32 tensor, repeated per tensor)."""

    buckets: list[Bucket]
    work: Tensor
    work2: Tensor
    steps: list[Tensor]
    slice_p: int = 1
    work3: Tensor | None = None


def layout(seg: Segment) -> FlatGroup:
    """The buckets of a ``usable`` segment laid out by ``_layout.pack_segment``."""
    p = seg.hparams.slice_p
    frozen = _frozen(seg)
    xs, vs, ss, p0s = list(seg.params), list(seg.exp_avg_sq), list(seg.s), list(seg.p0)
    ms = list(seg.exp_avg) if seg.exp_avg is not None else None
    on_cpu = xs[0].device.type == "cpu"
    runs: list[list[int]] = []  # packed runs of small tensors, and single large ones
    total = 0
    for i, x in enumerate(xs):
        n = x.numel()
        if n >= SMALL:
            runs.append([i])
            continue
        if not runs or runs[-1] and xs[runs[-1][0]].numel() >= SMALL or on_cpu and total + n > PACK_MAX:
            runs.append([])
            total = 0
        runs[-1].append(i)
        total += n
    empty = xs[0].new_empty(0)
    buckets = []
    for idx in runs:
        x = xs[idx[0]]
        if x.numel() >= SMALL:
            i, n = idx[0], x.numel()
            p0 = empty if frozen else p0_full(p0s[i], -(-n // p))
            width = (SLICE // p) * p if on_cpu else n
            for lo in range(0, n, width):
                hi = min(lo + width, n)
                s_lo, s_hi = (0, 0) if frozen else (lo // p, -(-hi // p))
                m = [] if ms is None else [ms[i].view(-1)[lo:hi]]
                v = [vs[i].view(-1)[lo:hi]]
                buckets.append(Bucket([i], lo, hi, [x.view(-1)[lo:hi]], m, v, ss[i][s_lo:s_hi], p0[s_lo:s_hi]))
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
        if b.grad is not None:
            b.work_views = views(work[: b.hi - b.lo], b.params)
            if b.sliced is not None:
                b.x_views = views(work[: b.s.numel()], b.sliced_views)
    step = torch.full((), HUGE_STEP, dtype=torch.float32, device=xs[0].device)
    steps = [step] * max(len(b.params) for b in buckets)
    return FlatGroup(buckets, work, work2, steps, p)


def _frozen(seg: Segment) -> bool:
    """Whether D is frozen for this segment: ``s`` and ``p0`` are empty placeholders."""
    return not any(s.numel() for s in seg.s) and any(x.numel() for x in seg.params)


def gradients(seg: Segment, lay: FlatGroup, grads: Ts) -> list[Tensor]:
    """Each bucket's (n,) gradient: a packed one's buffer of its effective gradients (gathered), a
    slice's view of its raw gradient (made effective by ``_grad``)."""
    hp = seg.hparams
    out = []
    for b in lay.buckets:
        if b.grad is None:
            out.append(grads[b.index[0]].view(-1)[b.lo : b.hi])
            continue
        torch._foreach_copy_(b.grad_views, [grads[i] for i in b.index])
        if hp.maximize:
            b.grad.neg_()
        if hp.weight_decay > 0 and not hp.decouple:
            torch._foreach_add_(b.grad_views, b.params, alpha=hp.weight_decay)
        if b.sliced is not None:
            torch._foreach_copy_(b.sliced_views, [g.view(-1)[:: lay.slice_p] for g in b.grad_views])
        out.append(b.grad)
    return out


def _grad(fg: FlatGroup, b: Bucket, g: Tensor, hp: Hyperparams) -> Tensor:
    """A bucket's effective gradient: a slice's into ``work3``, from the params before ``update``."""
    coupled = hp.weight_decay > 0 and not hp.decouple
    if b.grad is not None or not (hp.maximize or coupled):
        return g
    if fg.work3 is None:
        fg.work3 = torch.empty_like(fg.work)
    out = fg.work3[: b.hi - b.lo]
    if hp.maximize:
        torch.neg(g, out=out)
        return out.add_(b.params[0], alpha=hp.weight_decay) if coupled else out
    return torch.add(g, b.params[0], alpha=hp.weight_decay, out=out)


def _sliced(fg: FlatGroup, b: Bucket, g: Tensor) -> Tensor:
    """The bucket's (n_s,) ``g[::slice_p]`` of its effective gradient ``g``."""
    if b.sliced is not None:
        return b.sliced
    return g if fg.slice_p == 1 else g[:: fg.slice_p]


def statistics(seg: Segment, lay: FlatGroup, grads: Ts, sc: StepScalars) -> tuple[Tensor, Tensor]:
    """Writes only scratch: per bucket ``_dot`` and ``_norm`` (``s`` read, not written)."""
    dots, norms = [], []
    for b, gb in zip(lay.buckets, grads):
        g = _sliced(lay, b, _grad(lay, b, gb, seg.hparams))
        dots.append(_dot(lay, b, g))
        norms.append(_norm(lay, b, g, sc, write_s=False))
    return _total(dots), _total(norms)


def dots(seg: Segment, lay: FlatGroup, grads: Ts, sc: StepScalars) -> Tensor:
    """The first half of ``statistics`` alone (reads only): sum <g, p0 - x>. With ``norms(...,
    write_s=True)`` after it, the engine writes ``s`` once per step (``S_FIRST``)."""
    return _total([_dot(lay, b, _sliced(lay, b, _grad(lay, b, gb, seg.hparams))) for b, gb in zip(lay.buckets, grads)])


def norms(seg: Segment, lay: FlatGroup, grads: Ts, sc: StepScalars) -> Tensor:
    """The second half of ``statistics``, writing this step's ``s`` in place (``update`` must then
    leave it: ``sc.beta3`` None there): sum ||beta3 s + s_scale g||_1."""
    out = []
    for b, gb in zip(lay.buckets, grads):  # (one bucket at a time: ``_grad`` may reuse scratch)
        out.append(_norm(lay, b, _sliced(lay, b, _grad(lay, b, gb, seg.hparams)), sc, write_s=True))
    return _total(out)


def _dot(fg: FlatGroup, b: Bucket, g: Tensor) -> Tensor:
    """<g, p0 - x> of a bucket (``g`` its sliced effective gradient)."""
    work = fg.work[: b.s.numel()]
    if b.grad is None:
        x = b.params[0][:: fg.slice_p]
    elif b.sliced is not None:
        torch._foreach_copy_(b.x_views, [x.view(-1)[:: fg.slice_p] for x in b.params])
        x = work
    else:
        torch._foreach_copy_(b.work_views, b.params)
        x = work
    return torch.dot(g, torch.sub(b.p0, x, out=work))


def _norm(fg: FlatGroup, b: Bucket, g: Tensor, sc: StepScalars, *, write_s: bool) -> Tensor:
    """||beta3 s + s_scale g||_1 of a bucket: the new ``s`` in scratch, or written into ``s``
    (the ops of ``update``)."""
    n_s = b.s.numel()
    beta3 = cast(float, sc.beta3)
    s_new = b.s.mul_(beta3) if write_s else torch.mul(b.s, beta3, out=fg.work2[:n_s])
    return torch.abs(s_new.add_(g, alpha=sc.s_scale), out=fg.work[:n_s]).sum()


def _total(ts: list[Tensor]) -> Tensor:
    return ts[0] if len(ts) == 1 else torch.stack(ts).sum()


def update(seg: Segment, lay: FlatGroup, grads: Ts, sc: StepScalars, out: SegmentResult | None) -> SegmentResult:
    """In place only (not ``PURE``), D on the host."""
    assert out is not None and sc.d_new is not None and sc.ok is None, "in place, with D on the host"
    fg, hp = lay, seg.hparams
    b1 = hp.betas[0]
    d_old, d_new, dlr = sc.weight, sc.d_new, sc.dlr
    # betas[0] == 0: m = d_old * g in a zeroed scratch, and the step dlr * d_new * g / den; decoupled
    # decay apart, below: x - decay * x as prodigyopt (not x * (1 - decay))
    lr = dlr if b1 > 0 else dlr * d_new / d_old
    kwargs: dict[str, Any] = {**_FIXED, "lr": lr, "beta1": b1, "beta2": hp.betas[1], "eps": d_new * hp.eps}
    for b, gb in zip(fg.buckets, grads):
        n = b.hi - b.lo
        g = _grad(fg, b, gb, hp)
        if sc.beta3 is not None:
            b.s.mul_(sc.beta3).add_(_sliced(fg, b, g), alpha=sc.s_scale)
        if b.grad is not None:
            gs = b.grad_views
            b.grad.mul_(d_old)
        else:
            gs = [torch.mul(g, d_old, out=fg.work2[:n])]
        ms = b.m
        if b1 <= 0:
            fg.work[:n].zero_()
            ms = b.work_views if b.grad is not None else [fg.work[:n]]
        if sc.decay:
            torch._foreach_add_(b.params, b.params, alpha=-sc.decay)
        torch._fused_adamw_(b.params, gs, ms, b.v, [], fg.steps[: len(b.params)], **kwargs)
    return out
