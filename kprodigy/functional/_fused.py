"""Fused kernels: ``_single``'s statistics and update on 1-D tensors inside
``torch.compile(fullgraph=True, dynamic=True)`` (no second statement of the math), each pass one
loop without param-sized temporaries (benchmarks/NOTES.md, changes 5 and 9): ``statistics`` reads
4 words per element, ``update`` 9 (a skip decision is a select in the loop). Per call:

- tensors of ``FLAT_MAX`` elements or more: flat views of them, their gradients and state, when
  all are contiguous;
- small contiguous tensors: one call per pass, their state used in place where it lies back to
  back (``_layout.pack``), else gathered and written back; params and gradients gathered into
  reused CPU buffers, the params written back after the update;
- any other layout: the eager kernels.

D, lr, betas... are 0-dim tensors and shapes dynamic, so only graph-shaping options (``slice_p``,
exp_avg, update_d, decoupled decay, the skip) and dtypes select a graph, each compiled once.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import _scratch, _single
from ._layout import SMALL, flat_span, p0_full, views
from ._scalars import StepScalars
from ._single import Ts, gradients, layout
from ._state import Segment, SegmentResult, compute_dtype

__all__ = ["FLAT_MAX", "PACKS", "PURE", "available", "gradients", "layout", "statistics", "update"]

PURE = False  # update works in place; the engine steps copies for a pure step
PACKS = True  # steps the state of small params on one flat buffer per key: the plan lays it so
FLAT_MAX = SMALL  # tensors with fewer elements are packed into flat buffers


def _statistics_1d(x: Tensor, g: Tensor, s: Tensor, p0: Tensor, sc: StepScalars, slice_p: int) -> tuple[Tensor, ...]:
    return _single.statistics_of([x], [g], [s], [p0], sc=sc, slice_p=slice_p)


def _update_1d(
    x: Tensor, g: Tensor, m: Tensor | None, v: Tensor, s: Tensor, sc: StepScalars, slice_p: int, ok: Tensor | None
) -> None:
    """``_single.update`` on one flat tensor, in place; where ``ok`` (the skip decision) is False, a
    select in the loop keeps the old values (NaN never reaches the state)."""
    olds = [x, v, s] + ([] if m is None else [m])
    # with a skip decision, the in-place ops on copies (values of the compiled loop, not memory),
    # then a select; the in-place ops lower to the same code as without the skip
    news = olds if ok is None else [t.clone() for t in olds]
    new_m = None if m is None else [news[3]]
    dest = SegmentResult([news[0]], new_m, [news[1]], [news[2]])
    _single.update_of([news[0]], [g], new_m, [news[1]], [news[2]], sc=sc, slice_p=slice_p, out=dest)
    if ok is not None:
        for old, new in zip(olds, news):
            old.copy_(torch.where(ok, new, old))


# graphs per kernel (dtype x exp_avg x update_d x slice_p x decoupled decay x packed) exceed dynamo's
# default of 8 per function: the limit is raised during our calls only, the process's setting kept
_RECOMPILE_LIMIT = 64


@functools.cache
def _compiled(name: str) -> Callable[..., Any]:
    kernels: dict[str, Callable[..., Any]] = {"statistics": _statistics_1d, "update": _update_1d}
    compiled = torch.compile(kernels[name], fullgraph=True, dynamic=True)

    def call(*args: Any, **kwargs: Any) -> Any:
        cfg = torch._dynamo.config
        before = cfg.recompile_limit
        if before >= _RECOMPILE_LIMIT:
            return compiled(*args, **kwargs)
        cfg.recompile_limit = _RECOMPILE_LIMIT
        try:
            return compiled(*args, **kwargs)
        finally:
            cfg.recompile_limit = before

    return call


_STATUS: dict[str, str | None] = {}  # per device type: None if compiling works, else why not
_WARNED: set[str] = set()


def available(device: torch.device, warn: bool = True) -> bool:
    """Whether ``torch.compile`` works here (probed once per device type on a tiny kernel); if not
    (no C++ compiler, no Triton...) and ``warn`` (``fused=True``), warns once per device type."""
    key = device.type
    if key not in _STATUS:
        try:
            probe = torch.compile(lambda t: t * 2 + 1, fullgraph=True)
            probe(torch.ones(3, device=device))
            _STATUS[key] = None
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: fall back
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            _STATUS[key] = f"{type(exc).__name__}: {first}"
    why = _STATUS[key]
    if why is not None and warn and key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"kprodigy: fused step unavailable on {key} ({why}); using foreach", RuntimeWarning, stacklevel=3)
    return why is None


def _partition(xs: Ts, slice_p: int, views: Sequence[Ts | None] = ()) -> tuple[list[int], list[int], list[int]]:
    """(packed, direct, eager) indices: small contiguous params (slice_p == 1), params whose
    ``views`` (lists aligned with ``xs``, or None) are all contiguous, the rest."""
    packed, direct, eager = [], [], []
    for i, x in enumerate(xs):
        if not x.is_contiguous():
            eager.append(i)
        elif x.numel() < FLAT_MAX and slice_p == 1:
            packed.append(i)
        elif all(ts is None or ts[i].is_contiguous() for ts in views):
            direct.append(i)
        else:
            eager.append(i)
    return packed, direct, eager


def _cat(ts: Ts) -> Tensor:
    return torch._C._nn.flatten_dense_tensors(list(ts))


def _cat_scratch(ts: Ts, slot: str) -> Tensor:
    """``_cat`` into a buffer reused by later steps on CPU, keyed by ``slot`` and the first tensor
    (two gathers alive at once never share one)."""
    first = ts[0]
    buf = _scratch.buffer(sum(t.numel() for t in ts), first.dtype, first.device, (slot, id(first)))
    return _cat(ts) if buf is None else torch.cat([t.reshape(-1) for t in ts], out=buf)


def _gather_xg(xs: Ts, gs: Ts, packed: list[int]) -> tuple[Tensor, Tensor]:
    """The packed params and gradients, flat, gathered once per optimizer step (``step_memo``): the
    update pass reads the statistics pass's gather (the params do not change between them)."""
    memo = _scratch.step_memo()
    key = ("xg", tuple(id(xs[i]) for i in packed), tuple(id(gs[i]) for i in packed))
    if memo is not None and key in memo:
        return memo.pop(key)  # type: ignore[no-any-return]
    flat = _cat_scratch([xs[i] for i in packed], "x"), _cat_scratch([gs[i] for i in packed], "g")
    if memo is not None:
        memo[key] = flat
    return flat


def _gather(ts: Ts) -> tuple[Tensor, bool]:
    """(flat tensor of ``ts``, whether it is a copy that must be written back)."""
    span = flat_span(ts)
    return (span, False) if span is not None else (_cat(ts), True)


def _pick(ts: Ts, idx: list[int]) -> list[Tensor]:
    return [ts[i] for i in idx]


def _write_back(dst: Ts, idx: list[int], flat: Tensor) -> None:
    targets = _pick(dst, idx)
    torch._foreach_copy_(targets, views(flat, targets))


_SCALAR_FIELDS = ("numerator_scale", "s_scale", "beta3", "dlr", "weight", "decay", "d_new", "eps_d")


def _on_device(sc: StepScalars, like: Tensor) -> StepScalars:
    """``sc`` with every scalar a 0-dim tensor on ``like``'s device (a float in the graph is a
    constant: a new D or lr would recompile), filled there (no sync, allowed in CUDA-graph
    capture), without ``ok`` (the compiled update takes it apart)."""
    dtype = compute_dtype(like.dtype)

    def dev(b: Any) -> Any:
        if isinstance(b, Tensor):
            return b.to(dtype)
        return b if b is None else torch.full((), b, dtype=dtype, device=like.device)

    fields = {name: dev(getattr(sc, name)) for name in _SCALAR_FIELDS}
    return sc.with_(  # type: ignore[arg-type]
        gains=(dev(sc.gains[0]), dev(sc.gains[1])), decays=(dev(sc.decays[0]), dev(sc.decays[1])), ok=None, **fields
    )


def statistics(seg: Segment, lay: Any, gs: Ts, sc: StepScalars) -> tuple[Tensor, Tensor]:
    xs, ss, p0s, slice_p = seg.params, seg.s, seg.p0, seg.hparams.slice_p
    kernel, on_device = _compiled("statistics"), _on_device(sc, xs[0])
    packed, direct, eager = _partition(xs, slice_p, (gs, ss))
    sums = [kernel(xs[i].view(-1), gs[i].view(-1), ss[i], p0s[i].reshape(-1), on_device, slice_p) for i in direct]
    if packed:
        s_flat = _gather([ss[i] for i in packed])[0]  # read only here
        p0s_packed = [p0_full(p0s[i], ss[i].numel()) for i in packed]
        p0_flat = flat_span(p0s_packed)
        if p0_flat is None:  # compact (0-dim) p0s are not packed: gathered into a reused buffer
            p0_flat = _cat_scratch(p0s_packed, "p0")
        sums.append(kernel(*_gather_xg(xs, gs, packed), s_flat, p0_flat, on_device, slice_p))
    if eager:
        sums.append(_single.statistics_of(*(_pick(ts, eager) for ts in (xs, gs, ss, p0s)), sc=sc, slice_p=slice_p))
    return torch.stack([num for num, _ in sums]).sum(), torch.stack([den for _, den in sums]).sum()


def update(seg: Segment, lay: Any, gs: Ts, sc: StepScalars, out: SegmentResult | None) -> SegmentResult:
    """In place only (not ``PURE``): m, v, s and x in one compiled loop per tensor or packed buffer."""
    xs, exp_avgs, exp_avg_sqs, ss, slice_p = seg.params, seg.exp_avg, seg.exp_avg_sq, seg.s, seg.hparams.slice_p
    res = SegmentResult(list(xs), None if exp_avgs is None else list(exp_avgs), list(exp_avg_sqs), list(ss))
    kernel, on_device = _compiled("update"), _on_device(sc, xs[0])
    packed, direct, eager = _partition(xs, slice_p, (gs, exp_avgs, exp_avg_sqs, ss))
    for i in direct:
        m = None if exp_avgs is None else exp_avgs[i].view(-1)
        kernel(xs[i].view(-1), gs[i].view(-1), m, exp_avg_sqs[i].view(-1), ss[i], on_device, slice_p, sc.ok)
    if packed:
        m_flat, m_copied = (None, False) if exp_avgs is None else _gather([exp_avgs[i] for i in packed])
        v_flat, v_copied = _gather([exp_avg_sqs[i] for i in packed])
        s_flat, s_copied = _gather([ss[i] for i in packed])
        x_flat, g_flat = _gather_xg(xs, gs, packed)
        kernel(x_flat, g_flat, m_flat, v_flat, s_flat, on_device, slice_p, sc.ok)
        _write_back(xs, packed, x_flat)
        if v_copied:
            _write_back(exp_avg_sqs, packed, v_flat)
        if exp_avgs is not None and m_flat is not None and m_copied:
            _write_back(exp_avgs, packed, m_flat)
        if sc.beta3 is not None and s_copied:
            _write_back(ss, packed, s_flat)
    if eager:
        m_eager = None if exp_avgs is None else _pick(exp_avgs, eager)
        sub = SegmentResult(_pick(xs, eager), m_eager, _pick(exp_avg_sqs, eager), _pick(ss, eager))
        _single.update_of(sub.params, _pick(gs, eager), m_eager, sub.exp_avg_sq, sub.s, sc=sc, slice_p=slice_p, out=sub)
    return res
