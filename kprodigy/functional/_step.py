"""The step: accumulate -> reduce -> apply, over one D-group made of one or more segments.

A segment is one parameter group (its tensors, their state and its Hyperparams). Segments of a
D-group share one D: their statistics are summed at the reduction seam, where a distributed
all-reduce of the same two numbers would also go. The pure ``step`` and the optimizer shell's
in-place update both run ``step_d_group``; only ``inplace`` differs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from . import _factored, _foreach, _fused, _robust, _single
from ._hyperparams import Hyperparams
from ._scalars import Coefficients, coefficients, reduce_d, updates_d
from ._state import DState, State

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


@dataclass(frozen=True)
class SegmentResult:
    """New params and per-tensor state of one segment (the input tensors themselves if in place)."""

    params: list[Tensor]
    exp_avg: list[Tensor] | None
    exp_avg_sq: list[Tensor]
    s: list[Tensor]


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


def _runs_fused(seg: Segment, fused: bool | None, update_d: bool | Tensor | None) -> bool:
    """Whether the segment takes the compiled kernels (factored params never do)."""
    return use_fused(seg.params, fused, update_d) and not _factored.is_factored(seg.params, seg.exp_avg_sq)


def _skip_scalars(
    hp: Hyperparams, beta3: float | Tensor, c: Coefficients, d: Tensor, ok: Tensor
) -> tuple[Tensor, Coefficients, tuple[Tensor, Tensor]]:
    """The scalars that make the eager kernels' writes of a skipped step (``ok`` False) an exact
    no-op: beta3, ``s_scale`` and the moment decays become 1, 0 and 1 (and d, set by the caller, 0)."""
    one = torch.ones_like(d)
    decay = (torch.where(ok, hp.betas[0], one), torch.where(ok, hp.betas[1], one))
    return torch.where(ok, beta3, one), replace(c, s_scale=torch.where(ok, c.s_scale, 0.0)), decay


def _sanitizes_inside(seg: Segment, fe: bool, fu: bool) -> bool:
    """Whether the segment's kernels zero non-finite gradient entries themselves (``sanitize``):
    the fused and per-tensor ones do, per tensor, with no copy of every gradient kept for the
    step; the foreach and factored ones get sanitized copies."""
    return fu or (not fe and not _factored.is_factored(seg.params, seg.exp_avg_sq))


def _accumulate_kernel(seg: Segment, fe: bool, fu: bool) -> Callable[..., Any]:
    """The accumulate kernel of a segment: factored, fused (compiled), foreach or per-tensor."""
    if _factored.is_factored(seg.params, seg.exp_avg_sq):
        return _factored.accumulate
    return _fused.accumulate if fu else _foreach.accumulate if fe else _single.accumulate


def _apply_kernel(seg: Segment, fe: bool, fu: bool) -> Callable[..., Any]:
    """The apply kernel of a segment, chosen like ``_accumulate_kernel``."""
    if _factored.is_factored(seg.params, seg.exp_avg_sq):
        return _factored.apply
    return _fused.apply if fu else _foreach.apply if fe else _single.apply


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
        _accumulate_d_group(segs, ds, upd, fe, inplace, reduce_stats is not None, fu)
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
            out.append(_apply_d_group(p, ds, st))
    return out


@dataclass
class _Accumulated:
    """A D-group between the accumulate and apply passes."""

    segments: Sequence[Segment]
    active: list[int]  # indices of the segments that step (lr > 0, at least one tensor)
    results: list[SegmentResult]
    coefs: dict[int, Coefficients]
    grads: dict[int, list[Tensor]]
    update_d: bool | Tensor
    paths: dict[int, tuple[bool, bool]]  # per active segment: (foreach, fused), resolved once
    gathered: dict[int, _fused.Gathered | None]  # per active segment: its small params, gathered once
    inplace: bool
    stats: Tensor  # local [numerator_delta, denom], stats dtype, on the params' device
    ok: Tensor | None = None  # 0-dim bool: every local gradient finite (None: skip_nonfinite off)


def _accumulate_d_group(
    segments: Sequence[Segment],
    d_state: DState,
    update_d: bool | Tensor | None,
    foreach: bool | None,
    inplace: bool,
    reduced: bool,
    fused: bool | None = None,
) -> _Accumulated | None:
    """Accumulate pass of one D-group; None when it does not step (only k advances).

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
        update_d = updates_d(hp0, d_state.k)

    active = [i for i, seg in enumerate(segments) if seg.hparams.lr > 0 and len(seg.params) > 0]
    results = [_unchanged(seg) for seg in segments]
    if not active and not (reduced and any(seg.hparams.lr > 0 for seg in segments)):
        return None  # every group frozen (lr == 0), or no tensors and nothing to reduce

    # accumulate
    coefs: dict[int, Coefficients] = {}
    grads: dict[int, list[Tensor]] = {}
    numerators, denoms = [], []
    # kernel choice per segment, resolved once per step (each check walks the segment's tensors)
    paths = {i: (use_foreach(segments[i].params, foreach), _runs_fused(segments[i], fused, update_d)) for i in active}
    # fused segments of one dtype: small params and grads gathered once, for the check and both passes
    gathered: dict[int, _fused.Gathered | None] = {}
    for i in active:
        seg = segments[i]
        grads[i] = _effective_grads(seg.params, seg.grads, seg.hparams, paths[i][0])
        grads[i] = _robust.promote_grads(grads[i], seg.exp_avg_sq)
        one_dtype = paths[i][1] and len({x.dtype for x in seg.params}) == 1
        gathered[i] = _fused.gather(seg.params, grads[i], seg.hparams.slice_p) if one_dtype else None
    ok: Tensor | None = None
    d_weight = d_state.d  # the weight of g in m and v (d * g): 0 on a skipped step
    # every tensor in the compiled two-pass kernels, sampled whole, D updated: no write happens
    # before the statistics are known, and a non-finite gradient makes them non-finite, so the
    # skip is decided from them (in the apply pass) instead of by a separate read of the gradients
    folded = (
        hp0.skip_nonfinite
        and update_d is True
        and bool(active)
        and all(paths[i][1] and segments[i].hparams.slice_p == 1 for i in active)
        and all(
            _fused.compiled_whole(segments[i].params, grads[i], segments[i].exp_avg, segments[i].exp_avg_sq, segments[i].s, 1)
            for i in active
        )
    )
    if hp0.skip_nonfinite and not folded:  # decided before any write; a skipped step keeps the state exactly
        fe = all(paths[i][0] for i in active)
        checked = [g for i in active for g in _fused.unpacked_grads(grads[i], gathered[i])]
        ok = _robust.all_finite(checked, d_state.d.device, fe)
        d_weight = torch.where(ok, d_state.d, 0.0)
        for i in active:  # the fused and per-tensor kernels sanitise inside, not in copies made here
            if not _sanitizes_inside(segments[i], *paths[i]):
                grads[i] = _robust.sanitize(grads[i])
    for i in active:
        seg, hp = segments[i], segments[i].hparams
        c = coefs[i] = coefficients(hp, d_state)
        beta3: float | Tensor = hp0.beta3_value
        if isinstance(update_d, Tensor):  # blend on the device: s unchanged when not updating
            beta3 = torch.where(update_d, torch.full_like(d_state.d, hp0.beta3_value), 1.0)  # beta3 in the stats dtype
            c = replace(c, s_scale=torch.where(update_d, c.s_scale, 0.0))
        decay: tuple[Tensor, Tensor] | None = None
        if ok is not None:  # a skipped step keeps m, v, s: decays 1, s_scale 0
            beta3, c, decay = _skip_scalars(hp, beta3, c, d_state.d, ok)
        fe, fu = paths[i]
        gs = grads[i]
        m, v, s, num, den = _by_dtype(
            _accumulate_kernel(seg, fe, fu),
            seg.params,
            [gs, seg.exp_avg, seg.exp_avg_sq, seg.s, seg.p0],
            n_out=3,
            betas=hp.betas,
            beta3=beta3,
            d=d_weight,
            c=c,
            slice_p=hp.slice_p,
            update_d=update_d is not False,
            inplace=inplace,
            **({} if decay is None else {"decay": decay}),
            **({"sanitize": True} if ok is not None and _sanitizes_inside(seg, fe, fu) else {}),
            **({"gathered": gathered[i]} if gathered[i] is not None else {}),
        )
        results[i] = SegmentResult(list(seg.params), m, v, s)
        numerators.append(num)
        denoms.append(den)
    if not active:  # nothing local: zero statistics, still reduced with the other ranks'
        numerators = denoms = [torch.zeros_like(d_state.d)]
    stats = torch.stack([torch.stack(numerators).sum(), torch.stack(denoms).sum()])
    if hp0.skip_nonfinite:
        if ok is None:  # no local tensors (sharded), or folded: only the (reduced) statistics decide
            ok = torch.ones((), dtype=torch.bool, device=stats.device)
        stats = torch.where(ok, stats, torch.nan)  # a local skip reaches every rank through the reduction
    return _Accumulated(segments, active, results, coefs, grads, update_d, paths, gathered, inplace, stats, ok)


def _apply_d_group(acc: _Accumulated, d_state: DState, stats: Tensor) -> tuple[list[SegmentResult], DState]:
    """D update from the (global) statistics [numerator_delta, denom], then the apply pass."""
    new_d = reduce_d(d_state, stats[0], stats[1], acc.segments[0].hparams, update_d=acc.update_d)
    ok = _step_ok(acc, stats)
    if ok is not None:
        new_d = _robust.guard_d_state(d_state, new_d, ok)
    return _apply_pass(acc, d_state, new_d.d, ok), new_d


def _step_ok(acc: _Accumulated, stats: Tensor) -> Tensor | None:
    """The skip decision (0-dim bool; None with skip_nonfinite off): every gradient finite (on
    any rank) and finite statistics."""
    return None if acc.ok is None else acc.ok & torch.isfinite(stats).all()


def _apply_pass(acc: _Accumulated, d_state: DState, d_new: Tensor, ok: Tensor | None) -> list[SegmentResult]:
    """The apply pass (the new m, v, s of the compiled segments, and x) with ``d_new`` the D after
    this step's update (the eps floor); ``ok`` as from ``_step_ok``."""
    segments, results = acc.segments, acc.results
    hp0 = segments[0].hparams
    for i in acc.active:
        seg, hp, c, res = segments[i], segments[i].hparams, acc.coefs[i], results[i]
        wd = hp.weight_decay
        dlr = c.dlr if ok is None else torch.where(ok, c.dlr, 0.0)  # a skipped step moves nothing
        keep = 1 - wd * dlr if (wd > 0 and hp.decouple) else None
        fe, fu = acc.paths[i]
        sr = hp.stochastic_rounding and any(x.dtype == torch.bfloat16 for x in seg.params)
        # stochastic rounding: the kernel writes float32 copies of bfloat16 params, rounded below
        xs_in = [x.float() if x.dtype == torch.bfloat16 else x for x in seg.params] if sr else seg.params
        fused_args: dict[str, Any] = {}
        if fu:  # the compiled update pass: plain scalars, and the skip as a select on ``ok``
            moments = _fused.moment_args(hp.betas, hp0.beta3_value, d_state.d, c, hp.slice_p, acc.update_d is not False)
            fused_args = {"moments": moments, "ok": ok}
        (xs,) = _by_dtype(
            _apply_kernel(seg, fe, fu),
            xs_in,
            [acc.grads[i], res.exp_avg, res.exp_avg_sq] + ([res.s] if fu else []),
            n_out=1,
            dlr=dlr,
            d_new=d_new,
            eps=hp.eps,
            keep=keep,
            inplace=acc.inplace,
            **({"sanitize": True} if ok is not None and _sanitizes_inside(seg, fe, fu) else {}),
            **({"gathered": acc.gathered[i]} if acc.gathered[i] is not None and not sr else {}),
            **fused_args,
        )
        xs = _robust.write_back(seg.params, xs, inplace=acc.inplace, sr=sr)
        results[i] = replace(res, params=xs)
    return results


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


def _by_dtype(kernel, xs, lists, *, n_out, **kwargs):  # type: ignore[no-untyped-def]
    """Run ``kernel(xs, *lists, **kwargs)`` once per param dtype; scatter outputs back in order.

    The kernel returns ``n_out`` lists (or None) followed by 0-dim tensors, which are summed.
    """

    def run(xs_, lists_):  # type: ignore[no-untyped-def]
        res = kernel(xs_, *lists_, **kwargs)
        return res if isinstance(res, tuple) else (res,)

    buckets: dict[torch.dtype, list[int]] = {}
    for i, x in enumerate(xs):
        buckets.setdefault(x.dtype, []).append(i)
    if len(buckets) <= 1:
        return run(list(xs), lists)
    outs: list[list[Tensor | None] | None] = [None] * n_out
    sums: list[Tensor] | None = None
    for idx in buckets.values():
        sub = [None if lst is None else [lst[i] for i in idx] for lst in lists]
        res = run([xs[i] for i in idx], sub)
        for j in range(n_out):
            if res[j] is None:
                continue
            target = outs[j]
            if target is None:
                target = outs[j] = [None] * len(xs)
            for i, t in zip(idx, res[j]):
                target[i] = t
        extras = list(res[n_out:])
        sums = extras if sums is None else [a + b for a, b in zip(sums, extras)]
    return (*outs, *(sums or []))
