"""Pieces of a step for trainers: per-tensor stepping (fused backward), the step size, the D cap.

``accumulate_segment`` runs the first half of the step for one segment (typically one tensor
whose gradient has just been accumulated): its statistics, then the moments half of the update
(``update_moments``: m, v, s with the D before the step), so that the gradient may be freed; it
returns its share of the D statistics. Once every segment is in, ``apply_segments`` updates D
from the sum of the shares and runs the x half of the update (``update_params``) of each with
the new D. Together they are the full step of ``step_d_groups``, the same arithmetic on the same
values (the statistics summed in another order). They run the eager backends, whose ``update``
is exactly these two halves; the compiled one writes m, v, s and x in one loop, which would
keep every gradient alive until the end. A segment whose gradient is not finite skips its own
moments at once (its own statistics decide); the x half is skipped for every segment.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from . import _robust
from ._hyperparams import Hyperparams
from ._scalars import StepScalars, reduce_d, step_scalars
from ._schedule import updates_d
from ._state import DState, SegmentResult
from ._step import ReduceStats, Segment, _Pending, _statistics_d_group, _update

__all__ = ["accumulate_segment", "apply_segments", "effective_lrs", "finish_d"]


@dataclass(frozen=True)
class _Hooked:
    """A segment stepped by ``accumulate_segment``, waiting for ``apply_segments``."""

    pending: _Pending  # its statistics, scalars, backend and (betas[0] == 0) gradients; results: the new m, v, s
    inplace: bool


def accumulate_segment(
    segment: Segment,
    d_state: DState,
    *,
    update_d: bool | Tensor | None,
    foreach: bool | None = None,
    inplace: bool = False,
) -> tuple[_Hooked | None, Tensor]:
    """The statistics and the new m, v, s of one segment with the D of ``d_state`` (in place
    when ``inplace``), x untouched.

    Returns (pending, stats): what ``apply_segments`` needs to finish the segment (None when
    the segment does not step: lr == 0 or no tensor) and its local D statistics
    ``[numerator_delta, denom]`` (1-D, 2 entries, stats dtype; zeros when not ``update_d``), to
    be summed over the segments of the D-group. The pending record keeps the gradients only
    when betas[0] == 0 (the x half then reads them).
    ``update_d``: as in ``step_d_group`` (None: decided on the device from ``d_state.k``); pass
    the same value to ``apply_segments``.
    """
    p = _statistics_d_group([segment], d_state, update_d, foreach, False, False)
    if p is None:  # frozen (lr == 0) or empty: nothing changes
        return None, torch.zeros(2, dtype=d_state.d.dtype, device=d_state.d.device)
    ok = torch.isfinite(p.stats).all() if segment.hparams.skip_nonfinite else None
    for i in p.active:
        seg, kernels = p.segments[i], p.kernels[i]
        out = SegmentResult(list(seg.params), seg.exp_avg, seg.exp_avg_sq, seg.s) if inplace else None  # type: ignore[arg-type]
        sc = p.scalars[i].finish(None, ok)
        m, v, s = kernels.update_moments(p.grads[i], seg.exp_avg, seg.exp_avg_sq, seg.s, sc=sc, slice_p=seg.hparams.slice_p, out=out)
        p.results[i] = SegmentResult(list(seg.params), m, v, s)
        if segment.hparams.betas[0] > 0:  # the x half reads m, not g: let the gradients go
            p.grads[i] = [None] * len(p.grads[i])  # type: ignore[list-item]
    return _Hooked(p, inplace), p.stats


def apply_segments(
    pending: Sequence[_Hooked],
    d_state: DState,
    stats: Tensor,
    hparams: Hyperparams,
    *,
    update_d: bool | Tensor | None,
    reduce_stats: ReduceStats | None = None,
) -> DState:
    """Finish a step taken segment by segment: the D update from ``stats`` (the sum of the
    segments' shares; see ``finish_d``), then the x half of the update of each pending segment
    with the new D, in place or into the results the pending records hold. Returns the new D state.

    A non-finite gradient in any segment (or non-finite statistics) skips the D update and every
    segment's x update; the moments of the other segments were already written by then.
    """
    update_d, stats = _reduced(d_state, stats, hparams, update_d, reduce_stats)
    new = finish_d(d_state, stats, hparams, update_d=update_d)
    ok = torch.isfinite(stats).all() if hparams.skip_nonfinite else None
    for hooked in pending:
        p = hooked.pending
        for i in p.active:
            seg, res, kernels = p.segments[i], p.results[i], p.kernels[i]
            moved = Segment(seg.params, seg.grads, res.exp_avg, res.exp_avg_sq, res.s, seg.p0, seg.hparams)
            sc = p.scalars[i].finish(new.d, ok)
            p.results[i] = _update(_x_half(kernels), moved, p.grads[i], sc, hooked.inplace)
    return new


def _x_half(kernels: ModuleType) -> Callable[..., SegmentResult]:
    """The backend's ``update_params`` in the form of its ``update`` (m, v, s returned as given)."""

    def update(xs: Any, gs: Any, m: Any, v: Any, s: Any, *, sc: StepScalars, slice_p: int, out: Any) -> SegmentResult:
        return SegmentResult(kernels.update_params(xs, gs, m, v, sc=sc, out=out), m, v, s)

    return update


def finish_d(
    d_state: DState,
    stats: Tensor,
    hparams: Hyperparams,
    *,
    update_d: bool | Tensor | None,
    reduce_stats: ReduceStats | None = None,
) -> DState:
    """The D update of a step taken segment by segment: ``stats`` is the sum of their shares.

    hparams: of the D-group's first group (beta3, d0, d_coef, growth_rate are read).
    update_d: as given to ``accumulate_segment``; None: ``k % d_update_freq == 0`` decided on the device.
    reduce_stats: the distributed all-reduce, called on ``stats`` unless ``update_d`` is False.
    Advances k by one, like the full step.
    """
    update_d, stats = _reduced(d_state, stats, hparams, update_d, reduce_stats)
    new = reduce_d(d_state, stats[0], stats[1], hparams, update_d=update_d)
    if hparams.skip_nonfinite:  # a segment that met a non-finite gradient made the statistics NaN
        new = _robust.guard_d_state(d_state, new, torch.isfinite(stats).all())
    return new


def _reduced(
    d_state: DState, stats: Tensor, hparams: Hyperparams, update_d: bool | Tensor | None, reduce_stats: ReduceStats | None
) -> tuple[bool | Tensor, Tensor]:
    """``update_d`` resolved (None: from ``d_state.k`` on the device) and ``stats`` summed over
    ranks by ``reduce_stats`` when this step updates D."""
    if update_d is None:
        update_d = updates_d(hparams.d_update_freq, d_state.k)
    if update_d is not False and reduce_stats is not None:
        stats = reduce_stats(stats.clone())
    return update_d, stats


def effective_lrs(hparams: Sequence[Hyperparams], d_state: DState) -> list[Tensor]:
    """``d * lr * bias_correction`` of each group: the step size the step from ``d_state`` applies.

    0-dim tensors in the statistics dtype; ``d_state`` is the D state *before* the step.
    """
    return [step_scalars(hp, d_state, update_d=False, beta3=hp.beta3_value).dlr for hp in hparams]
