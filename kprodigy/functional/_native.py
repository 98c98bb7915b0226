"""The native path: torch's own fused AdamW kernel for m, v, x, and a read-only statistics pass
over a flat layout of each param group.

Used by the optimizer shell's default mode (not ``capturable``), where D lives on the host and
one host read per step is allowed, for param groups below ``AUTO_FUSED_MIN`` elements. Each
group's ``m``, ``v`` and ``s`` lie back to back in one flat buffer each (the optimizer's state
entries are views of them, as ``_fused.pack`` leaves them), so a step costs a dozen ops per
group whatever its number of tensors. The step of a D-group is split in three:

1. ``statistics``: READ-ONLY over the params, state and gradients: the gradients are gathered
   into the group's own scratch buffer, and it returns ``<g, p0 - x>`` and
   ``||beta3 * s + s_scale * g||_1`` (0-dim device tensors), keeping the new ``s`` in scratch.
   With ``slice_p == 1`` a non-finite gradient makes the sums non-finite: the NaN skip needs no
   check of its own.
2. the host (the caller) reads all sums of all D-groups at once, updates D with
   ``_scalars.reduce_d_host`` and decides the skip.
3. ``update`` (only on a step that is not skipped: a Python branch, nothing is written
   otherwise): ``s`` from scratch, then ``torch._fused_adamw_`` with ``lr = dlr``,
   ``eps = d_new * eps``, the gathered gradient multiplied by ``d_old`` (the CPU kernel's
   ``grad_scale`` would write the unscaled gradient back into the gradient list, i.e. into
   ``p.grad``) and a state step of 1e9, where Adam's own bias corrections are exactly 1. That is
   DESIGN.md's update for ``betas[0] > 0``: m = b1 m + (1 - b1) d g, v = b2 v + (1 - b2) d^2 g^2,
   x = x (1 - wd dlr) - dlr m / (sqrt(v) + d_new eps); x came out bit-identical to the per-tensor
   kernels in float32 and float64 on CPU (benchmarks/NOTES.md, "Native path").

``eligible`` says where this is exactly the math; everything else keeps the other kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._hyperparams import Hyperparams
from ._step import AUTO_FUSED_MIN, Segment

__all__ = ["FlatGroup", "eligible", "eligible_hparams", "flat_group", "statistics", "update"]

HUGE_STEP = 1e9  # Adam's bias corrections 1 - b^step are exactly 1 in float64


def eligible_hparams(hp: Hyperparams) -> bool:
    """The settings the native kernels compute exactly: betas[0] > 0 (m exists), slice_p == 1,
    no coupled weight decay and no maximize (both would need gradient copies), no stochastic
    rounding."""
    if hp.betas[0] <= 0 or hp.slice_p != 1 or hp.maximize or hp.stochastic_rounding:
        return False
    return hp.weight_decay <= 0 or hp.decouple


def eligible(seg: Segment) -> bool:
    """Whether the native kernels compute exactly this segment's step.

    ``eligible_hparams``; below ``AUTO_FUSED_MIN`` elements (larger groups take the compiled
    kernels, measured faster there); every param a plain float32/float64 tensor (no DTensor, no
    torch.func wrapper) on CPU or CUDA, one device and dtype, contiguous, with state of its own
    dtype and shape (not factored, no 16-bit params with float32 state), not requiring grad
    while grad mode is on.
    """
    if not eligible_hparams(seg.hparams) or seg.exp_avg is None or not seg.params:
        return False
    if sum(x.numel() for x in seg.params) >= AUTO_FUSED_MIN:
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


@dataclass(eq=False)
class FlatGroup:
    """One param group's tensors on the native path; n = the group's number of elements.

    ``m``, ``v``, ``s``: (n,) buffers whose consecutive slices are the state tensors (the views
    ``m_views``/``v_views`` are the state entries). ``p0``: (n,) the initial params (a copy when
    they are not packed, e.g. a compact all-zero p0). ``grad``, ``work``, ``s_new``: (n,) scratch
    owned by this record; ``grad_views``/``work_views`` shaped like the params.
    """

    params: list[Tensor]
    m_views: list[Tensor]
    v_views: list[Tensor]
    s: Tensor
    p0: Tensor
    grad: Tensor
    grad_views: list[Tensor]
    work: Tensor
    work_views: list[Tensor]
    s_new: Tensor
    steps: list[Tensor]  # the huge state step of Adam's kernel, one 0-dim float32 tensor repeated


def flat_group(seg: Segment) -> FlatGroup | None:
    """The flat record of an ``eligible`` segment whose ``exp_avg``, ``exp_avg_sq`` and ``s`` lie
    back to back in one buffer each; None when they do not (the caller packs them first)."""
    from ._fused import _p0_full, flat_span  # the layout rule of the packed state, stated once there

    assert seg.exp_avg is not None  # eligible: betas[0] > 0
    if any(flat_span(ts) is None for ts in (seg.exp_avg, seg.exp_avg_sq, seg.s)):
        return None
    s = flat_span(seg.s)
    assert s is not None
    p0 = flat_span(seg.p0) if all(t.numel() == x.numel() for t, x in zip(seg.p0, seg.params)) else None
    if p0 is None:
        p0 = torch.cat([_p0_full(t, x.numel()) for t, x in zip(seg.p0, seg.params)])
    params = list(seg.params)
    grad, work, s_new = (torch.empty_like(s) for _ in range(3))
    step = torch.full((), HUGE_STEP, dtype=torch.float32, device=s.device)
    return FlatGroup(
        params=params,
        m_views=list(seg.exp_avg),
        v_views=list(seg.exp_avg_sq),
        s=s,
        p0=p0,
        grad=grad,
        grad_views=_views(grad, params),
        work=work,
        work_views=_views(work, params),
        s_new=s_new,
        steps=[step] * len(params),
    )


def statistics(fg: FlatGroup, grads: list[Tensor], *, beta3: float, s_scale: float) -> tuple[Tensor, Tensor]:
    """Read-only statistics pass: (<g, p0 - x>, ||beta3 * s + s_scale * g||_1), 0-dim tensors in
    the params' dtype on their device. Writes only ``fg``'s scratch: the gathered gradients (for
    ``update``) and the new ``s``."""
    torch._foreach_copy_(fg.grad_views, grads)
    torch._foreach_copy_(fg.work_views, fg.params)
    diff = torch.sub(fg.p0, fg.work, out=fg.work)  # p0 - x
    dot = torch.dot(fg.grad, diff)
    s_new = torch.mul(fg.s, beta3, out=fg.s_new).add_(fg.grad, alpha=s_scale)
    norm = torch.abs(s_new, out=fg.work).sum()
    return dot, norm


def update(fg: FlatGroup, hp: Hyperparams, *, d_old: float, d_new: float, dlr: float) -> None:
    """Write s, m, v, x of a group in place (a step that is not skipped), after ``statistics``."""
    fg.s.copy_(fg.s_new)
    fg.grad.mul_(d_old)
    torch._fused_adamw_(
        fg.params,
        fg.grad_views,
        fg.m_views,
        fg.v_views,
        [],
        fg.steps,
        lr=dlr,
        beta1=hp.betas[0],
        beta2=hp.betas[1],
        weight_decay=hp.weight_decay if hp.decouple else 0.0,
        eps=d_new * hp.eps,
        amsgrad=False,
        maximize=False,
        grad_scale=None,
        found_inf=None,
    )


def _views(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    """Consecutive slices of ``flat`` shaped as ``like``."""
    return list(torch._C._nn.unflatten_dense_tensors(flat, like))
