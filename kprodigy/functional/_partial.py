"""Pieces of a step for trainers: per-tensor stepping (fused backward), the step size, the D cap.

``step_segment`` runs the accumulate and apply passes of one segment (typically one tensor whose
gradient has just been accumulated) with the D of ``d_state``, and returns its share of the D
statistics; ``finish_d`` later updates D from the sum of those shares. Together they are the
full step of ``step_d_groups`` with ONE intended difference: the apply pass floors the Adam
denominator at ``d_old * eps`` (the D before this step's update, the only one known while the
other gradients are not ready) instead of ``d_new * eps``. Everything else (dlr, the D statistics,
the moments, the D update) is the same arithmetic on the same values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _robust
from ._hyperparams import Hyperparams
from ._scalars import coefficients, reduce_d, updates_d
from ._state import DState
from ._step import ReduceStats, Segment, SegmentResult, _accumulate_d_group, _apply_pass, _step_ok, _unchanged

__all__ = ["cap_d_ratio", "effective_lrs", "finish_d", "step_segment"]


def step_segment(
    segment: Segment,
    d_state: DState,
    *,
    update_d: bool | Tensor | None,
    foreach: bool | None = None,
    inplace: bool = False,
    fused: bool | None = None,
) -> tuple[SegmentResult, Tensor]:
    """Accumulate and apply one segment with the D of ``d_state``; D itself is not updated.

    Returns (result, stats): the new params and state (the inputs themselves if ``inplace``) and
    the segment's local D statistics ``[numerator_delta, denom]`` (1-D, 2 entries, stats dtype,
    zeros when not ``update_d``), to be summed over the segments of the D-group and passed to
    ``finish_d``. The denominator floor is ``d_old * eps`` (see the module docstring).
    ``update_d``: as in ``step_d_group`` (None: decided on the device from ``d_state.k``); when it
    is not a Python bool, pass the same value to ``finish_d``, which then discards the statistics
    of a step that does not update D. ``fused``: the compiled kernels, as in ``step_d_group``.
    """
    acc = _accumulate_d_group([segment], d_state, update_d, foreach, inplace, False, fused)
    if acc is None:  # frozen (lr == 0) or empty: nothing changes
        return _unchanged(segment), torch.zeros(2, dtype=d_state.d.dtype, device=d_state.d.device)
    # the apply pass of the full step (it writes s on the compiled path), with D not yet updated
    (result,) = _apply_pass(acc, d_state, d_state.d, _step_ok(acc, acc.stats))
    return result, acc.stats


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
    update_d: as given to ``step_segment``; None: ``k % d_update_freq == 0`` decided on the device.
    reduce_stats: the distributed all-reduce, called on ``stats`` unless ``update_d`` is False.
    Advances k by one, like the full step.
    """
    if update_d is None:
        update_d = updates_d(hparams, d_state.k)
    if update_d is not False and reduce_stats is not None:
        stats = reduce_stats(stats.clone())
    new = reduce_d(d_state, stats[0], stats[1], hparams, update_d=update_d)
    if hparams.skip_nonfinite:  # a segment that met a non-finite gradient made the statistics NaN
        new = _robust.guard_d_state(d_state, new, torch.isfinite(stats).all())
    return new


def effective_lrs(hparams: Sequence[Hyperparams], d_state: DState) -> list[Tensor]:
    """``d * lr * bias_correction`` of each group: the step size the step from ``d_state`` applies.

    0-dim tensors in the statistics dtype; ``d_state`` is the D state *before* the step.
    """
    return [coefficients(hp, d_state).dlr for hp in hparams]


def cap_d_ratio(ds: Sequence[Tensor], ratio: float) -> list[Tensor]:
    """Keep D values within ``ratio`` of the smallest: ``d_i <- min(d_i, ratio * min_j d_j)``.

    ds: 0-dim tensors (any devices; the result of each stays on its own device). ratio >= 1.
    Since every d_j never decreases, a capped d never decreases either.
    """
    if not ds:
        return []
    device = ds[0].device
    floor = torch.stack([d.to(device, torch.float64) for d in ds]).min() * ratio
    return [torch.minimum(d, floor.to(d.device, d.dtype)) for d in ds]
