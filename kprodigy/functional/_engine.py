"""The engine: one step of the D-groups of a plan, for the optimizer class and the functional
step alike.

A plan (``build``) holds, per D-group and per param group in it (a member), the parts its
tensors are stepped in: one backend each (a module with the contract of ``_single.py``), chosen
once, with what the backend keeps between steps (``layout``). A step (``step``) runs, for every
D-group at once:

1. the schedule (``_scalars.updates_d``) and each member's scalars (``_scalars.step_scalars``);
2. each part's effective gradients and read-only statistics;
3. ONE reduction seam for all D-groups (``reduce_stats``: the distributed all-reduce) and, with
   D on the host, ONE host read;
4. the D update, the all-zero-gradient rule and the non-finite skip (``_scalars.next_d``);
5. each part's update (nothing on a skipped step with D on the host; folded into the scalars
   with D on the device), then ``d_ratio_cap`` over the live D-groups (``_scalars.cap_d_ratio``).

D is held on the host (Python numbers: the optimizer's default mode, and the functional step on
the CPU) or on the device (0-dim tensors: ``capturable``, the functional step on an accelerator
or inside ``torch.func`` and ``torch.compile``); the steps differ only in that form.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from . import _adamw, _factored, _foreach, _fused, _layout, _robust, _single
from ._hyperparams import Hyperparams
from ._scalars import StepScalars, cap_d_ratio, next_d, step_scalars, updates_d
from ._state import DState, Segment, SegmentResult, d_dtype

__all__ = ["AUTO_FUSED_MIN", "Member", "Plan", "ReduceStats", "build", "d_on_host", "step", "use_foreach", "use_fused"]

# Sums the packed D statistics [numerator_0, denom_0, numerator_1, ...] (1-D, float64, one
# device) over ranks and returns the global tensor of the same shape (distributed training).
ReduceStats = Callable[[Tensor], Tensor]

# fused=None (automatic) compiles the kernels for a CUDA param group of at least this many
# elements: below it, the first step's compile time (seconds) outweighs what they save.
AUTO_FUSED_MIN = 1 << 20


@dataclass(eq=False)
class Part:
    """Tensors of one member stepped by one backend call: ``seg`` (one dtype; the state tensors
    the plan laid out), ``index`` their positions in the member, ``lay`` the backend's layout,
    ``pure`` whether ``update`` makes new tensors (a pure step on a ``PURE`` backend)."""

    backend: ModuleType
    seg: Segment
    index: list[int]
    lay: Any
    pure: bool

    @property
    def own(self) -> SegmentResult:
        """The part's own tensors: where an in-place update writes."""
        return _unchanged(self.seg)


@dataclass(eq=False)
class Member:
    """One param group of a D-group in a plan: its segment (with the state tensors as laid out:
    small params' state packed for the backends that step it flat) and its parts."""

    seg: Segment
    parts: list[Part]


@dataclass(eq=False)
class Plan:
    """What a step runs over: per D-group its members, and whether D is held on the host."""

    d_groups: list[list[Member]]
    on_host: bool


def refresh(member: Member, hp: Hyperparams) -> None:
    """Take new hyperparameter values of a member (a schedule changed them) into its plan."""
    member.seg = replace(member.seg, hparams=hp)
    for part in member.parts:
        part.seg = replace(part.seg, hparams=hp)


def d_on_host(tensors: Sequence[Tensor]) -> bool:
    """Whether a functional step over ``tensors`` keeps D on the host: on the CPU (where reading a
    value costs no sync), outside ``torch.compile`` and ``torch.func`` transforms, and not where
    autograd records the step."""
    if torch.compiler.is_compiling():
        return False
    for t in tensors:
        if t.device.type != "cpu" or torch._C._functorch.is_functorch_wrapped_tensor(t):
            return False
        if t.requires_grad and torch.is_grad_enabled():
            return False
    return True


def use_foreach(tensors: Sequence[Tensor], foreach: bool | None) -> bool:
    """Resolve ``foreach=None``: multi-tensor ops off the CPU (CPU foreach ops are per-tensor loops,
    and the per-tensor kernels with reused temporaries measured faster there: benchmarks/NOTES.md,
    change 3). Never for functorch-wrapped tensors (no vmap rule) or inside ``torch.compile``
    unless asked for (inductor fuses the per-tensor path)."""
    if torch.compiler.is_compiling():
        return bool(foreach)
    if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
        return False
    if foreach is None:
        return not all(t.device.type == "cpu" for t in tensors)
    return foreach


def use_fused(tensors: Sequence[Tensor], fused: bool | None, on_host: bool = True) -> bool:
    """Resolve ``fused``: the compiled kernels (``_fused.py``) where asked for and possible.

    True asks for them; None (automatic) takes them on CUDA for at least ``AUTO_FUSED_MIN``
    elements (the first step compiles for seconds; small models do not win that back). Never
    inside ``torch.compile`` (which fuses the eager kernels itself), for torch.func-wrapped
    inputs, for inputs that require grad while grad mode is on, or where compiling fails (a
    one-line warning if ``fused=True``)."""
    if fused is False or not tensors or torch.compiler.is_compiling():
        return False
    if fused is None and (tensors[0].device.type != "cuda" or sum(t.numel() for t in tensors) < AUTO_FUSED_MIN):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
        return False
    return _fused.available(tensors[0].device, warn=fused is True)


def _backend(seg: Segment, on_host: bool, foreach: bool | None, fused: bool | None, pack: bool) -> ModuleType:
    """The backend of a member: factored (any factored ``v``), compiled (``use_fused``), the
    fused-AdamW kernels (D on the host, the automatic flags, state that may be laid flat,
    ``_adamw.usable``), foreach or per-tensor."""
    if _factored.is_factored(seg.params, seg.exp_avg_sq):
        return _factored
    if use_fused(seg.params, fused, on_host):
        return _fused
    if on_host and pack and foreach is None and fused is None and _adamw.usable(seg):
        return _adamw
    return _foreach if use_foreach(seg.params, foreach) else _single


def build(
    segments: Sequence[Sequence[Segment]],
    *,
    on_host: bool,
    foreach: Sequence[bool | None] | None = None,
    fused: Sequence[bool | None] | None = None,
    pure: bool = False,
    pack: bool = True,
) -> Plan:
    """The plan of a step over ``segments`` (per D-group, its members' segments).

    foreach, fused: per D-group, the flags of the optimizer (None: automatic).
    pure: the step writes into new tensors (the functional ``step``): the backends that update
        in place step copies (``_layout.copy_segment``), the others compute new tensors.
    pack: lay the state of small params flat for the backends that step it so (``PACKS``): the
        plan's members then hold new state tensors (``Member.seg``), which the caller keeps.
    """
    n = len(segments)
    fes, fus = list(foreach or [None] * n), list(fused or [None] * n)
    d_groups = []
    for segs, fe, fu in zip(segments, fes, fus):
        members = []
        for seg in segs:
            parts: list[Part] = []
            if seg.params:
                backend = _backend(seg, on_host, fe, fu, pack or pure)
                whole = backend is _adamw  # one dtype (``usable``); the others take one dtype per call
                for index in [list(range(len(seg.params)))] if whole else _by_dtype(seg.params):
                    part = _take(seg, index)
                    if pure and not backend.PURE:
                        part = _layout.copy_segment(part)
                    elif pack and getattr(backend, "PACKS", False):
                        part = _layout.pack_segment(part)
                    parts.append(Part(backend, part, index, backend.layout(part), pure and backend.PURE))
                seg = _merge(seg, parts)
            members.append(Member(seg, parts))
        d_groups.append(members)
    return Plan(d_groups, on_host)


def step(
    plan: Plan,
    grads: Sequence[Sequence[Sequence[Tensor]]],
    d_states: Sequence[DState],
    *,
    reduce_stats: ReduceStats | None = None,
    d_ratio_cap: float | None = None,
) -> tuple[list[list[SegmentResult]], list[DState]]:
    """One step of every D-group of ``plan``.

    grads: per D-group, per member, the gradients of its params (aligned with ``Member.seg``).
    d_states: per D-group, its D state (Python numbers if ``plan.on_host``, else 0-dim tensors).
    reduce_stats: sums the statistics over ranks (see ``ReduceStats``); called once per step on
        which some D-group updates D. With it, a D-group with no tensors on this rank still takes
        part (zero statistics) unless all its groups have lr == 0, so every rank keeps one D.
    d_ratio_cap: after the step, every live D-group's D (some group with lr > 0, stepped or
        not) is kept within this factor of the smallest.
    Returns per D-group its members' new tensors (the plan's own where updated in place) and
    the new D states.
    """
    pending = [
        _statistics(members, g, ds, plan.on_host, reduce_stats is not None)
        for members, g, ds in zip(plan.d_groups, grads, d_states)
    ]
    sums = _reduce(pending, plan.on_host, reduce_stats, _device(plan, d_states) if reduce_stats else None)
    results, new_states = [], []
    for members, ds, p, total in zip(plan.d_groups, d_states, pending, sums):
        if p is None:  # no group with lr > 0 and gradients: nothing changes, k included
            results.append([_unchanged(m.seg) for m in members])
            new_states.append(ds)
            continue
        hp0 = members[0].seg.hparams
        ok: Any = True
        if hp0.skip_nonfinite and total:
            ok = all(map(_finite, total)) if plan.on_host else torch.isfinite(torch.stack(total)).all()
        num, den = (total[0], total[1]) if p.update_d is not False else (0.0, None)
        new, moves = next_d(ds, num, den, hp0, update_d=p.update_d, ok=ok)
        if ok is False:  # skipped with D on the host: nothing is written
            results.append([_unchanged(m.seg) for m in members])
        else:
            device_ok = ok if isinstance(ok, Tensor) else None
            results.append(_update(members, p, new.d, device_ok, moves))
        new_states.append(new)
    live = [any(m.seg.hparams.lr > 0 for m in members) for members in plan.d_groups]
    return results, cap_d_ratio(d_states, new_states, live, d_ratio_cap)


@dataclass(eq=False)
class _Pending:
    """A D-group between its statistics and its update."""

    update_d: bool | Tensor
    grads: dict[int, list[list[Tensor]]]  # per active member: per part, the effective gradients
    scalars: dict[int, StepScalars]  # per active member
    sums: list[Tensor]  # per active part: its (dot, norm), then its gradient extremes (skip check)
    scales: list[Any]  # per active part: the numerator scale of its (dot, norm)
    n_sums: int  # len of the (dot, norm) entries of ``sums`` (2 per part with statistics)


def _statistics(
    members: Sequence[Member], grads: Sequence[Sequence[Tensor]], ds: DState, on_host: bool, reduced: bool
) -> _Pending | None:
    """Effective gradients and read-only statistics of one D-group (nothing is written); None
    when it does not step."""
    if not members:
        return None
    hp0 = members[0].seg.hparams
    active = [i for i, m in enumerate(members) if m.seg.hparams.lr > 0 and m.parts]
    if not active and not (reduced and any(m.seg.hparams.lr > 0 for m in members)):
        return None
    update_d = updates_d(hp0, ds.k)
    beta3 = hp0.beta3_value
    p = _Pending(update_d, {}, {}, [], [], 0)
    checks: list[Tensor] = []
    for i in active:
        m = members[i]
        sc = p.scalars[i] = step_scalars(m.seg.hparams, ds, update_d=update_d, beta3=beta3)
        p.grads[i] = []
        for part in m.parts:
            g = part.backend.gradients(part.seg, part.lay, [grads[i][j] for j in part.index])
            p.grads[i].append(g)
            if update_d is not False:
                p.sums += part.backend.statistics(part.seg, part.lay, g, sc)
                p.scales.append(sc.numerator_scale)
            # a non-finite gradient makes the statistics non-finite when they read every element
            if hp0.skip_nonfinite and g and (update_d is not True or part.seg.hparams.slice_p > 1):
                checks += _robust.extremes(g, d_dtype(g[0].device))
    p.n_sums = len(p.sums)
    p.sums += checks
    return p


def _reduce(
    pending: Sequence[_Pending | None], on_host: bool, reduce_stats: ReduceStats | None, device: torch.device | None
) -> list[list[Any]]:
    """Per stepping D-group: [numerator, denom] (Python floats on the host, else float64 0-dim
    tensors; [] without statistics), then its gradient extremes where they decide the skip;
    summed over ranks by ``reduce_stats`` with the skip folded in (NaN sums), read once if on
    the host."""
    out: list[list[Any]] = [[] for _ in pending]
    if reduce_stats is None and on_host:  # one read of every raw sum; combined on the host
        flat = [t for p in pending if p is not None for t in p.sums]
        values = _read(flat)
        at = 0
        for j, p in enumerate(pending):
            if p is None:
                continue
            mine, at = values[at : at + len(p.sums)], at + len(p.sums)
            out[j] = _combine(mine[: p.n_sums], p.scales) + mine[p.n_sums :]
        return out
    packed: list[Tensor] = []
    for j, p in enumerate(pending):
        if p is None:
            continue
        if p.n_sums or (p.update_d is not False and reduce_stats is not None):  # (zero sums: no local tensors)
            raw = [t.to(d_dtype(t.device)) for t in p.sums[: p.n_sums]]
            where = device or torch.device("cpu")
            pair = torch.stack(_combine(raw, p.scales)) if raw else torch.zeros(2, dtype=d_dtype(where), device=where)
            if len(p.sums) > p.n_sums:  # local extremes: a NaN reaches every rank by the reduction
                pair = torch.where(torch.isfinite(torch.stack(p.sums[p.n_sums :])).all(), pair, torch.nan)
            out[j] = [pair]
            packed.append(pair)
        elif len(p.sums):
            out[j] = [torch.stack(p.sums)]
    if packed and reduce_stats is not None:
        reduced = iter(reduce_stats(torch.cat([t.to(packed[0].device) for t in packed])).view(-1, 2).unbind(0))
        for row in out:
            if row and any(row[0] is t for t in packed):
                row[0] = next(reduced).to(row[0].device)
    if on_host:
        values = _read([t for row in out for t in row])
        at = 0
        for j, row in enumerate(out):
            width = sum(t.numel() for t in row)
            out[j], at = values[at : at + width], at + width
        return out
    return [list(row[0].unbind()) if row else [] for row in out]


def _combine(raw: Sequence[Any], scales: Sequence[Any]) -> list[Any]:
    """[sum of scale * dot, sum of norm] from the parts' (dot, norm) pairs."""
    if not raw:
        return []
    num = sum((raw[2 * i] * scale for i, scale in enumerate(scales)), start=raw[0] * 0)
    den = sum((raw[2 * i + 1] for i in range(len(scales))), start=raw[1] * 0)
    return [num, den]


def _device(plan: Plan, d_states: Sequence[DState]) -> torch.device:
    """Where a D-group without local tensors puts its zero statistics: its D state's device, or
    that of any tensor of the plan."""
    for ds in d_states:
        if isinstance(ds.d, Tensor):
            return ds.d.device
    for members in plan.d_groups:
        for m in members:
            if m.seg.params:
                return m.seg.params[0].device
    return torch.device("cpu")


def _read(ts: Sequence[Tensor]) -> list[float]:
    """The step's one host read: ``ts`` as Python floats (one stack per device and dtype)."""
    if not ts:
        return []
    first = ts[0]
    if all(t.device == first.device and t.dtype == first.dtype for t in ts):
        if all(t.dim() == 0 for t in ts):
            return torch.stack(list(ts)).tolist()  # type: ignore[no-any-return]
        return torch.cat([t.reshape(-1) for t in ts]).tolist()
    return torch.cat([t.reshape(-1).to("cpu", torch.float64) for t in ts]).tolist()


def _finite(value: Any) -> bool:
    return value == value and abs(value) != float("inf")


def _update(members: Sequence[Member], p: _Pending, d_new: Any, ok: Tensor | None, moves: Any) -> list[SegmentResult]:
    """The update of every active member of a D-group (``update`` of each part), into the plan's
    tensors or new ones; the members that do not step keep theirs."""
    out = []
    for i, m in enumerate(members):
        if i not in p.scalars:
            out.append(_unchanged(m.seg))
            continue
        sc = p.scalars[i].finish(d_new, ok, moves)
        res = _unchanged(m.seg)
        for part, g in zip(m.parts, p.grads[i]):
            new = _update_part(part, g, sc)
            for mine, theirs in zip((res.params, res.exp_avg, res.exp_avg_sq, res.s), (new.params, new.exp_avg, new.exp_avg_sq, new.s)):
                for j, t in zip(part.index, theirs or []):
                    mine[j] = t  # type: ignore[index]
        out.append(res)
    return out


def _update_part(part: Part, grads: Sequence[Tensor], sc: StepScalars) -> SegmentResult:
    """``update`` of one part, in place or into new tensors in the params' dtype; with stochastic
    rounding, of float32 copies of the bfloat16 params, rounded into the params here."""
    seg = part.seg
    sr = seg.hparams.stochastic_rounding and any(x.dtype == torch.bfloat16 for x in seg.params)
    if not (sr or part.pure):
        return part.backend.update(seg, part.lay, grads, sc, part.own)  # type: ignore[no-any-return]
    if sr:
        seg = replace(seg, params=[x.float() if x.dtype == torch.bfloat16 else x for x in seg.params])
    own = _unchanged(seg)
    res = part.backend.update(seg, part.lay, grads, sc, None if part.pure else own)
    out = None if part.pure else part.seg.params  # new params in the params' dtype (pure 16-bit: promoted)
    return replace(res, params=_robust.write_back(part.seg.params, res.params, out=out, sr=sr))


def _unchanged(seg: Segment) -> SegmentResult:
    m = list(seg.exp_avg) if seg.exp_avg is not None else None
    return SegmentResult(list(seg.params), m, list(seg.exp_avg_sq), list(seg.s))


def _by_dtype(xs: Sequence[Tensor]) -> list[list[int]]:
    """The indices of ``xs`` grouped by dtype (each backend call takes one dtype)."""
    buckets: dict[torch.dtype, list[int]] = {}
    for i, x in enumerate(xs):
        buckets.setdefault(x.dtype, []).append(i)
    return list(buckets.values())


def _merge(seg: Segment, parts: Sequence[Part]) -> Segment:
    """``seg`` with the tensors its parts hold (copies, or state laid flat) in their places."""
    if len(parts) == 1 and len(parts[0].index) == len(seg.params):
        return parts[0].seg
    lists: dict[str, list[Any] | None] = {}
    for key in ("params", "exp_avg", "exp_avg_sq", "s", "p0"):
        whole = getattr(seg, key)
        lists[key] = None if whole is None else list(whole)
        for part in parts:
            for i, t in zip(part.index, getattr(part.seg, key) or []):
                lists[key][i] = t  # type: ignore[index]
    return replace(seg, **lists)  # type: ignore[arg-type]


def _take(seg: Segment, index: list[int]) -> Segment:
    if len(index) == len(seg.params):
        return seg
    pick = lambda ts: None if ts is None else [ts[i] for i in index]  # noqa: E731
    return Segment(pick(seg.params), pick(seg.grads), pick(seg.exp_avg), pick(seg.exp_avg_sq), pick(seg.s), pick(seg.p0), seg.hparams)  # type: ignore[arg-type]
