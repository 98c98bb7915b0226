"""The step: accumulate -> reduce -> apply, over one D-group made of one or more segments.

A segment is one parameter group (its tensors, their state and its Hyperparams). Segments of a
D-group share one D: their statistics are summed at the reduction seam, where a distributed
all-reduce of the same two numbers would also go. The pure ``step`` and the optimizer shell's
in-place update both run ``step_d_group``; only ``inplace`` differs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from . import _foreach, _single
from ._hyperparams import Hyperparams
from ._scalars import Coefficients, coefficients, reduce_d
from ._state import DState, State

__all__ = ["Segment", "SegmentResult", "step", "step_d_group", "use_foreach"]

# Hook at the reduction seam: takes the packed local statistics [numerator, denom] (1-D, stats
# dtype, params' device) and returns the global ones. Used for distributed training.
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
    """
    wrapped = any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)
    if wrapped:
        return False
    return True if foreach is None else foreach


def step_d_group(
    segments: Sequence[Segment],
    d_state: DState,
    *,
    update_d: bool | Tensor | None = None,
    foreach: bool | None = None,
    inplace: bool = False,
    reduce_stats: ReduceStats | None = None,
) -> tuple[list[SegmentResult], DState]:
    """One K-Prodigy step of a D-group.

    update_d: whether this step updates the D statistics. None: ``k % d_update_freq == 0``,
              decided on the device (branch-free) unless d_update_freq == 1. The optimizer shell
              passes a Python bool it knows from its step count, which skips the work entirely.
    inplace:  update the given tensors (the shell) instead of returning new ones (pure step).
    """
    if not segments:
        return [], replace(d_state, k=d_state.k + 1)
    hp0 = segments[0].hparams
    for seg in segments[1:]:
        if seg.hparams.d_config() != hp0.d_config():
            raise ValueError(
                "Parameter groups that share one D must agree on beta3, d0, d_coef, growth_rate "
                f"and d_update_freq; got {hp0.d_config()} and {seg.hparams.d_config()}. "
                "Use independent_d=True to give each group its own D."
            )
    if update_d is None:
        freq = hp0.d_update_freq
        update_d = True if freq == 1 else (d_state.k % freq) == 0

    active = [i for i, seg in enumerate(segments) if seg.hparams.lr > 0 and len(seg.params) > 0]
    results = [_unchanged(seg) for seg in segments]
    if not active:  # every group frozen (lr == 0): nothing changes but the step count
        return results, replace(d_state, k=d_state.k + 1)

    # accumulate
    coefs: dict[int, Coefficients] = {}
    grads: dict[int, list[Tensor]] = {}
    numerators, denoms = [], []
    for i in active:
        seg, hp = segments[i], segments[i].hparams
        c = coefs[i] = coefficients(hp, d_state)
        beta3: float | Tensor = hp0.beta3_value
        if isinstance(update_d, Tensor):  # blend on the device: s unchanged when not updating
            beta3 = torch.where(update_d, beta3, 1.0).to(d_state.d.dtype)
            c = replace(c, s_scale=torch.where(update_d, c.s_scale, 0.0))
        fe = use_foreach(seg.params, foreach)
        gs = grads[i] = _effective_grads(seg.params, seg.grads, hp, fe)
        m, v, s, num, den = _by_dtype(
            _foreach.accumulate if fe else _single.accumulate,
            seg.params,
            [gs, seg.exp_avg, seg.exp_avg_sq, seg.s, seg.p0],
            n_out=3,
            betas=hp.betas,
            beta3=beta3,
            d=d_state.d,
            c=c,
            slice_p=hp.slice_p,
            update_d=update_d is not False,
            inplace=inplace,
        )
        results[i] = SegmentResult(list(seg.params), m, v, s)
        numerators.append(num)
        denoms.append(den)

    # reduce
    stats = torch.stack([torch.stack(numerators).sum(), torch.stack(denoms).sum()])
    if reduce_stats is not None and update_d is not False:
        stats = reduce_stats(stats)
    new_d = reduce_d(d_state, stats[0], stats[1], hp0, update_d=update_d)

    # apply
    for i in active:
        seg, hp, c, res = segments[i], segments[i].hparams, coefs[i], results[i]
        wd = hp.weight_decay
        keep = 1 - wd * c.dlr if (wd > 0 and hp.decouple) else None
        fe = use_foreach(seg.params, foreach)
        (xs,) = _by_dtype(
            _foreach.apply if fe else _single.apply,
            seg.params,
            [grads[i], res.exp_avg, res.exp_avg_sq],
            n_out=1,
            dlr=c.dlr,
            d_old=d_state.d,
            d_new=new_d.d,
            eps=hp.eps,
            keep=keep,
            inplace=inplace,
        )
        results[i] = replace(res, params=xs)
    return results, new_d


def step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: State,
    hparams: Hyperparams,
    *,
    foreach: bool | None = None,
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
    (res,), d_state = step_d_group([seg], state.d, foreach=foreach, inplace=False)
    return res.params, State(exp_avg=res.exp_avg, exp_avg_sq=res.exp_avg_sq, s=res.s, p0=list(state.p0), d=d_state)


def _check_grads(params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    if len(params) != len(grads):
        raise ValueError(f"got {len(params)} params but {len(grads)} grads; expected one grad per param")
    for i, (x, g) in enumerate(zip(params, grads)):
        if g.shape != x.shape:
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)} but params[{i}] has shape {tuple(x.shape)}")


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
