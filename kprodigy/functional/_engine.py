"""The engine: one step of the D-groups of a plan, for the optimizer class and the functional step.

A plan (``build``) holds per D-group, per param group in it (a member), the parts its tensors are
stepped in, each by one backend (the contract of ``_single.py``). A step, for every D-group at
once: each part's effective gradients and statistics; ONE reduction seam (``reduce_stats``) and,
with D on the host (Python numbers; else 0-dim tensors), ONE host read; the D update and the skip
(``_scalars.next_d``); each part's update (none on a skip with D on the host, folded into the
scalars with D on the device); the cap.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from . import _adamw, _compact, _factored, _foreach, _fused, _layout, _robust, _single
from ._hyperparams import Hyperparams
from ._scalars import StepScalars, cap_d_ratio, next_d, step_scalars, updates_d
from ._single import Ts
from ._state import STATE_KEYS, DState, Segment, SegmentResult, d_dtype, is_wrapped

__all__ = ["S_FIRST_MIN", "Member", "Plan", "ReduceStats", "build", "choose_backend"]
__all__ += ["d_on_host", "normalize", "refresh", "step", "use_foreach", "use_fused"]

ReduceStats = Callable[[Tensor], Tensor]  # sums [numerator_0, denom_0, numerator_1, ...] over ranks

S_FIRST_MIN = 1 << 16  # elements of a D-group from which ``_s_first`` pays for its extra read (NOTES)


@dataclass(eq=False)
class Part:
    """Tensors of one member stepped by one backend call: ``seg`` (one dtype, as laid out), ``index``
    their positions in the member, ``own`` them as an update's destination."""

    backend: ModuleType
    seg: Segment
    index: list[int]
    lay: Any
    pure: bool
    own: SegmentResult = field(init=False)
    numel: int = field(init=False)  # elements of its params
    rounds: bool = field(init=False)  # the engine rounds its bfloat16 params (``_update_part``)
    wrapped: bool = field(init=False)  # torch.func-wrapped params: scalars cast for them (``StepScalars.like``)

    def __post_init__(self) -> None:
        self.own = _unchanged(self.seg)
        self.numel = sum(x.numel() for x in self.seg.params)
        sr = self.seg.hparams.stochastic_rounding and any(x.dtype == torch.bfloat16 for x in self.seg.params)
        self.rounds = sr and not getattr(self.backend, "WRITES_PARAMS", False)  # (_compact rounds per chunk)
        xs = self.seg.params  # (``like`` leaves the scalars alone inside torch.compile)
        self.wrapped = not torch.compiler.is_compiling() and bool(xs) and is_wrapped(xs[0])


@dataclass(eq=False)
class Member:
    """One param group of a D-group: its segment (state tensors as laid out) and its parts."""

    seg: Segment
    parts: list[Part]
    numel: int = field(init=False)  # elements of its parts' params

    def __post_init__(self) -> None:
        self.numel = sum(part.numel for part in self.parts)


@dataclass(eq=False)
class Plan:
    """Per D-group its members; whether D is held on the host; whether the step makes new tensors."""

    d_groups: list[list[Member]]
    on_host: bool
    pure: bool = False


def normalize(plan: Plan) -> None:
    """Multiply a scaled plan's scales into its state (``_adamw.normalize``): the tensors then hold
    the moments and ``s`` themselves (prodigyopt's values), and the plan stays usable."""
    for members in plan.d_groups:
        for member in members:
            for part in member.parts:
                if part.backend is _adamw:
                    _adamw.normalize(part.lay)


def refresh(member: Member, hp: Hyperparams) -> None:
    """Take a member's new hyperparameter values (a schedule changed them) into the plan."""
    member.seg = replace(member.seg, hparams=hp)
    for part in member.parts:
        part.seg = replace(part.seg, hparams=hp)  # (the same tensors: ``own`` stays)


def d_on_host(tensors: Sequence[Tensor]) -> bool:
    """Whether a functional step over ``tensors`` holds D on the host: on CPU (a read costs no sync),
    outside ``torch.compile`` and ``torch.func``, without autograd."""
    if torch.compiler.is_compiling():
        return False
    grad_mode = torch.is_grad_enabled()
    for t in tensors:
        if t.device.type != "cpu" or is_wrapped(t) or grad_mode and t.requires_grad:
            return False
    return True


def use_foreach(tensors: Sequence[Tensor], foreach: bool | None) -> bool:
    """Resolve ``foreach=None``: multi-tensor ops off CPU (CPU foreach ops are per-tensor loops:
    benchmarks/NOTES.md, change 3); never for torch.func-wrapped tensors (no vmap rule), nor inside
    ``torch.compile`` unless asked for (inductor fuses the per-tensor path)."""
    if torch.compiler.is_compiling():
        return bool(foreach)
    if any(is_wrapped(t) for t in tensors):
        return False
    return foreach if foreach is not None else not all(t.device.type == "cpu" for t in tensors)


def use_fused(tensors: Sequence[Tensor], fused: bool | None) -> bool:
    """Resolve ``fused``: the compiled kernels (``_fused.py``) only if True (None compiles nothing,
    on any device: the first step costs what later ones cost, and no compiler or Triton is
    needed); never inside ``torch.compile``, for torch.func-wrapped inputs or inputs that require
    grad in grad mode, or where compiling fails (``_fused.available``)."""
    if fused is not True or not tensors or torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors) or any(is_wrapped(t) for t in tensors):
        return False
    return _fused.available(tensors[0].device, warn=True)


def choose_backend(seg: Segment, on_host: bool, foreach: bool | None, fused: bool | None, pack: bool) -> ModuleType:
    """A member's backend: compact (state stored in bfloat16 or int8, ``_formats``), factored (a
    factored ``v``), compiled (``use_fused``), fused AdamW (D on the host, automatic flags, state
    that may be laid flat, ``_adamw.usable``), compact for 16-bit params with float32 state there
    too, foreach or per-tensor."""
    if _compact.applies(seg):
        return _compact
    if _factored.is_factored(seg.params, seg.exp_avg_sq):
        return _factored
    if use_fused(seg.params, fused):
        return _fused
    if _automatic(on_host, foreach, fused, pack):
        if _adamw.usable(seg):
            return _adamw
        if _compact.takes_16bit_params(seg):  # (16-bit params, float32 state: its fused chunks)
            return _compact
    return _foreach if use_foreach(seg.params, foreach) else _single


def _automatic(on_host: bool, foreach: bool | None, fused: bool | None, pack: bool) -> bool:
    """Whether the fused-AdamW backend may take params: D on the host, automatic flags, state that
    may be laid flat."""
    return on_host and pack and foreach is None and fused is None


def build(
    segments: Sequence[Sequence[Segment]],
    *,
    on_host: bool,
    foreach: Sequence[bool | None] | None = None,
    fused: Sequence[bool | None] | None = None,
    pure: bool = False,
    pack: bool = True,
    scaled: bool = False,
) -> Plan:
    """The plan of a step over ``segments`` (per D-group, its members'); ``foreach``, ``fused`` per
    D-group. ``pure``: the step makes new tensors (the in-place backends step copies). ``pack``: lay
    the small params' state flat for the backends that step it so (``PACKS``): the members then
    hold new state tensors (``Member.seg``), which the caller keeps. ``scaled``: the backends that
    can keep their state scaled between steps do (``_adamw``); the caller must ``normalize`` the
    plan before anything else reads or writes that state."""
    n = len(segments)
    d_groups = []
    for segs, fe, fu in zip(segments, foreach or [None] * n, fused or [None] * n):
        members = []
        for seg in segs:
            parts: list[Part] = []
            if seg.params:
                backend = choose_backend(seg, on_host, fe, fu, pack or pure)
                native = list(range(len(seg.params))) if backend is _adamw else []
                if backend in (_single, _foreach) and _automatic(on_host, fe, fu, pack or pure):
                    native = _natives(seg)  # (the params the fused-AdamW backend takes on their own)
                indices = [native] if native else []  # (one dtype: ``usable``; the others one dtype per call)
                taken = set(native)
                indices += [[i for i in idx if i not in taken] for idx in _by_dtype(seg.params)]
                for index in [idx for idx in indices if idx]:
                    kernels = _adamw if index is native else backend
                    part = _take(seg, index)
                    if pure and not kernels.PURE:
                        part = _layout.copy_segment(part)
                    elif pack and getattr(kernels, "PACKS", False):
                        part = _layout.pack_segment(part)
                    lay = kernels.layout(part)
                    if scaled and kernels is _adamw:
                        lay.scaled = True
                    parts.append(Part(kernels, part, index, lay, pure and kernels.PURE))
                seg = _merge(seg, parts)
            members.append(Member(seg, parts))
        d_groups.append(members)
    return Plan(d_groups, on_host, pure)


def step(
    plan: Plan,
    grads: Sequence[Sequence[Sequence[Tensor]]],
    d_states: Sequence[DState],
    *,
    reduce_stats: ReduceStats | None = None,
    d_ratio_cap: float | None = None,
) -> tuple[list[list[SegmentResult]], list[DState]]:
    """One step of every D-group of ``plan``, from ``grads`` (per D-group, per member, aligned with
    ``Member.seg``) and ``d_states`` (host numbers if ``plan.on_host``, else 0-dim tensors). With
    ``reduce_stats`` a D-group without local tensors takes part with zero statistics (unless all
    its lr are 0). Returns per D-group its members' tensors after the step (for a pure plan), and
    the new D states (capped by ``d_ratio_cap``)."""
    reduced = reduce_stats is not None
    pending = [_statistics(m, g, ds, reduced, plan.on_host) for m, g, ds in zip(plan.d_groups, grads, d_states)]
    if any(p is not None and p.s_first for p in pending):
        _s_first([(m, p) for m, p in zip(plan.d_groups, pending) if p is not None and p.s_first])
    sums = _reduce(pending, plan.on_host, reduce_stats, _device(plan, d_states) if reduced else None)
    results: list[list[SegmentResult]] = []
    new_states: list[DState] = []
    for members, ds, p, total in zip(plan.d_groups, d_states, pending, sums):
        if p is None:  # no group with lr > 0 and gradients: nothing changes, k included
            results.append([_unchanged(m.seg) for m in members] if plan.pure else [])
            new_states.append(ds)
            continue
        new, moves, ok = next_d(ds, total, members[0].seg.hparams, update_d=p.update_d)
        if ok is False:  # skipped with D on the host: nothing is written
            results.append([_unchanged(m.seg) for m in members] if plan.pure else [])
        else:
            results.append(_update(members, p, new.d, ok if isinstance(ok, Tensor) else None, moves, plan.pure))
        new_states.append(new)
    if d_ratio_cap is None:
        return results, new_states
    live = [any(m.seg.hparams.lr > 0 for m in members) for members in plan.d_groups]
    return results, cap_d_ratio(d_states, new_states, live, d_ratio_cap)


@dataclass(eq=False)
class _Pending:
    """A D-group between its statistics and its update."""

    update_d: bool | Tensor
    grads: dict[int, list[list[Tensor]]]  # per active member, per part: the effective gradients
    scalars: dict[int, StepScalars]  # per active member
    sums: list[Tensor]  # per part (dot, norm), then the gradient extremes that decide the skip
    scales: list[tuple[Any, float]]  # per part with statistics: the scales of its dot and its norm
    n_sums: int = 0  # how many of ``sums`` are (dot, norm) entries
    s_first: bool = False  # its statistics are ``_s_first``'s to take
    s_written: bool = False  # they wrote this step's ``s``: the update leaves it


def _statistics(
    members: Sequence[Member], grads: Sequence[Ts], ds: DState, reduced: bool, on_host: bool
) -> _Pending | None:
    """Effective gradients and statistics of a D-group; None when it does not step. The statistics
    read only, except where ``_s_first`` writes ``s`` (after a check that decides the skip)."""
    active = [i for i, m in enumerate(members) if m.seg.hparams.lr > 0 and m.parts]
    if not members or not active and not (reduced and any(m.seg.hparams.lr > 0 for m in members)):
        return None
    hp0 = members[0].seg.hparams
    p = _Pending(updates_d(hp0, ds.k), {}, {}, [], [])
    if on_host and not reduced and p.update_d is True and sum(members[i].numel for i in active) >= S_FIRST_MIN:
        p.s_first = all(_writes_s_first(part) for i in active for part in members[i].parts)
    checks: list[Tensor] = []
    for i in active:
        sc = p.scalars[i] = step_scalars(members[i].seg.hparams, ds, update_d=p.update_d, beta3=hp0.beta3_value)
        p.grads[i] = []
        for part in members[i].parts:
            raw = grads[i] if len(part.index) == len(grads[i]) else [grads[i][j] for j in part.index]
            g = part.backend.gradients(part.seg, part.lay, raw)
            p.grads[i].append(g)
            if p.update_d is not False and not p.s_first:
                p.scales.append((sc.numerator_scale, _norm_scale(part, sc)))
                p.sums += part.backend.statistics(part.seg, part.lay, g, _like(sc, part))
            # where the statistics do not read every gradient element, its extremes decide the skip
            if hp0.skip_nonfinite and g and (p.update_d is not True or part.seg.hparams.slice_p > 1):
                checks += _robust.extremes(g, d_dtype(g[0].device))
    p.n_sums = len(p.sums)  # (``_s_first`` adds its sums; it leaves ``checks`` empty)
    p.sums += checks
    return p


def _writes_s_first(part: Part) -> bool:
    """Whether a part can have ``s`` written in its statistics (``_s_first``): its backend can
    (``S_FIRST``), on CPU (the extra host read costs no device sync), and its dots read every
    gradient element (slice_p 1: a non-finite one makes them non-finite)."""
    x = part.seg.params[0]
    return getattr(part.backend, "S_FIRST", False) and x.device.type == "cpu" and part.seg.hparams.slice_p == 1


def _s_first(groups: Sequence[tuple[Sequence[Member], _Pending]]) -> None:
    """The statistics of these D-groups with ``s`` written once per step: every part's dots (reads
    only), ONE host read of them deciding each D-group's skip before anything is written, then the
    norms writing ``s`` (the update leaves it). A skipped D-group, or one whose ``s_scale`` overflows
    its dtype (the kernels raise), takes the read-only statistics: nothing written. Saves the
    update's pass over ``s`` (benchmarks/NOTES.md, "s written once")."""
    parts = [
        [(p.scalars[i], part, g) for i in p.scalars for part, g in zip(ms[i].parts, p.grads[i])] for ms, p in groups
    ]
    dots = [[part.backend.dots(part.seg, part.lay, g, sc) for sc, part, g in mine] for mine in parts]
    values = iter(_read([t for mine in dots for t in mine]))
    for (ms, p), mine, ds in zip(groups, parts, dots):
        finite = all([math.isfinite(next(values)) for _ in ds])
        fits = all(abs(sc.s_scale) <= torch.finfo(part.seg.params[0].dtype).max for sc, part, _ in mine)
        p.s_written = fits and (finite or not ms[0].seg.hparams.skip_nonfinite)
        for (sc, part, g), dot in zip(mine, ds):
            p.scales.append((sc.numerator_scale, _norm_scale(part, sc)))  # (before ``norms`` moves it)
            if p.s_written:
                p.sums += [dot, part.backend.norms(part.seg, part.lay, g, sc)]
            else:
                p.sums += part.backend.statistics(part.seg, part.lay, g, sc)
        p.n_sums = len(p.sums)


def _reduce(
    pending: Sequence[_Pending | None], on_host: bool, reduce_stats: ReduceStats | None, device: torch.device | None
) -> list[list[Any]]:
    """Per stepping D-group: [numerator, denom] (none without statistics), then the extremes that
    decide the skip; floats from one read with D on the host, else 0-dim tensors. ``reduce_stats``
    sums the pairs over ranks, a local non-finite extreme folded in (NaN)."""
    out: list[list[Any]] = [[] for _ in pending]
    if reduce_stats is None and on_host:  # one read of the raw sums, combined on the host
        values, at = _read([t for p in pending if p is not None for t in p.sums]), 0
        for j, p in enumerate(pending):
            if p is not None:
                mine, at = values[at : at + len(p.sums)], at + len(p.sums)
                out[j] = _combine(mine[: p.n_sums], p.scales) + mine[p.n_sums :]
        return out
    packed: list[Tensor] = []
    for j, p in enumerate(pending):
        if p is None:
            continue
        if p.n_sums or (p.update_d is not False and reduce_stats is not None):
            raw = [t.to(d_dtype(t.device)) for t in p.sums[: p.n_sums]]
            where = device or torch.device("cpu")  # (no local tensors: zero statistics)
            pair = torch.stack(_combine(raw, p.scales)) if raw else torch.zeros(2, dtype=d_dtype(where), device=where)
            if len(p.sums) > p.n_sums:
                pair = torch.where(torch.isfinite(torch.stack(p.sums[p.n_sums :])).all(), pair, torch.nan)
            out[j] = [pair]
            packed.append(pair)
        elif p.sums:
            out[j] = [torch.stack(p.sums)]
    if packed and reduce_stats is not None:
        reduced = iter(reduce_stats(torch.cat([t.to(packed[0].device) for t in packed])).view(-1, 2).unbind(0))
        for row in out:
            if row and any(row[0] is t for t in packed):
                row[0] = next(reduced).to(row[0].device)
    if not on_host:
        return [list(row[0].unbind()) if row else [] for row in out]
    values, at = _read([t for row in out for t in row]), 0
    for j, row in enumerate(out):
        width = sum(t.numel() for t in row)
        out[j], at = values[at : at + width], at + width
    return out


def _combine(raw: Sequence[Any], scales: Sequence[tuple[Any, float]]) -> list[Any]:
    """[sum of scale * dot, sum of scale * norm] from the parts' (dot, norm) pairs and scales."""
    num: Any = None
    den: Any = None
    for i, (a, b) in enumerate(scales):
        dot, norm = raw[2 * i] * a, raw[2 * i + 1] if b == 1.0 else raw[2 * i + 1] * b
        num, den = (dot, norm) if num is None else (num + dot, den + norm)
    return [] if num is None else [num, den]


def _norm_scale(part: Part, sc: StepScalars) -> float:
    """What the norm of a part's statistics is to be multiplied by (its backend's ``norm_scale``:
    ``_adamw``'s scaled ``s``), taken before its statistics run; 1 for the others."""
    of = getattr(part.backend, "norm_scale", None)
    return 1.0 if of is None else of(part.lay, sc)  # type: ignore[no-any-return]


def _device(plan: Plan, d_states: Sequence[DState]) -> torch.device:
    """Where a D-group without local tensors puts zero statistics: a D state's or a param's device."""
    for t in [ds.d for ds in d_states] + [m.seg.params[0] for ms in plan.d_groups for m in ms if m.seg.params]:
        if isinstance(t, Tensor):
            return t.device
    return torch.device("cpu")


def _read(ts: Sequence[Tensor]) -> list[float]:
    """The step's one host read: ``ts`` as Python floats (one transfer where they share a device)."""
    if not ts:
        return []
    if all(t.dim() == 0 and t.dtype == ts[0].dtype and t.device == ts[0].device for t in ts):
        return torch.stack(list(ts)).tolist()  # type: ignore[no-any-return]
    same = all(t.device == ts[0].device for t in ts)
    return torch.cat([t.reshape(-1).to(ts[0].device if same else "cpu", torch.float64) for t in ts]).tolist()


def _update(members: Sequence[Member], p: _Pending, d_new: Any, ok: Tensor | None, moves: Any, pure: bool) -> list[Any]:
    """The update of a D-group's active members (each part's), into the plan's tensors or, with
    ``pure``, new ones: then the members' tensors after it (``SegmentResult``; the others keep theirs)."""
    out = []
    for i, m in enumerate(members):
        res = _unchanged(m.seg) if pure else None
        if i in p.scalars:
            sc = p.scalars[i].finish(d_new, ok, moves)
            sc = sc.with_(beta3=None) if p.s_written else sc
            for part, g in zip(m.parts, p.grads[i]):
                new = _update_part(part, g, _like(sc, part))
                if res is None:
                    continue
                for key in ("params", "exp_avg", "exp_avg_sq", "s"):
                    mine = getattr(res, key)
                    for j, t in zip(part.index, getattr(new, key) or []):
                        mine[j] = t
        if res is not None:
            out.append(res)
    return out


def _like(sc: StepScalars, part: Part) -> StepScalars:
    return sc.like(part.seg.params[0]) if part.wrapped else sc


def _update_part(part: Part, grads: Ts, sc: StepScalars) -> SegmentResult:
    """``update`` of one part, in place or into new tensors of the params' dtype; with stochastic
    rounding, of float32 copies of the bfloat16 params, rounded into them here."""
    seg, sr = part.seg, part.rounds
    if not (sr or part.pure):
        return part.backend.update(seg, part.lay, grads, sc, part.own)  # type: ignore[no-any-return]
    if sr:
        seg = replace(seg, params=[x.float() if x.dtype == torch.bfloat16 else x for x in seg.params])
    res = part.backend.update(seg, part.lay, grads, sc, None if part.pure else _unchanged(seg))
    out = None if part.pure else part.seg.params  # (a pure step of 16-bit params computes in float32)
    return replace(res, params=_robust.write_back(part.seg.params, res.params, out=out, sr=sr))


def _unchanged(seg: Segment) -> SegmentResult:
    m = list(seg.exp_avg) if seg.exp_avg is not None else None
    return SegmentResult(list(seg.params), m, list(seg.exp_avg_sq), list(seg.s))


def _natives(seg: Segment) -> list[int]:
    """The params of a member the fused-AdamW backend does not take whole that it takes on their
    own, those of the first one's dtype and device (a transposed param beside contiguous ones
    leaves them the fast path): [] if none, or if they are all."""
    ok = [i for i in range(len(seg.params)) if _adamw.usable(_take(seg, [i]))]
    if ok:
        x0 = seg.params[ok[0]]
        ok = [i for i in ok if seg.params[i].dtype == x0.dtype and seg.params[i].device == x0.device]
    return ok if ok and len(ok) < len(seg.params) and _adamw.usable(_take(seg, ok)) else []


def _by_dtype(xs: Ts) -> list[list[int]]:
    buckets: dict[torch.dtype, list[int]] = {}
    for i, x in enumerate(xs):
        buckets.setdefault(x.dtype, []).append(i)
    return list(buckets.values())


def _merge(seg: Segment, parts: Sequence[Part]) -> Segment:
    """``seg`` with the tensors its parts hold (copies, or state laid flat) in their places."""
    if len(parts) == 1 and len(parts[0].index) == len(seg.params):
        return parts[0].seg
    lists: dict[str, list[Any] | None] = {}
    for key in ("params", *STATE_KEYS):
        lists[key] = None if getattr(seg, key) is None else list(getattr(seg, key))
        for part in parts:
            for i, t in zip(part.index, getattr(part.seg, key) or []):
                lists[key][i] = t  # type: ignore[index]
    return replace(seg, **lists)  # type: ignore[arg-type]


def _take(seg: Segment, index: list[int]) -> Segment:
    if len(index) == len(seg.params):
        return seg
    lists = {key: None if (ts := getattr(seg, key)) is None else [ts[i] for i in index] for key in _SEGMENT_LISTS}
    return Segment(**lists, hparams=seg.hparams)  # type: ignore[arg-type]


_SEGMENT_LISTS = ("params", "grads", *STATE_KEYS)
