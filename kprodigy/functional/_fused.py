"""Fused kernels: the per-tensor reference (``_single.py``) compiled with ``torch.compile``.

There is no second statement of the math: the kernels here call ``_single.statistics`` and
``_single.update`` on 1-D tensors inside ``torch.compile(fullgraph=True, dynamic=True)`` (C++/OpenMP
on CPU, Triton on GPU), with the contract of ``_single.py``; Inductor compiles each pass to one
loop with no parameter-sized temporaries (benchmarks/NOTES.md, changes 5 and 9):

- ``statistics``: reads g, p0, x, s; writes nothing (4 words per element);
- ``update``, once D is updated: the new m, v, s and x in one loop (9 words). With a skip
  decision (``sc.ok``), the old values are kept by a select in the loop (no zeroing of g).

Layout, per call (one device and dtype, as ``_step`` guarantees):

- large tensors (``numel >= FLAT_MAX``) run the compiled kernel on a flat view of each tensor,
  in place (no copies), when the param, its gradient and its state are all contiguous;
- small contiguous tensors are stepped together by one kernel call per pass: their state is used
  in place where it lies back to back in one buffer (``pack``/``flat_span``: the optimizer keeps
  it so), else gathered and written back; their params and gradients are gathered into reused
  CPU buffers, and the params written back after the update;
- any other layout (a non-contiguous param, or a large one with a transposed gradient or state
  left in another memory format) runs the eager per-tensor kernels, which take any strides.

Shapes are dynamic (one graph serves every length), and D, lr, betas, ``s_scale``... are 0-dim
tensors, so changing them does not recompile. Graph-shaping options (``slice_p``, whether
exp_avg exists, whether D is updated, decoupled decay, the skip) and dtypes select among a
handful of graphs, each compiled once.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import _scratch, _single
from ._layout import SMALL, flat_span, p0_full
from ._scalars import StepScalars
from ._state import Segment, SegmentResult

__all__ = ["FLAT_MAX", "PACKS", "PURE", "available", "gradients", "layout", "statistics", "update"]

PURE = False  # update works in place; the engine steps copies for a pure step
PACKS = True  # steps the state of small params on one flat buffer per key: the plan lays it so


def layout(seg: Segment) -> None:
    return None


def gradients(seg: Segment, lay: Any, grads: Sequence[Tensor]) -> list[Tensor]:
    return _single.gradients(seg, lay, grads)

FLAT_MAX = SMALL  # tensors with fewer elements are packed into flat buffers
TensorList = list[Tensor]


def _statistics_1d(x: Tensor, g: Tensor, s: Tensor, p0: Tensor, sc: StepScalars, slice_p: int) -> tuple[Tensor, Tensor]:
    """``_single.statistics`` on one flat tensor."""
    return _single.statistics_of([x], [g], [s], [p0], sc=sc, slice_p=slice_p)


def _update_1d(
    x: Tensor, g: Tensor, m: Tensor | None, v: Tensor, s: Tensor, sc: StepScalars, slice_p: int, ok: Tensor | None
) -> None:
    """``_single.update`` on one flat tensor, in place. With the statistics pass before it,
    nothing is written before D is known, and each pass is one loop: 4 + 9 = 13 words per
    element (benchmarks/NOTES.md, change 9).

    ok: the non-finite skip's decision (0-dim bool; ``sc`` has it folded in, but not ``sc.ok``):
    every tensor keeps its old value where it is False (a select in the loop, so NaN never
    reaches the state), else the new one.
    """
    olds = [x, v, s] + ([] if m is None else [m])
    # with a skip decision, the same in-place ops on copies (values of the compiled loop, not
    # memory), then a select; the in-place ops lower to the same code as without the skip
    news = olds if ok is None else [t.clone() for t in olds]
    new_m = None if m is None else [news[3]]
    dest = SegmentResult([news[0]], new_m, [news[1]], [news[2]])
    _single.update_of([news[0]], [g], new_m, [news[1]], [news[2]], sc=sc, slice_p=slice_p, out=dest)
    if ok is not None:
        for old, new in zip(olds, news):
            old.copy_(torch.where(ok, new, old))


# Graphs per kernel: dtype x exp_avg present x update_d x slice_p x decoupled decay x packed or
# not; more than dynamo's default of 8 per function, so the limit is raised during our calls only
# (the process's setting is left as it is).
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
    """Whether ``torch.compile`` works here (probed once per device type on a tiny kernel).

    On failure (no C++ compiler, no Triton...) returns False and, if ``warn`` (the user asked for
    ``fused=True``), warns once per device type, in one line; the caller then uses foreach.
    """
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


def _device_scalar(value: float | Tensor, like: Tensor) -> Tensor:
    """``value`` as a 0-dim tensor of ``like``'s dtype and device, without a host-to-device copy."""
    if isinstance(value, Tensor):
        return value.to(like.dtype)
    return torch.full((), value, dtype=like.dtype, device=like.device)


def _statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _flat(t: Tensor) -> Tensor:
    return t.view(-1)


def _partition(
    xs: Sequence[Tensor], slice_p: int, views: Sequence[Sequence[Tensor] | None] = ()
) -> tuple[list[int], list[int], list[int]]:
    """(packed, direct, eager) indices. Small contiguous params go to flat buffers (slice_p == 1
    only; their gradients and state are gathered, so any strides do); other params run the kernel
    on flat views of themselves and of their gradient and state (``views``: lists aligned with
    ``xs``, or None), which needs every one of them contiguous; the rest run eagerly."""
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


def _cat(ts: Sequence[Tensor]) -> Tensor:
    """The tensors flattened and concatenated (a new buffer)."""
    return torch._C._nn.flatten_dense_tensors(list(ts))


def _cat_scratch(ts: Sequence[Tensor], slot: str) -> Tensor:
    """``_cat`` into a buffer reused by later steps on CPU (``_scratch``), keyed by ``slot`` and
    the first tensor, so that two gathers alive at once never share one."""
    first = ts[0]
    buf = _scratch.buffer(sum(t.numel() for t in ts), first.dtype, first.device, (slot, id(first)))
    return _cat(ts) if buf is None else torch.cat([t.reshape(-1) for t in ts], out=buf)


def _gather_xg(xs: Sequence[Tensor], gs: Sequence[Tensor], packed: list[int]) -> tuple[Tensor, Tensor]:
    """The packed params and gradients, flat, in buffers reused by later steps on CPU; gathered
    once per step of the optimizer (``_scratch.step_memo``): the update pass reads the statistics
    pass's gather (nothing changes the params between the passes; it writes them back itself)."""
    memo = _scratch.step_memo()
    key = ("xg", tuple(id(xs[i]) for i in packed), tuple(id(gs[i]) for i in packed))
    if memo is not None and key in memo:
        return memo.pop(key)  # type: ignore[no-any-return]
    flat = _cat_scratch([xs[i] for i in packed], "x"), _cat_scratch([gs[i] for i in packed], "g")
    if memo is not None:
        memo[key] = flat
    return flat


def _gather(ts: Sequence[Tensor]) -> tuple[Tensor, bool]:
    """(flat tensor of ``ts``, whether it is a copy that must be written back)."""
    span = flat_span(ts)
    return (span, False) if span is not None else (_cat(ts), True)


def _pick(ts: Sequence[Tensor], idx: list[int]) -> list[Tensor]:
    return [ts[i] for i in idx]


def _write_back(dst: Sequence[Tensor], idx: list[int], flat: Tensor) -> None:
    """Copy the packed buffer ``flat`` back into ``dst[i]`` for i in idx (one multi-tensor copy)."""
    targets = [dst[i] for i in idx]
    torch._foreach_copy_(targets, torch._C._nn.unflatten_dense_tensors(flat, targets))


_SCALAR_FIELDS = ("numerator_scale", "s_scale", "beta3", "dlr", "weight", "decay", "d_new", "eps_d")


def _on_device(sc: StepScalars, like: Tensor) -> StepScalars:
    """``sc`` with every scalar a 0-dim tensor of ``like``'s device in its statistics dtype, and
    without ``ok`` (the compiled update takes it apart): a Python float in the graph is a
    constant, and a new D or lr every step would recompile. Made by a fill on the device
    (``torch.full``), not a host-to-device copy: no sync, and allowed inside CUDA-graph capture."""
    ref = torch.empty((), dtype=_statistics_dtype(like.dtype), device=like.device)

    def dev(b: Any) -> Any:
        return b if b is None else _device_scalar(b, ref)

    fields = {name: dev(getattr(sc, name)) for name in _SCALAR_FIELDS}
    return sc.with_(  # type: ignore[arg-type]
        gains=(dev(sc.gains[0]), dev(sc.gains[1])), decays=(dev(sc.decays[0]), dev(sc.decays[1])), ok=None, **fields
    )


def statistics(seg: Segment, lay: Any, gs: Sequence[Tensor], sc: StepScalars) -> tuple[Tensor, Tensor]:
    """Same contract as ``_single.statistics``, in the compiled kernel where the layout allows."""
    xs, ss, p0s, slice_p = seg.params, seg.s, seg.p0, seg.hparams.slice_p
    kernel, on_device = _compiled("statistics"), _on_device(sc, xs[0])
    packed, direct, eager = _partition(xs, slice_p, (gs, ss))
    nums: list[Tensor] = []
    dens: list[Tensor] = []
    for i in direct:
        num, den = kernel(_flat(xs[i]), _flat(gs[i]), ss[i], p0s[i].reshape(-1), on_device, slice_p)
        nums.append(num)
        dens.append(den)
    if packed:
        s_flat = _gather([ss[i] for i in packed])[0]  # read only here
        p0s_packed = [p0_full(p0s[i], ss[i].numel()) for i in packed]
        p0_flat = flat_span(p0s_packed)
        if p0_flat is None:  # compact (0-dim) p0s are not packed: gathered into a reused buffer
            p0_flat = _cat_scratch(p0s_packed, "p0")
        num, den = kernel(*_gather_xg(xs, gs, packed), s_flat, p0_flat, on_device, slice_p)
        nums.append(num)
        dens.append(den)
    if eager:
        picked = (_pick(ts, eager) for ts in (xs, gs, ss, p0s))
        num, den = _single.statistics_of(*picked, sc=sc, slice_p=slice_p)
        nums.append(num)
        dens.append(den)
    return torch.stack(nums).sum(), torch.stack(dens).sum()


def update(seg: Segment, lay: Any, gs: Sequence[Tensor], sc: StepScalars, out: SegmentResult | None) -> SegmentResult:
    """Same contract as ``_single.update``, in place only (``PURE`` is False): m, v, s and x in
    one compiled loop per tensor (or per packed buffer)."""
    xs, exp_avgs, exp_avg_sqs, ss, slice_p = seg.params, seg.exp_avg, seg.exp_avg_sq, seg.s, seg.hparams.slice_p
    res = SegmentResult(list(xs), None if exp_avgs is None else list(exp_avgs), list(exp_avg_sqs), list(ss))
    kernel, on_device = _compiled("update"), _on_device(sc, xs[0])
    packed, direct, eager = _partition(xs, slice_p, (gs, exp_avgs, exp_avg_sqs, ss))
    for i in direct:
        m = None if exp_avgs is None else _flat(exp_avgs[i])
        kernel(_flat(xs[i]), _flat(gs[i]), m, _flat(exp_avg_sqs[i]), ss[i], on_device, slice_p, sc.ok)
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
        _single.update_of(sub.params, _pick(gs, eager), sub.exp_avg, sub.exp_avg_sq, sub.s, sc=sc, slice_p=slice_p, out=sub)
    return res
