"""The native path: torch's own fused AdamW kernel for m, v, x, and a read-only statistics pass,
in buckets of a param group's elements.

Used by the optimizer shell's default mode (not ``capturable``), where D lives on the host
(``HostD``) and one host read per step is allowed: the shell keeps the plan (which buckets, while
the params and state it was built from still hold) and calls ``step_host``. A group's elements
are stepped in ``Bucket``s: runs of small tensors whose ``m``, ``v`` and ``s`` lie back to back in
one buffer each (the optimizer's state entries are views of them, as ``_layout.pack_states``
leaves them; the gradients and params are gathered into buffers of the bucket), and slices of
large tensors (views, nothing gathered). On CPU a bucket has at most ``PACK_MAX`` / ``SLICE``
elements, so that its scratch stays in cache and the tensors are read from memory once per pass;
a step costs a dozen ops per bucket whatever the number of tensors. The step of a D-group:

1. ``statistics`` (a step that updates D): READ-ONLY over the params, state and gradients (it
   writes only scratch and the buckets' gathered gradients): ``<g[::p], p0 - x[::p]>`` and
   ``||beta3 * s + s_scale * g[::p]||_1`` (p = slice_p; g the effective gradient: negated with
   ``maximize``, plus ``wd * x`` with coupled decay), 0-dim device tensors. With ``slice_p == 1``
   a non-finite gradient makes the sums non-finite; otherwise, and on a step without statistics,
   ``extremes`` (each bucket's min and max of g) decide the NaN skip.
2. ``step_host`` reads all of it for all D-groups at once (the reduction seam between), updates
   D with ``_scalars.reduce_d_host`` and decides the skip (a Python branch).
3. ``update`` (only on a step that is not skipped: nothing is written otherwise):
   ``s = beta3 * s + s_scale * g[::p]`` (the ops of the statistics pass: the same values; not on
   a step without statistics), then ``torch._fused_adamw_`` with ``lr = dlr``, ``eps = d_new *
   eps``, the gradient multiplied by ``d_old`` into scratch (the CPU kernel's ``grad_scale`` would
   write the unscaled gradient back into the gradient list, i.e. into ``p.grad``) and a state step
   of 1e9, where Adam's own bias corrections are exactly 1. That is DESIGN.md's update:
   m = b1 m + (1 - b1) d g, v = b2 v + (1 - b2) d^2 g^2, x = x (1 - wd dlr) - dlr m / (sqrt(v) +
   d_new eps); x came out bit-identical to the per-tensor kernels in float32 and float64 on CPU
   (benchmarks/NOTES.md, "Native path"). With betas[0] == 0, ``m`` is a zeroed scratch (so m =
   d_old g) and lr = dlr d_new / d_old: x - dlr d_new g / den.

``eligible`` says where this is exactly the math; everything else keeps the other kernels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor

from ._hyperparams import Hyperparams
from ._layout import flat_span, p0_full
from ._scalars import host_coefficients, in_dtype, reduce_d_host
from ._step import AUTO_FUSED_MIN, Segment

__all__ = [
    "Bucket",
    "FlatGroup",
    "HostD",
    "HostResult",
    "Member",
    "eligible",
    "eligible_hparams",
    "fits",
    "flat_group",
    "gather",
    "extremes",
    "statistics",
    "step_host",
    "update",
]

HUGE_STEP = 1e9  # Adam's bias corrections 1 - b^step are exactly 1 in float64
SMALL = 1 << 16  # tensors below this many elements are packed and gathered (= _fused.FLAT_MAX)
PACK_MAX = 1 << 18  # elements of small tensors in one bucket on CPU
SLICE = 1 << 17  # elements of a large tensor's slice on CPU (benchmarks/NOTES.md, "Native path")


def eligible_hparams(hp: Hyperparams) -> bool:
    """The settings the native kernels compute exactly: any betas (``betas[0] == 0`` steps with
    ``d_new * g``, through a zeroed scratch ``m``), any ``slice_p``, weight decay decoupled or
    coupled and ``maximize`` (the effective gradient ``-g + wd * x`` in the bucket's buffer or in
    scratch); not stochastic rounding (16-bit params are not eligible anyway)."""
    return not hp.stochastic_rounding


def eligible(seg: Segment, frozen: bool = False) -> bool:
    """Whether the native kernels compute exactly this segment's step.

    ``eligible_hparams``; on CUDA below ``AUTO_FUSED_MIN`` elements (larger groups take the
    compiled kernels there, and a bucket is a whole tensor); every param a plain float32/float64
    tensor (no DTensor, no torch.func wrapper) on CPU or CUDA, one device and dtype, contiguous,
    with state of its own dtype and shape (not factored, no 16-bit params with float32 state):
    ``exp_avg`` where betas[0] > 0, ``s`` and ``p0`` of ``ceil(numel / slice_p)`` elements (a
    0-dim ``p0`` for an all-zero param; empty placeholders when D is ``frozen``), not requiring
    grad while grad mode is on.
    """
    hp = seg.hparams
    if not eligible_hparams(hp) or not seg.params or (hp.betas[0] > 0) != (seg.exp_avg is not None):
        return False
    x0 = seg.params[0]
    if x0.device.type == "cuda" and sum(x.numel() for x in seg.params) >= AUTO_FUSED_MIN:
        return False
    device, dtype = x0.device, x0.dtype
    if device.type not in ("cpu", "cuda") or dtype not in (torch.float32, torch.float64):
        return False
    grad_mode = torch.is_grad_enabled()
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
        if torch._C._functorch.is_functorch_wrapped_tensor(x) or torch._C._functorch.is_functorch_wrapped_tensor(g):
            return False
    return True


@dataclass(eq=False)
class Bucket:
    """Elements of a group stepped together; n = hi - lo its number of elements, and ``s``,
    ``p0`` its (n_s,) statistics spans (every ``slice_p``-th element; empty when D is frozen).

    Packed (``grad`` not None): consecutive small tensors ``index`` of the group; ``params``,
    ``m``, ``v`` the tensors themselves (``m`` empty when betas[0] == 0), ``s`` and ``p0`` spans of
    the packed state (``p0`` a copy where compact), ``grad`` (n,) the bucket's own buffer of the
    gathered gradients (``grad_views`` shaped as the params), ``work_views`` the group's scratch
    shaped as the params; with ``slice_p > 1`` also ``sliced`` (n_s,) its own buffer of the
    gathered ``g[::slice_p]`` (``sliced_views``) and ``x_views`` scratch views for ``x[::slice_p]``.
    Slice (``grad`` None): elements [lo, hi) of the one large tensor ``index[0]`` (lo a multiple
    of ``slice_p``); ``params``, ``m``, ``v`` 1-D views of that slice.
    """

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
    """One param group on the native path: its buckets and their shared scratch.

    ``work``, ``work2``: (largest bucket,) scratch (``p0 - x``, then ``|s_new|``; ``s_new``, then a
    slice's ``d_old * g``; ``work`` the zeroed ``m`` when betas[0] == 0); ``work3`` a slice's
    effective gradient (maximize, coupled weight decay; made on first use). ``steps``: the huge
    state step of Adam's kernel (one 0-dim float32 tensor, repeated for the largest bucket's number
    of tensors). ``slice_p``: the stride of the statistics."""

    buckets: list[Bucket]
    work: Tensor
    work2: Tensor
    steps: list[Tensor]
    slice_p: int = 1
    work3: Tensor | None = None
    has_m: bool = True  # the buckets carry exp_avg (betas[0] > 0 when they were laid out)
    frozen: bool = False  # laid out without s and p0 (D frozen)


def fits(fg: FlatGroup, hp: Hyperparams, frozen: bool) -> bool:
    """Whether buckets laid out for earlier settings still step ``hp`` with D ``frozen`` or not
    (a scheduler may change settings between steps): the same ``slice_p``, whether an
    ``exp_avg`` exists, and whether D is frozen."""
    return fg.slice_p == hp.slice_p and fg.has_m == (hp.betas[0] > 0) and fg.frozen == frozen


def flat_group(seg: Segment, frozen: bool = False) -> FlatGroup | None:
    """The buckets of an ``eligible`` segment whose small tensors' ``exp_avg``, ``exp_avg_sq``
    and ``s`` lie back to back in one buffer each per bucket; None when they do not (the caller
    packs them first). ``frozen``: D no longer adapts (``s`` and ``p0`` are empty placeholders)."""
    p = seg.hparams.slice_p
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
                bucket = Bucket([i], lo, hi, [x.view(-1)[lo:hi]], m, [vs[i].view(-1)[lo:hi]], ss[i][s_lo:s_hi], p0[s_lo:s_hi])
                buckets.append(bucket)
            continue
        params = [xs[i] for i in idx]
        spans = [flat_span([ts[i] for i in idx]) for ts in ([] if ms is None else [ms]) + [vs] + ([] if frozen else [ss])]
        if any(span is None for span in spans):
            return None
        if frozen:
            s, p0 = empty, empty
        else:
            s = cast(Tensor, spans[-1])
            full = all(p0s[i].numel() == ss[i].numel() for i in idx)
            p0_span = flat_span([p0s[i] for i in idx]) if full else None
            p0 = p0_span if p0_span is not None else torch.cat([p0_full(p0s[i], ss[i].numel()) for i in idx])
        grad = torch.empty(sum(x.numel() for x in params), dtype=x.dtype, device=x.device)
        m = [] if ms is None else [ms[i] for i in idx]
        bucket = Bucket(idx, 0, grad.numel(), params, m, [vs[i] for i in idx], s, p0, grad, _views(grad, params))
        if p > 1 and not frozen:
            bucket.sliced = torch.empty_like(s)
            bucket.sliced_views = _views(bucket.sliced, [ss[i] for i in idx])
        buckets.append(bucket)
    width = max(b.hi - b.lo for b in buckets)
    work, work2 = (torch.empty(width, dtype=xs[0].dtype, device=xs[0].device) for _ in range(2))
    for b in buckets:
        if b.grad is not None:
            b.work_views = _views(work[: b.hi - b.lo], b.params)
            if b.sliced is not None:
                b.x_views = _views(work[: b.s.numel()], b.sliced_views)
    step = torch.full((), HUGE_STEP, dtype=torch.float32, device=xs[0].device)
    steps = [step] * max(len(b.params) for b in buckets)
    return FlatGroup(buckets, work, work2, steps, p, has_m=ms is not None, frozen=frozen)


def _gather(fg: FlatGroup, b: Bucket, grads: list[Tensor], hp: Hyperparams) -> None:
    """Copy a packed bucket's gradients into its own buffer as the effective gradient (negated if
    ``maximize``, plus ``wd * x`` with coupled weight decay, as ``_step._effective_grads``), and
    its every slice_p-th element into ``sliced``, where ``update`` reads them."""
    assert b.grad is not None
    torch._foreach_copy_(b.grad_views, [grads[i] for i in b.index])
    if hp.maximize:
        b.grad.neg_()
    if hp.weight_decay > 0 and not hp.decouple:
        torch._foreach_add_(b.grad_views, b.params, alpha=hp.weight_decay)
    if b.sliced is not None:
        torch._foreach_copy_(b.sliced_views, [g.view(-1)[:: fg.slice_p] for g in b.grad_views])


def gather(fg: FlatGroup, grads: list[Tensor], hp: Hyperparams) -> None:
    """Gather the packed buckets' gradients (what ``statistics`` and ``extremes`` do first), for a
    step that computes neither."""
    for b in fg.buckets:
        if b.grad is not None:
            _gather(fg, b, grads, hp)


def _grad(fg: FlatGroup, b: Bucket, grads: list[Tensor], hp: Hyperparams) -> Tensor:
    """The bucket's (n,) effective gradient: a packed bucket's buffer (after ``_gather``); a
    slice's view of its gradient, or with ``maximize`` / coupled weight decay ``-g + wd * x``
    into ``work3`` (from the params as they are: before ``update`` moves them)."""
    if b.grad is not None:
        return b.grad
    g = grads[b.index[0]].view(-1)[b.lo : b.hi]
    coupled = hp.weight_decay > 0 and not hp.decouple
    if not (hp.maximize or coupled):
        return g
    if fg.work3 is None:
        fg.work3 = torch.empty_like(fg.work)
    out = fg.work3[: b.hi - b.lo]
    if hp.maximize:
        torch.neg(g, out=out)
        return out.add_(b.params[0], alpha=hp.weight_decay) if coupled else out
    return torch.add(g, b.params[0], alpha=hp.weight_decay, out=out)


def _sliced(fg: FlatGroup, b: Bucket, g: Tensor) -> Tensor:
    """The bucket's ``g[::slice_p]`` (n_s,) of its effective gradient ``g`` (``_grad``)."""
    if b.sliced is not None:
        return b.sliced
    return g if fg.slice_p == 1 else g[:: fg.slice_p]


def statistics(
    fg: FlatGroup, grads: list[Tensor], hp: Hyperparams, *, beta3: float, s_scale: float
) -> tuple[Tensor, Tensor]:
    """Read-only statistics pass: (<g[::p], p0 - x[::p]>, ||beta3 * s + s_scale * g[::p]||_1) over
    the group, 0-dim tensors in the params' dtype on their device. ``grads``: the segment's
    gradients. Writes only scratch and the packed buckets' gathered gradients (which ``update``
    reads). With ``slice_p == 1`` a non-finite gradient makes the sums non-finite."""
    dots, norms = [], []
    for b in fg.buckets:
        n_s = b.s.numel()
        work = fg.work[:n_s]
        if b.grad is not None:
            _gather(fg, b, grads, hp)
            if b.sliced is not None:
                torch._foreach_copy_(b.x_views, [x.view(-1)[:: fg.slice_p] for x in b.params])
            else:
                torch._foreach_copy_(b.work_views, b.params)
            x = work
        else:
            x = b.params[0][:: fg.slice_p]
        g = _sliced(fg, b, _grad(fg, b, grads, hp))
        dots.append(torch.dot(g, torch.sub(b.p0, x, out=work)))  # <g, p0 - x>
        s_new = torch.mul(b.s, beta3, out=fg.work2[:n_s]).add_(g, alpha=s_scale)  # the ops of ``update``
        norms.append(torch.abs(s_new, out=work).sum())
    if len(dots) == 1:
        return dots[0], norms[0]
    return torch.stack(dots).sum(), torch.stack(norms).sum()


def extremes(fg: FlatGroup, grads: list[Tensor], hp: Hyperparams, gathered: bool = False) -> list[Tensor]:
    """0-dim: the smallest and largest gradient element of each bucket, for the NaN/inf
    skip where the statistics do not see every gradient element (a step without statistics, or
    slice_p > 1): ``torch.aminmax``, as ``_robust.all_finite`` (NaN propagates, nothing overflows;
    the host checks them finite). Gathers the packed buckets' gradients first (``update`` reads
    them) unless ``gathered`` (by ``statistics``)."""
    found: list[Tensor] = []
    for b in fg.buckets:
        if b.grad is not None:
            if not gathered:
                _gather(fg, b, grads, hp)
            g = b.grad
        else:
            g = grads[b.index[0]].view(-1)[b.lo : b.hi]
        found += torch.aminmax(g)
    return found


def update(
    fg: FlatGroup,
    grads: list[Tensor],
    hp: Hyperparams,
    *,
    beta3: float,
    s_scale: float,
    d_old: float,
    d_new: float,
    dlr: float,
    update_s: bool = True,
) -> None:
    """Write s (if ``update_s``: a step that updates D), m, v, x of a group in place (a step that
    is not skipped), after ``statistics`` (or ``extremes``/``gather``, which gather the gradients too)."""
    b1 = hp.betas[0]
    decay = hp.weight_decay if hp.decouple else 0.0
    kwargs: dict[str, Any] = dict(
        # betas[0] == 0: m = d_old * g in a zeroed scratch, and the step dlr * d_new * g / den
        lr=dlr if b1 > 0 else dlr * d_new / d_old,
        beta1=b1,
        beta2=hp.betas[1],
        weight_decay=decay if b1 > 0 else 0.0,  # (betas[0] == 0: the lr above is not dlr)
        eps=d_new * hp.eps,
        amsgrad=False,
        maximize=False,
        grad_scale=None,
        found_inf=None,
    )
    keep = 1 - decay * dlr if decay > 0 and b1 <= 0 else None
    for b in fg.buckets:
        n = b.hi - b.lo
        g = _grad(fg, b, grads, hp)
        if update_s:
            b.s.mul_(beta3).add_(_sliced(fg, b, g), alpha=s_scale)
        if b.grad is not None:
            gs = b.grad_views
            b.grad.mul_(d_old)
        else:
            gs = [torch.mul(g, d_old, out=fg.work2[:n])]
        ms = b.m
        if b1 <= 0:
            fg.work[:n].zero_()
            ms = b.work_views if b.grad is not None else [fg.work[:n]]
        if keep is not None:
            torch._foreach_mul_(b.params, keep)
        torch._fused_adamw_(b.params, gs, ms, b.v, [], fg.steps[: len(b.params)], **kwargs)


@dataclass(frozen=True)
class HostD:
    """A D-group's D state held on the host: Python floats (in its statistics dtype's precision)."""

    d: float
    d_max: float
    d_numerator: float
    d_denom: float
    d_hat: float


@dataclass(eq=False)
class Member:
    """One param group of a D-group on the native path: its settings, its buckets (None: no
    params with gradients) and the gradients of those params, in order."""

    hp: Hyperparams
    flat: FlatGroup | None
    grads: list[Tensor]


@dataclass(frozen=True)
class HostResult:
    """A D-group after ``step_host``: its new D state (None: the step was skipped, nothing was
    written) and the step size ``dlr`` of each member (what the step applied, as a float of the
    statistics dtype)."""

    d_state: HostD | None
    dlrs: list[float]


def step_host(
    d_groups: Sequence[Sequence[Member]],
    d_states: Sequence[HostD],
    ks: Sequence[int],
    dtypes: Sequence[torch.dtype],
    updates: Sequence[bool],
    reduce_stats: Callable[[Tensor], Tensor] | None = None,
) -> list[HostResult]:
    """One native step of several D-groups (aligned: members, D state, step count k, statistics
    dtype, whether the step updates D: ``_schedule.updates_d``), with ONE host read for all.

    A D-group that updates D: ``statistics`` of every member that steps (lr > 0), the sums packed
    in one float64 tensor (summed over ranks by ``reduce_stats``, the reduction seam); after the
    read the D update (``_scalars.reduce_d_host``, the D state rounded to its dtype as every path
    keeps it) and ``update`` of its members, or the skip (``skip_nonfinite`` and non-finite values:
    nothing written). A D-group that does not (``d_update_freq``, D frozen): no statistics and no
    reduction; D stays and ``update`` leaves ``s``. Where the statistics do not see every gradient
    element (no statistics, or slice_p > 1) the gradient extremes decide the skip (local, read with the
    sums). A D-group with no member that steps (frozen or without gradients) keeps its D."""
    coefs = [[host_coefficients(m.hp, ds.d, k) for m in members] for members, ds, k in zip(d_groups, d_states, ks)]
    sums: list[Tensor] = []  # per D-group with statistics: its two sums (the layout every rank shares)
    checks: list[Tensor] = []  # gradient extremes of members whose statistics do not see every element (local)
    n_checked = 0  # len(checks) so far
    spans: dict[int, tuple[int, float, int, int]] = {}  # D-group -> (start in sums or -1, the host
    # factor of its numerator, start and end in checks)
    for j, (members, cs, update_d) in enumerate(zip(d_groups, coefs, updates)):
        beta3 = members[0].hp.beta3_value  # the D-group's, from its first group
        skip = members[0].hp.skip_nonfinite
        dots, norms, scales, found = [], [], [], []
        for m, c in zip(members, cs):
            if m.hp.lr <= 0 or m.flat is None:
                continue
            if update_d:
                dot, norm = statistics(m.flat, m.grads, m.hp, beta3=beta3, s_scale=c.s_scale)
                dots.append(dot)
                norms.append(norm)
                scales.append(c.numerator_scale)
                if skip and m.flat.slice_p > 1:  # the sums see every slice_p-th gradient element only
                    found += extremes(m.flat, m.grads, m.hp, gathered=True)
            elif skip:
                found += extremes(m.flat, m.grads, m.hp)
            else:
                gather(m.flat, m.grads, m.hp)
        factor = 1.0
        if len(dots) == 1 and reduce_stats is None:  # its numerator scale applied on the host (no op;
            factor = scales[0]  # under a reduction other ranks' members may have other scales)
        elif dots:
            weighted = [dot * scale for dot, scale in zip(dots, scales)]
            dots, norms = [sum(weighted[1:], weighted[0])], [sum(norms[1:], norms[0])]
        width = len(found)
        if dots or found:
            spans[j] = (len(sums) if dots else -1, factor, n_checked, n_checked + width)
        if dots:
            sums += [dots[0], norms[0]]
        checks += found
        n_checked += width
    values = _read(sums, checks, reduce_stats) if sums or checks else []
    n_sums = len(sums)
    out = []
    for j, (members, ds, cs, dtype, update_d) in enumerate(zip(d_groups, d_states, coefs, dtypes, updates)):
        dlrs = in_dtype([c.dlr for c in cs], dtype)
        hp0 = members[0].hp  # the D settings of the D-group (beta3, d0, d_coef, growth_rate, skip)
        new = ds
        if j in spans:
            at, factor, c0, c1 = spans[j]
            mine = (values[at : at + 2] if at >= 0 else []) + values[n_sums + c0 : n_sums + c1]
            if hp0.skip_nonfinite and not all(math.isfinite(v) for v in mine):
                out.append(HostResult(None, dlrs))
                continue
            if at >= 0:
                numerator, denom = factor * mine[0], mine[1]
                new = HostD(*in_dtype(reduce_d_host(ds.d, ds.d_max, ds.d_hat, ds.d_numerator, numerator, denom, hp0), dtype))
        for m, c in zip(members, cs):
            if m.hp.lr > 0 and m.flat is not None:
                update(
                    m.flat,
                    m.grads,
                    m.hp,
                    beta3=hp0.beta3_value,
                    s_scale=c.s_scale,
                    d_old=ds.d,
                    d_new=new.d,
                    dlr=c.dlr,
                    update_s=update_d,
                )
        out.append(HostResult(new, dlrs))
    return out


def _read(sums: list[Tensor], checks: list[Tensor], reduce_stats: Callable[[Tensor], Tensor] | None) -> list[float]:
    """The step's one host read: ``sums`` (summed over ranks by ``reduce_stats``) then ``checks``,
    as float64 (one stack per list where its tensors share a device and dtype; else through the CPU)."""
    parts = []
    for ts, reduce in ((sums, reduce_stats), (checks, None)):
        if not ts:
            continue
        first = ts[0]
        if all(t.device == first.device and t.dtype == first.dtype for t in ts):
            part = torch.stack(ts).to(torch.float64)
        else:
            part = torch.stack([t.to("cpu", torch.float64) for t in ts])
        parts.append(part if reduce is None else reduce(part))
    if len(parts) == 1:
        return parts[0].tolist()
    return torch.cat([part.to(parts[0].device) for part in parts]).tolist()


def _views(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    """Consecutive slices of ``flat`` shaped as ``like``."""
    return list(torch._C._nn.unflatten_dense_tensors(flat, like))
