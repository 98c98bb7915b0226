"""The native path: torch's own fused AdamW kernel for m, v, x, and a read-only statistics pass.

Used by the optimizer shell's default mode (not ``capturable``), where D lives on the host and
one host read per step is allowed. The step of a D-group is split in three:

1. ``statistics``: READ-ONLY over the tensors, it returns ``<g, p0 - x>`` and
   ``||beta3 * s + s_scale * g||_1`` summed over a segment's tensors (0-dim device tensors), and
   what the update needs (``Prepared``). Small tensors are concatenated into one vector (a
   handful of ops per segment instead of a handful per tensor); large ones are processed in
   cache-sized chunks on CPU, so that the temporaries never reach memory. With ``slice_p == 1``
   a non-finite gradient makes the sums non-finite: the NaN skip needs no check of its own.
2. the host (the caller) reads all sums of all D-groups at once, updates D with
   ``_scalars.reduce_d_host`` and decides the skip.
3. ``update`` (only on a step that is not skipped: a Python branch, nothing is written
   otherwise): ``s = beta3 * s + s_scale * g``, then ``torch._fused_adamw_`` with ``lr = dlr``,
   ``eps = d_new * eps``, the gradient pre-multiplied by ``d_old`` (into a temporary: the CPU
   kernel's ``grad_scale`` writes the unscaled gradient back into the gradient list, i.e. into
   ``p.grad``) and a state step of 1e9, where Adam's own bias corrections are exactly 1. That is
   DESIGN.md's update for ``betas[0] > 0``: m = b1 m + (1 - b1) d g, v = b2 v + (1 - b2) d^2 g^2,
   x = x (1 - wd dlr) - dlr m / (sqrt(v) + d_new eps); x came out bit-identical to the per-tensor
   kernels in float32 and float64 on CPU (benchmarks/NOTES.md, "Native path").

``eligible`` says where this is exactly the math; everything else keeps the other kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._step import Segment

__all__ = ["Prepared", "eligible", "statistics", "update"]

SMALL_MAX = 1 << 16  # tensors below this many elements are concatenated
CHUNK = 1 << 17  # elements per chunk on CPU: temporaries stay in cache, ops stay multi-threaded
HUGE_STEP = 1e9  # Adam's bias corrections 1 - b^step are exactly 1 in float64


def eligible(seg: Segment) -> bool:
    """Whether the native kernels compute exactly this segment's step.

    betas[0] > 0 (m exists), slice_p == 1, no coupled weight decay, no maximize (both would need
    gradient copies), no stochastic rounding; every param a plain float32/float64 tensor (no
    DTensor, no torch.func wrapper) on CPU or CUDA, one device and dtype, contiguous, with state
    of its own dtype and shape (not factored, no 16-bit params with float32 state), not
    requiring grad while grad mode is on.
    """
    hp = seg.hparams
    if hp.betas[0] <= 0 or hp.slice_p != 1 or hp.maximize or hp.stochastic_rounding:
        return False
    if hp.weight_decay > 0 and not hp.decouple:
        return False
    if seg.exp_avg is None or not seg.params:
        return False
    x0 = seg.params[0]
    device, dtype = x0.device, x0.dtype
    if device.type not in ("cpu", "cuda") or dtype not in (torch.float32, torch.float64):
        return False
    grad_mode = torch.is_grad_enabled()
    for x, g, m, v, s, p0 in zip(seg.params, seg.grads, seg.exp_avg, seg.exp_avg_sq, seg.s, seg.p0):
        if type(x) not in (Tensor, torch.nn.Parameter) or type(g) is not Tensor:
            return False
        if x.device != device or x.dtype != dtype or g.dtype != dtype or g.device != device:
            return False
        if m.dtype != dtype or v.dtype != dtype or s.dtype != dtype or v.shape != x.shape or m.shape != x.shape:
            return False
        if not (x.is_contiguous() and g.is_contiguous() and m.is_contiguous() and v.is_contiguous()):
            return False
        if s.numel() != x.numel() or (p0.dim() != 0 and p0.numel() != x.numel()):
            return False
        if grad_mode and x.requires_grad:
            return False
        if torch._C._functorch.is_functorch_wrapped_tensor(x) or torch._C._functorch.is_functorch_wrapped_tensor(g):
            return False
    return True


@dataclass
class Prepared:
    """What the update pass of a segment takes over from its statistics pass."""

    batches: list[tuple[list[int], Tensor, Tensor]]  # small tensors: (indices, d_old * g, new s), concatenated
    large: list[int]  # indices of the tensors processed one by one, chunk by chunk


def statistics(seg: Segment, *, beta3: float, s_scale: float, d_old: float) -> tuple[Tensor, Tensor, Prepared]:
    """Read-only statistics pass: (sum <g, p0 - x>, sum ||beta3 * s + s_scale * g||_1, prepared).

    Sums are 0-dim tensors in the params' dtype on their device; no input tensor is written.
    Small tensors are concatenated in batches of at most ``CHUNK`` elements on CPU (in cache)."""
    xs, gs, ss, p0s = seg.params, seg.grads, seg.s, seg.p0
    large = [i for i, x in enumerate(xs) if x.numel() >= SMALL_MAX]
    dots: list[Tensor] = []
    norms: list[Tensor] = []
    batches = []
    for idx in _batches([i for i, x in enumerate(xs) if x.numel() < SMALL_MAX], xs):
        gc = _cat([gs[i] for i in idx])
        diff = _cat([p0s[i].reshape(-1).expand(xs[i].numel()) for i in idx])
        diff.sub_(_cat([xs[i] for i in idx]))  # p0 - x
        dots.append(torch.dot(gc, diff))
        s_new = _cat([ss[i] for i in idx]).mul_(beta3).add_(gc, alpha=s_scale)
        norms.append(torch.abs(s_new, out=diff).sum())
        batches.append((idx, gc.mul_(d_old), s_new))
    for i in large:
        dot, norm = _large_statistics(xs[i], gs[i], ss[i], p0s[i], beta3, s_scale)
        dots.append(dot)
        norms.append(norm)
    dot = dots[0] if len(dots) == 1 else torch.stack(dots).sum()
    norm = norms[0] if len(norms) == 1 else torch.stack(norms).sum()
    return dot, norm, Prepared(batches, large)


def update(
    seg: Segment,
    prep: Prepared,
    *,
    beta3: float,
    s_scale: float,
    d_old: float,
    d_new: float,
    dlr: float,
    step: Tensor,
) -> None:
    """Write s, m, v, x of a segment in place (a step that is not skipped).

    step: a 0-dim float32 tensor on the params' device holding a huge step count (never written).
    Large tensors are updated chunk by chunk (s, then d_old * g into one chunk-sized buffer, then the
    fused kernel on the chunk's views), so that g is read once and d_old * g never reaches memory."""
    hp = seg.hparams
    b1, b2 = hp.betas
    wd = hp.weight_decay if hp.decouple else 0.0
    xs, gs, ms, vs, ss = seg.params, seg.grads, seg.exp_avg, seg.exp_avg_sq, seg.s
    assert ms is not None  # eligible: betas[0] > 0
    kwargs: dict[str, Any] = dict(
        lr=dlr, beta1=b1, beta2=b2, weight_decay=wd, eps=d_new * hp.eps, amsgrad=False, maximize=False
    )
    for idx, dg, s_new in prep.batches:
        sizes = [xs[i].numel() for i in idx]
        torch._foreach_copy_([ss[i] for i in idx], list(s_new.split(sizes)))
        dgs = [t.view_as(xs[i]) for t, i in zip(dg.split(sizes), idx)]
        torch._fused_adamw_(
            [xs[i] for i in idx],
            dgs,
            [ms[i] for i in idx],
            [vs[i] for i in idx],
            [],
            [step] * len(idx),
            **kwargs,
            grad_scale=None,
            found_inf=None,
        )
    for i in prep.large:
        xf, gf, mf, vf, sf = xs[i].view(-1), gs[i].view(-1), ms[i].view(-1), vs[i].view(-1), ss[i].view(-1)
        spans = _chunks(xf.numel(), xf.device)
        buf = torch.empty(spans[0][1], dtype=xf.dtype, device=xf.device)
        for lo, hi in spans:
            gc, sc = gf[lo:hi], sf[lo:hi]
            torch.mul(sc, beta3, out=sc).add_(gc, alpha=s_scale)  # the ops and chunks of _large_statistics
            dg = torch.mul(gc, d_old, out=buf[: hi - lo])
            torch._fused_adamw_(
                [xf[lo:hi]], [dg], [mf[lo:hi]], [vf[lo:hi]], [], [step], **kwargs, grad_scale=None, found_inf=None
            )


def _batches(idx: list[int], xs: Sequence[Tensor]) -> list[list[int]]:
    """Consecutive runs of ``idx`` of at most ``CHUNK`` elements together on CPU (one run off CPU)."""
    if not idx:
        return []
    if xs[idx[0]].device.type != "cpu":
        return [idx]
    out: list[list[int]] = [[]]
    total = 0
    for i in idx:
        n = xs[i].numel()
        if out[-1] and total + n > CHUNK:
            out.append([])
            total = 0
        out[-1].append(i)
        total += n
    return out


def _cat(ts: Sequence[Tensor]) -> Tensor:
    """A fresh 1-D concatenation (always a copy, also of a single tensor: it is written to)."""
    return torch.cat([t.reshape(-1) for t in ts])


def _chunks(n: int, device: torch.device) -> list[tuple[int, int]]:
    step = CHUNK if device.type == "cpu" else n
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def _large_statistics(
    x: Tensor, g: Tensor, s: Tensor, p0: Tensor, beta3: float, s_scale: float
) -> tuple[Tensor, Tensor]:
    """<g, p0 - x> and ||beta3 * s + s_scale * g||_1 of one large tensor, chunk by chunk."""
    xf, gf, sf = x.view(-1), g.view(-1), s.view(-1)
    p0f = p0.reshape(-1).expand(xf.numel())
    n = xf.numel()
    width = min(n, CHUNK) if x.device.type == "cpu" else n
    a_buf = torch.empty(width, dtype=x.dtype, device=x.device)
    b_buf = torch.empty(width, dtype=x.dtype, device=x.device)
    dots, norms = [], []
    for lo, hi in _chunks(n, x.device):
        a, b = a_buf[: hi - lo], b_buf[: hi - lo]
        gc = gf[lo:hi]
        torch.sub(p0f[lo:hi], xf[lo:hi], out=a)
        dots.append(torch.dot(gc, a))
        torch.mul(sf[lo:hi], beta3, out=b).add_(gc, alpha=s_scale)  # the same ops as ``update``
        norms.append(torch.abs(b, out=a).sum())
    if len(dots) == 1:
        return dots[0], norms[0]
    return torch.stack(dots).sum(), torch.stack(norms).sum()
