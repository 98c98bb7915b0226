"""Per-parameter stepping (fused backward passes): the engine's step split at the D update.

``accumulate`` runs the first half of the step for one segment (typically one tensor whose
gradient has just been accumulated): its statistics, then the moments half of its update
(``update_moments``: m, v, s with the D before the step), so that the gradient may be freed.
Once every segment is in, ``finish`` updates D from the summed statistics (``_scalars.next_d``,
the engine's rule) and runs the x half (``update_params``) of each with the new D. Together they
are the engine's step on the eager backends (whose ``update`` is exactly these two halves), with
the statistics summed in another order. D may be held on the host (one read, in ``finish``) or
on the device. A segment whose gradient is not finite skips its own moments at once (its own
statistics decide, on the device); the x half is skipped for every segment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from . import _factored, _foreach, _robust, _single
from ._engine import ReduceStats, use_foreach
from ._hyperparams import Hyperparams
from ._scalars import StepScalars, next_d, step_scalars, updates_d
from ._state import DState, Segment, SegmentResult, d_dtype

__all__ = ["Pending", "accumulate", "finish"]


@dataclass(eq=False)
class Pending:
    """A D-group between its first ``accumulate`` and ``finish``.

    hp0: the D-group's settings (its first group's hyperparameters); d_state: its D state at the
    start of the step; stats: running [numerator, denom] (1-D, ``d_dtype``; NaN after a
    non-finite gradient)."""

    hp0: Hyperparams
    d_state: DState
    stats: Tensor
    update_d: bool | Tensor = False
    hooked: list[tuple[ModuleType, Segment, list[Tensor], StepScalars]] = field(default_factory=list)

    @classmethod
    def start(cls, hp0: Hyperparams, d_state: DState, device: torch.device) -> Pending:
        stats = torch.zeros(2, dtype=d_dtype(device), device=device)
        return cls(hp0, d_state, stats, updates_d(hp0, d_state.k))


def accumulate(pending: Pending, seg: Segment, foreach: bool | None = None) -> None:
    """The statistics and the new m, v, s of ``seg`` (in place) with the D of ``pending``; x waits
    for ``finish``. A segment with lr == 0 or no tensor changes nothing. The gradients are kept
    only when betas[0] == 0 (the x half then reads them)."""
    hp, p = seg.hparams, pending
    if hp.lr <= 0 or not seg.params:
        return
    if _factored.is_factored(seg.params, seg.exp_avg_sq):
        backend: ModuleType = _factored
    else:
        backend = _foreach if use_foreach(seg.params, foreach) else _single
    sc = step_scalars(hp, p.d_state, update_d=p.update_d, beta3=p.hp0.beta3_value)
    grads = backend.gradients(seg, None, seg.grads)
    ok = None
    if p.update_d is not False:
        dot, norm = backend.statistics(seg, None, grads, sc)
        mine = torch.stack([dot.to(p.stats.dtype) * sc.numerator_scale, norm.to(p.stats.dtype)])
        if p.hp0.skip_nonfinite:
            ok = torch.isfinite(mine).all()
        p.stats += mine
    if p.hp0.skip_nonfinite and (p.update_d is not True or hp.slice_p > 1):
        seen = torch.isfinite(torch.stack(_robust.extremes(grads, p.stats.dtype))).all()
        ok = seen if ok is None else ok & seen
        p.stats.copy_(torch.where(seen, p.stats, torch.nan))
    own = SegmentResult(list(seg.params), seg.exp_avg, seg.exp_avg_sq, seg.s)  # type: ignore[arg-type]
    m, v, s = backend.update_moments(
        grads, seg.exp_avg, seg.exp_avg_sq, seg.s, sc=sc.finish(None, ok), slice_p=hp.slice_p, out=own
    )
    moved = Segment(seg.params, seg.grads, m, v, s, seg.p0, hp)
    p.hooked.append((backend, moved, grads if hp.betas[0] == 0 else [None] * len(grads), sc))  # type: ignore[list-item]


def finish(pending: Pending, reduce_stats: ReduceStats | None = None) -> DState:
    """Update D from the summed statistics (summed over ranks by ``reduce_stats``), then move
    the params of every accumulated segment with the new D. Returns the new D state (in the
    form of ``pending.d_state``: host numbers or device tensors)."""
    p = pending
    stats: Any = p.stats
    if p.update_d is not False and reduce_stats is not None:
        stats = reduce_stats(stats.clone())
    on_host = not isinstance(p.d_state.d, Tensor)
    ok: Any = True
    if on_host:
        stats = stats.tolist()
        if p.hp0.skip_nonfinite:
            ok = all(v == v and abs(v) != float("inf") for v in stats)
    elif p.hp0.skip_nonfinite:
        ok = torch.isfinite(stats).all()
    num, den = (stats[0], stats[1]) if p.update_d is not False else (0.0, None)
    new, moves = next_d(p.d_state, num, den, p.hp0, update_d=p.update_d, ok=ok)
    if ok is False:
        return new
    for backend, seg, grads, sc in p.hooked:
        own = SegmentResult(list(seg.params), None, [], [])
        done = sc.finish(new.d, ok if isinstance(ok, Tensor) else None, moves)
        backend.update_params(seg.params, grads, seg.exp_avg, seg.exp_avg_sq, sc=done, out=own)
    return new
