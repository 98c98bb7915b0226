"""Per-parameter stepping (fused backward passes): the engine's step split at the D update.
``accumulate`` runs a segment's statistics and moments (``update_moments``, the D before the step),
so that its gradient may be freed; ``finish`` updates D (``_scalars.next_d``) and runs every
segment's x half (``update_params``). A non-finite gradient skips its segment's moments at once
(decided on the device) and every x half.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from . import _robust
from ._engine import ReduceStats, choose_backend
from ._hyperparams import Hyperparams
from ._scalars import StepScalars, next_d, step_scalars, updates_d
from ._state import DState, Segment, SegmentResult, d_dtype

__all__ = ["Pending", "accumulate", "finish", "read_stats"]


@dataclass(eq=False)
class Pending:
    """A D-group between its first ``accumulate`` and ``finish``: ``stats`` the running [numerator,
    denom] (NaN after a non-finite gradient)."""

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
    for ``finish`` (which reads the gradients where betas[0] == 0). No-op for lr == 0 or no tensor."""
    hp, p = seg.hparams, pending
    if hp.lr <= 0 or not seg.params:
        return
    backend = choose_backend(seg, False, foreach, fused=False, pack=False)  # an eager one
    sc = step_scalars(hp, p.d_state, update_d=p.update_d, beta3=p.hp0.beta3_value)
    grads = backend.gradients(seg, None, seg.grads)
    ok = None
    if p.update_d is not False:
        dot, norm = backend.statistics(seg, None, grads, sc)
        mine = torch.stack([dot.to(p.stats.dtype) * sc.numerator_scale, norm.to(p.stats.dtype)])
        if p.hp0.skip_nonfinite:
            ok = torch.isfinite(mine).all()
        p.stats += mine
    checks = p.hp0.skip_nonfinite and (p.update_d is not True or hp.slice_p > 1)
    extremes = _robust.extremes(grads, p.stats.dtype) if checks else []
    if extremes:  # (none where the tensors have no elements)
        seen = torch.isfinite(torch.stack(extremes)).all()
        ok = seen if ok is None else ok & seen
        p.stats.copy_(torch.where(seen, p.stats, torch.nan))
    own = SegmentResult(list(seg.params), seg.exp_avg, seg.exp_avg_sq, seg.s)  # type: ignore[arg-type]
    m, v, s = backend.update_moments(
        grads, seg.exp_avg, seg.exp_avg_sq, seg.s, sc=sc.finish(None, ok), slice_p=hp.slice_p, out=own
    )
    moved = Segment(seg.params, seg.grads, m, v, s, seg.p0, hp)
    p.hooked.append((backend, moved, grads if hp.betas[0] == 0 else [None] * len(grads), sc))  # type: ignore[list-item]


def read_stats(pendings: Sequence[Pending]) -> list[list[float]]:
    """The statistics of these D-groups in one host read where they share a device and dtype (for
    ``finish``'s ``stats``)."""
    ts = [p.stats for p in pendings]
    if ts and all(t.device == ts[0].device and t.dtype == ts[0].dtype for t in ts):
        return torch.stack(ts).tolist()  # type: ignore[no-any-return]
    return [t.tolist() for t in ts]


def finish(pending: Pending, reduce_stats: ReduceStats | None = None, stats: Any = None) -> DState:
    """Update D from the summed statistics (over ranks by ``reduce_stats``; ``stats``: already read
    on the host, ``read_stats``), then move every accumulated segment's params with it. Returns the
    new D state (in ``pending.d_state``'s form)."""
    p = pending
    if stats is None:
        stats = p.stats
        if p.update_d is not False and reduce_stats is not None:
            stats = reduce_stats(stats.clone())
        if not isinstance(p.d_state.d, Tensor):  # D on the host
            stats = stats.tolist()
    new, moves, ok = next_d(p.d_state, stats, p.hp0, update_d=p.update_d)
    if ok is False:
        return new
    for backend, seg, grads, sc in p.hooked:
        own = SegmentResult(list(seg.params), None, [], [])
        done = sc.finish(new.d, ok if isinstance(ok, Tensor) else None, moves)
        backend.update_params(seg.params, grads, seg.exp_avg, seg.exp_avg_sq, sc=done, out=own)
    return new
