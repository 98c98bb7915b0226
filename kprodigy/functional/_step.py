"""The step: statistics -> reduce -> update, over one D-group made of one or more segments.

A segment is one parameter group (its tensors, their state and its Hyperparams). Each segment
takes one backend, chosen once per step (``_kernels``: per-tensor, foreach, compiled or
factored), and every backend has one contract (``_single.py``): ``statistics`` reads the
tensors and returns the two sums; the segments of a D-group add theirs at the reduction seam
(where a distributed all-reduce of the same two numbers goes), D is updated on the device,
then ``update`` writes m, v, s and x. Every scalar of a segment's step is built once
(``_scalars.StepScalars``), the skip decision folded in. The pure ``step`` and the optimizer's
in-place step run the same code: the update writes into new tensors or into the inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from types import ModuleType

import torch
from torch import Tensor

from . import _factored, _foreach, _fused, _robust, _single
from ._hyperparams import Hyperparams
from ._scalars import StepScalars, reduce_d, step_scalars
from ._schedule import updates_d
from ._state import DState, SegmentResult, State

__all__ = ["AUTO_FUSED_MIN", "Segment", "SegmentResult", "step", "step_d_group", "step_d_groups", "use_foreach", "use_fused"]

# Hook at the reduction seam: takes the packed local statistics [numerator, denom] of every
# D-group that updates D, concatenated (1-D, float32 or float64, params' device), and returns the
# global ones (their sum over ranks). Used for distributed training; see ``step_d_groups``.
ReduceStats = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Segment:
    """One group's tensors inside a D-group. Lists are aligned; exp_avg is None iff betas[0] == 0."""

    params: Sequence[Tensor]
    grads: Sequence[Tensor]
    exp_avg: Sequence[Tensor] | None
    exp_avg_sq: Sequence[Tensor]
    s: Sequence[Tensor]
    p0: Sequence[Tensor]
    hparams: Hyperparams


def use_foreach(tensors: Sequence[Tensor], foreach: bool | None) -> bool:
    """Resolve ``foreach=None``: multi-tensor ops unless an input is wrapped by torch.func.

    ``torch._foreach_*`` ops have no vmap batching rule, so functorch-wrapped tensors (inside
    ``vmap``/``grad``) always take the per-tensor path, even when ``foreach=True`` was asked for.
    Under ``torch.compile`` (where that check cannot be traced) None means per-tensor. On CPU,
    None also means per-tensor: CPU foreach ops are per-tensor loops, and the per-tensor kernels
    with in-place temporaries measured faster there (benchmarks/NOTES.md, change 3).
    """
    if torch.compiler.is_compiling():  # the check below does not trace; inductor fuses the per-tensor path
        return bool(foreach)
    wrapped = any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)
    if wrapped:
        return False
    if foreach is None:
        return not all(t.device.type == "cpu" for t in tensors)
    return foreach


# fused=None (automatic) compiles the kernels for a CUDA segment of at least this many elements:
# below it, the first step's compile time (seconds) outweighs what the compiled kernels save.
AUTO_FUSED_MIN = 1 << 20


def use_fused(tensors: Sequence[Tensor], fused: bool | None, update_d: bool | Tensor | None = None) -> bool:
    """Resolve ``fused``: the compiled kernels of ``_fused.py`` where asked for and possible.

    True asks for them; None (automatic) takes them on CUDA for at least ``AUTO_FUSED_MIN``
    elements (the first fused step compiles for seconds; small models do not win that back). On
    CPU only True does: the optimizer's default there is the native path (``_native.py``), which
    compiles nothing and measured as fast or faster on every benchmark workload. Either way the eager kernels run inside ``torch.compile`` (which fuses them
    itself), for torch.func-wrapped inputs, for inputs that require grad while grad mode is on
    (the eager step is differentiable, the compiled in-place kernels are not), for a device-side
    ``update_d`` (a 0-dim tensor) and on a device where compiling fails (a one-line warning if
    ``fused=True``).
    """
    if fused is False or not tensors or isinstance(update_d, Tensor) or torch.compiler.is_compiling():
        return False
    if fused is None and (tensors[0].device.type != "cuda" or sum(t.numel() for t in tensors) < AUTO_FUSED_MIN):
        return False  # automatic: CUDA (where Inductor is mature), large enough groups
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
        return False
    return _fused.available(tensors[0].device, warn=fused is True)


def _kernels(seg: Segment, foreach: bool | None, fused: bool | None, update_d: bool | Tensor) -> ModuleType:
    """The backend of a segment (a module with the contract of ``_single.py``), chosen once per
    step: factored (any factored ``v``), compiled (``use_fused``), foreach or per-tensor."""
    if _factored.is_factored(seg.params, seg.exp_avg_sq):
        return _factored
    if use_fused(seg.params, fused, update_d):
        return _fused
    return _foreach if use_foreach(seg.params, foreach) else _single


def step_d_group(
    segments: Sequence[Segment],
    d_state: DState,
    *,
    update_d: bool | Tensor | None = None,
    foreach: bool | None = None,
    inplace: bool = False,
    reduce_stats: ReduceStats | None = None,
    fused: bool | None = None,
) -> tuple[list[SegmentResult], DState]:
    """One K-Prodigy step of a D-group.

    update_d: whether this step updates the D statistics. None: ``k % d_update_freq == 0``,
              decided on the device (branch-free) unless d_update_freq == 1. The optimizer shell
              passes a Python bool it knows from its step count, which skips the work entirely.
    inplace:  update the given tensors (the shell) instead of returning new ones (pure step).
    reduce_stats: see ``step_d_groups`` (called with this group's [numerator_delta, denom]).
    fused:    compiled kernels (``_fused.py``) instead of foreach/per-tensor; see ``use_fused``.
    """
    ((results, new_d),) = step_d_groups(
        [segments],
        [d_state],
        update_d=[update_d],
        foreach=foreach,
        inplace=inplace,
        reduce_stats=reduce_stats,
        fused=fused,
    )
    return results, new_d


def step_d_groups(
    d_groups: Sequence[Sequence[Segment]],
    d_states: Sequence[DState],
    *,
    update_d: Sequence[bool | Tensor | None] | None = None,
    foreach: bool | None | Sequence[bool | None] = None,
    inplace: bool = False,
    reduce_stats: ReduceStats | None = None,
    fused: bool | None | Sequence[bool | None] = None,
) -> list[tuple[list[SegmentResult], DState]]:
    """One K-Prodigy step of several D-groups, with ONE call of ``reduce_stats`` for all of them.

    d_groups, d_states, update_d: aligned, one entry per D-group (``update_d`` as in
        ``step_d_group``; None for all: decided from each group's step count).
    foreach: one flag for all D-groups, or a sequence of flags, one per D-group.
    fused: like ``foreach``, for the compiled kernels (see ``use_fused``).
    reduce_stats: sums the statistics over ranks (distributed training). Called once per device
        with the packed 1-D tensor [numerator_delta_0, denom_0, numerator_delta_1, ...] of every
        D-group that updates D this step (float64 if any group's statistics are, else float32),
        and must return the global tensor of the same shape. Not called on steps where no group
        updates D. With a ``reduce_stats``, a D-group whose segments hold no tensors on this rank
        still takes part (zero local statistics) and updates D from the global ones, so every
        rank keeps the same D; only a D-group whose groups all have lr == 0 sits out.
    Returns one (segment results, new D state) pair per D-group.
    """
    if len(d_groups) != len(d_states):
        raise ValueError(f"got {len(d_groups)} D-groups but {len(d_states)} D states; expected one state per D-group")
    flags = list(update_d) if update_d is not None else [None] * len(d_groups)
    if len(flags) != len(d_groups):
        raise ValueError(f"got {len(d_groups)} D-groups but {len(flags)} update_d flags; expected one per D-group")
    fes = list(foreach) if isinstance(foreach, Sequence) else [foreach] * len(d_groups)
    if len(fes) != len(d_groups):
        raise ValueError(f"got {len(d_groups)} D-groups but {len(fes)} foreach flags; expected one per D-group")
    fus = list(fused) if isinstance(fused, Sequence) else [fused] * len(d_groups)
    if len(fus) != len(d_groups):
        raise ValueError(f"got {len(d_groups)} D-groups but {len(fus)} fused flags; expected one per D-group")
    pending = [
        _statistics_d_group(segs, ds, upd, fe, fu, reduce_stats is not None)
        for segs, ds, upd, fe, fu in zip(d_groups, d_states, flags, fes, fus)
    ]

    # reduce: one packed tensor (and one reduce_stats call) per device
    stats: list[Tensor | None] = [None if p is None else p.stats for p in pending]
    if reduce_stats is not None:
        by_device: dict[torch.device, list[int]] = {}
        for j, p in enumerate(pending):
            if p is not None and p.update_d is not False:
                by_device.setdefault(p.stats.device, []).append(j)
        for idx in by_device.values():
            parts = [pending[j].stats for j in idx]  # type: ignore[union-attr]
            dtype = torch.float64 if any(t.dtype == torch.float64 for t in parts) else torch.float32
            packed = reduce_stats(torch.cat([t.to(dtype) for t in parts]))
            for j, part, chunk in zip(idx, parts, packed.view(len(idx), 2).unbind(0)):
                stats[j] = chunk.to(part.dtype)

    out = []
    for segs, ds, p, st in zip(d_groups, d_states, pending, stats):
        if p is None or st is None:  # no segment, or every group frozen (lr == 0): only k advances
            out.append(([_unchanged(seg) for seg in segs], replace(ds, k=ds.k + 1)))
        else:
            out.append(_update_d_group(p, ds, st, inplace))
    return out


@dataclass
class _Pending:
    """A D-group between its statistics and its update."""

    segments: Sequence[Segment]
    active: list[int]  # indices of the segments that step (lr > 0, at least one tensor)
    kernels: dict[int, ModuleType]  # per active segment: its backend
    grads: dict[int, list[Tensor]]  # per active segment: the effective gradients (maximize, coupled wd, fp32)
    scalars: dict[int, StepScalars]  # per active segment, before ``finish``
    update_d: bool | Tensor
    stats: Tensor  # local [numerator_delta, denom], stats dtype, params' device; NaN after a non-finite gradient
    results: list[SegmentResult]  # per segment (``_partial`` keeps the moments written by its hook here)


def _statistics_d_group(
    segments: Sequence[Segment],
    d_state: DState,
    update_d: bool | Tensor | None,
    foreach: bool | None,
    fused: bool | None,
    reduced: bool,
) -> _Pending | None:
    """The statistics of one D-group (nothing is written); None when it does not step (only k
    advances).

    reduced: the statistics will be summed over ranks, so a group with no local tensors still
             steps (with zero statistics) unless all its segments are frozen (lr == 0).
    """
    if not segments:
        return None
    hp0 = segments[0].hparams
    for seg in segments[1:]:
        if seg.hparams.d_config() != hp0.d_config():
            raise ValueError(
                "Parameter groups that share one D must agree on beta3, d0, d_coef, growth_rate "
                f"and d_update_freq; got {hp0.d_config()} and {seg.hparams.d_config()}. "
                "Use independent_d=True to give each group its own D."
            )
        if seg.hparams.skip_nonfinite != hp0.skip_nonfinite:
            raise ValueError(
                "Parameter groups that share one D must agree on skip_nonfinite (a skip covers the whole "
                f"D-group); got {hp0.skip_nonfinite} and {seg.hparams.skip_nonfinite}"
            )
    if update_d is None:
        update_d = updates_d(hp0.d_update_freq, d_state.k)

    active = [i for i, seg in enumerate(segments) if seg.hparams.lr > 0 and len(seg.params) > 0]
    if not active and not (reduced and any(seg.hparams.lr > 0 for seg in segments)):
        return None  # every group frozen (lr == 0), or no tensors and nothing to reduce
    kernels = {i: _kernels(segments[i], foreach, fused, update_d) for i in active}
    grads: dict[int, list[Tensor]] = {}
    for i in active:
        seg = segments[i]
        grads[i] = _effective_grads(seg.params, seg.grads, seg.hparams, kernels[i] is _foreach)
        grads[i] = _robust.promote_grads(grads[i], seg.exp_avg_sq)
    scalars = {i: step_scalars(segments[i].hparams, d_state, update_d=update_d, beta3=hp0.beta3_value) for i in active}
    numerators, denoms = [torch.zeros_like(d_state.d)], [torch.zeros_like(d_state.d)]
    if active and update_d is not False:
        sums = [_statistics(kernels[i], segments[i], grads[i], scalars[i]) for i in active]
        numerators, denoms = [n for n, _ in sums], [d for _, d in sums]
    stats = torch.stack([torch.stack(numerators).sum(), torch.stack(denoms).sum()])
    # the skip: the statistics read every gradient entry when D is updated at slice_p == 1, so a
    # non-finite one makes them non-finite, and the step skips on that (``_update_d_group``);
    # otherwise one read of the gradients decides. NaN statistics reach every rank by the reduction.
    if hp0.skip_nonfinite and (update_d is False or any(segments[i].hparams.slice_p > 1 for i in active)):
        multi = all(kernels[i] is not _single for i in active)
        ok = _robust.all_finite([g for i in active for g in grads[i]], d_state.d.device, multi)
        stats = torch.where(ok, stats, torch.nan)
    results = [_unchanged(seg) for seg in segments]
    return _Pending(segments, active, kernels, grads, scalars, update_d, stats, results)


def _statistics(kernels: ModuleType, seg: Segment, grads: list[Tensor], sc: StepScalars) -> tuple[Tensor, Tensor]:
    """``kernels.statistics`` of one segment, one call per param dtype, summed."""
    total: tuple[Tensor, Tensor] | None = None
    for idx in _by_dtype(seg.params):
        lists = [_take(ts, idx) for ts in (seg.params, grads, seg.s, seg.p0)]
        num, den = kernels.statistics(*lists, sc=sc, slice_p=seg.hparams.slice_p)
        total = (num, den) if total is None else (total[0] + num, total[1] + den)
    assert total is not None
    return total


def _update_d_group(p: _Pending, d_state: DState, stats: Tensor, inplace: bool) -> tuple[list[SegmentResult], DState]:
    """D update from the (global) statistics [numerator_delta, denom], then the update of each
    segment, into its own tensors (``inplace``) or new ones. A step whose statistics are not
    finite (a non-finite gradient on any rank, with skip_nonfinite) is skipped whole."""
    hp0 = p.segments[0].hparams
    new_d = reduce_d(d_state, stats[0], stats[1], hp0, update_d=p.update_d)
    ok = torch.isfinite(stats).all() if hp0.skip_nonfinite else None
    if ok is not None:
        new_d = _robust.guard_d_state(d_state, new_d, ok)
    for i in p.active:
        sc = p.scalars[i].finish(new_d.d, ok)
        p.results[i] = _update(p.kernels[i].update, p.segments[i], p.grads[i], sc, inplace)
    return p.results, new_d


Update = Callable[..., SegmentResult]  # a backend's ``update`` (or the x half, see ``_partial``)


def _update(update: Update, seg: Segment, grads: list[Tensor], sc: StepScalars, inplace: bool) -> SegmentResult:
    """``update`` of one segment, one call per param dtype, writing into the segment's tensors
    (``inplace``) or into new ones. With stochastic rounding, the kernel updates float32 copies
    of the bfloat16 params, rounded into the params here."""
    sr = seg.hparams.stochastic_rounding and any(x.dtype == torch.bfloat16 for x in seg.params)
    xs = [x.float() if x.dtype == torch.bfloat16 else x for x in seg.params] if sr else list(seg.params)
    m = None if seg.exp_avg is None else list(seg.exp_avg)
    new = SegmentResult(list(xs), None if m is None else list(m), list(seg.exp_avg_sq), list(seg.s))
    for idx in _by_dtype(seg.params):
        sub = SegmentResult(*(None if ts is None else _take(ts, idx) for ts in (xs, m, seg.exp_avg_sq, seg.s)))  # type: ignore[arg-type]
        res = update(
            sub.params, _take(grads, idx), sub.exp_avg, sub.exp_avg_sq, sub.s, sc=sc, slice_p=seg.hparams.slice_p, out=sub if inplace else None
        )
        for mine, theirs in zip((new.params, new.exp_avg, new.exp_avg_sq, new.s), (res.params, res.exp_avg, res.exp_avg_sq, res.s)):
            for i, t in zip(idx, theirs or []):
                mine[i] = t  # type: ignore[index]
    return replace(new, params=_robust.write_back(seg.params, new.params, out=seg.params if inplace else None, sr=sr))


def step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: State,
    hparams: Hyperparams,
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> tuple[list[Tensor], State]:
    """One pure K-Prodigy step over ``params`` sharing one D.

    params, grads: aligned lists of tensors (grads shaped like their params)
    state:         from ``init_state`` or a previous ``step``; not modified
    Returns (new_params, new_state); no input tensor is written to.
    """
    params, grads = list(params), list(grads)
    _check_grads(params, grads)
    if (state.exp_avg is None) != (hparams.betas[0] == 0):
        raise ValueError(
            f"state.exp_avg is {'None' if state.exp_avg is None else 'a list'} but betas[0] is "
            f"{hparams.betas[0]}; exp_avg exists exactly when betas[0] > 0: rebuild the state with init_state"
        )
    seg = Segment(params, grads, state.exp_avg, state.exp_avg_sq, state.s, state.p0, hparams)
    (res,), d_state = step_d_group([seg], state.d, foreach=foreach, inplace=False, fused=fused)
    return res.params, State(exp_avg=res.exp_avg, exp_avg_sq=res.exp_avg_sq, s=res.s, p0=list(state.p0), d=d_state)


def _check_grads(params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    if len(params) != len(grads):
        raise ValueError(f"got {len(params)} params but {len(grads)} grads; expected one grad per param")
    for i, (x, g) in enumerate(zip(params, grads)):
        if g.shape != x.shape:
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)} but params[{i}] has shape {tuple(x.shape)}")
        if g.layout != torch.strided:
            raise ValueError(f"grads[{i}] is {g.layout}; K-Prodigy needs dense gradients")
        if x.is_complex() or g.is_complex():
            raise ValueError(f"params[{i}] or grads[{i}] is complex; view them as real with torch.view_as_real")
        if not x.is_floating_point() or g.dtype != x.dtype:
            raise ValueError(f"grads[{i}] has dtype {g.dtype} and params[{i}] {x.dtype}; expected one floating dtype")
        if g.device != x.device:
            raise ValueError(f"grads[{i}] is on {g.device} but params[{i}] on {x.device}")


def _unchanged(seg: Segment) -> SegmentResult:
    m = list(seg.exp_avg) if seg.exp_avg is not None else None
    return SegmentResult(list(seg.params), m, list(seg.exp_avg_sq), list(seg.s))


def _effective_grads(xs: Sequence[Tensor], gs: Sequence[Tensor], hp: Hyperparams, fe: bool) -> list[Tensor]:
    """-g if maximize, plus wd * x if coupled weight decay; new tensors, never written into p.grad."""
    out = list(gs)
    coupled = hp.weight_decay > 0 and not hp.decouple
    if fe and out:
        if hp.maximize:
            out = list(torch._foreach_neg(out))
        if coupled:
            out = list(torch._foreach_add(out, list(xs), alpha=hp.weight_decay))
        return out
    if hp.maximize:
        out = [torch.neg(g) for g in out]
    if coupled:
        out = [torch.add(g, x, alpha=hp.weight_decay) for g, x in zip(out, xs)]
    return out


def _by_dtype(xs: Sequence[Tensor]) -> list[list[int]]:
    """The indices of ``xs`` grouped by dtype (each backend's calls take one dtype)."""
    buckets: dict[torch.dtype, list[int]] = {}
    for i, x in enumerate(xs):
        buckets.setdefault(x.dtype, []).append(i)
    return list(buckets.values())


def _take(ts: Sequence[Tensor], idx: list[int]) -> list[Tensor]:
    return [ts[i] for i in idx]
