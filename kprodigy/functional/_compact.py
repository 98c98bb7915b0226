"""The compact-state backend: ``_single``'s kernels on float32 chunks of state stored compactly
(``_formats``: bfloat16 written with stochastic rounding, int8 blocks), the backend contract of
``_single.py``.

Each pass walks every tensor in chunks (``CHUNK`` elements on CPU, ``CHUNK_ACCELERATOR`` on
CUDA, where each chunk costs a few dozen kernel launches): ``decode`` the chunk's m, v, s to
float32 (x and g too for 16-bit params), run the specification's ops on the chunk, ``encode`` the
new m, v, s and write x (rounded stochastically for bfloat16 params with ``stochastic_rounding``).
The extra memory of a step is one chunk's float32 working set, never a float32 copy of the state.
Small contiguous params (slice_p == 1, bfloat16 state) are stepped as one span: their state laid
back to back (``PACKS``), params and gradients gathered as ``_fused`` gathers them. A param that
is not contiguous, or keeps a factored ``v``, is stepped whole (one tensor's float32 working set).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
from torch import Tensor

from . import _adamw, _factored, _formats, _fused, _robust, _scratch, _single
from ._layout import SMALL, flat_span, p0_full
from ._scalars import StepScalars
from ._single import Moments, Ts
from ._state import Segment, SegmentResult, compute_dtype, is_wrapped

__all__ = [
    "CHUNK",
    "CHUNK_ACCELERATOR",
    "PACKS",
    "PURE",
    "WRITES_PARAMS",
    "applies",
    "gradients",
    "layout",
    "statistics",
    "update",
]
__all__ += ["update_moments", "update_params"]

PURE = False  # writes in place; the engine steps copies for a pure step
PACKS = True  # the small params' bfloat16 state lies back to back (the plan lays it so)
WRITES_PARAMS = True  # rounds 16-bit params itself, chunk by chunk (the engine must not)
CHUNK = 1 << 16  # elements per chunk on CPU (cache-sized): a multiple of _formats.BLOCK
CHUNK_ACCELERATOR = 1 << 22  # elsewhere (CUDA): fewer kernel launches; ~100 MB of float32 working set


UNDER_TRANSFORMS = (
    "Invalid state_precision: {!r} state does not run under torch.func transforms (vmap, grad) nor as one "
    "graph (torch.compile with fullgraph=True): its kernels work in place on chunks (without fullgraph they "
    "run between graphs); use state_precision='float32' for the state of such a functional step"
)


def applies(seg: Segment) -> bool:
    """Whether any state of ``seg`` is stored compactly (then this backend steps it all); a
    ValueError for compact state under ``torch.func`` transforms or traced by ``torch.compile``
    (a full graph; otherwise dynamo breaks the graph before the compact kernels)."""
    keys = [*(seg.exp_avg or []), *seg.exp_avg_sq, *seg.s]
    if not any(_formats.is_compact(t) for t in keys):
        return False
    if torch.compiler.is_compiling() or any(is_wrapped(t) for t in [*seg.params, *keys]):
        raise ValueError(UNDER_TRANSFORMS.format("int8" if any(_formats.is_int8(t) for t in keys) else "bfloat16"))
    return True


@dataclass(frozen=True)
class Layout:
    """Indices of a segment's params: ``packed`` (small, stepped as one span), ``direct`` (in
    chunks of their flat views), ``whole`` (not contiguous, or a factored ``v``); and what a step
    need not rebuild: ``views`` the direct params' spans without a gradient (``_Span.g`` None),
    ``flat`` the packed params' state per key, one flat span where laid back to back, else the
    tensors gathered each step."""

    packed: list[int]
    direct: list[int]
    whole: list[int]
    views: list[_Span]
    flat: dict[str, Tensor | list[Tensor]]


def layout(seg: Segment) -> Layout:
    slice_p, ms = seg.hparams.slice_p, seg.exp_avg
    packed, direct, whole = [], [], []
    for i, x in enumerate(seg.params):
        v = seg.exp_avg_sq[i]
        if not x.is_contiguous() or (not _formats.is_int8(v) and v.shape != x.shape):
            whole.append(i)
        elif x.numel() < SMALL and slice_p == 1 and not any(_formats.is_int8(t) for t in (v, *(ms or [v])[i : i + 1])):
            packed.append(i)
        else:
            direct.append(i)
    if len(packed) < 2:
        direct, packed = sorted(direct + packed), []
    xs, vs, ss, p0s = seg.params, seg.exp_avg_sq, seg.s, seg.p0
    views = [
        _Span(xs[i].view(-1), None, None if ms is None else _flat(ms[i]), _flat(vs[i]), ss[i], p0s[i].reshape(-1))
        for i in direct
    ]
    flat: dict[str, Tensor | list[Tensor]] = {}
    if packed:
        for key, ts in (("m", ms), ("v", vs), ("s", ss)):
            if ts is not None:
                sub = [ts[i] for i in packed]
                flat[key] = flat_span(sub) if flat_span(sub) is not None else sub  # type: ignore[assignment]
        p0_list = [p0_full(p0s[i], ss[i].numel()) for i in packed]
        p0_flat = flat_span(p0_list)
        if p0_flat is None and any(ss[i].numel() == 0 for i in packed):
            p0_flat = xs[packed[0]].new_empty(0)
        flat["p0"] = p0_list if p0_flat is None else p0_flat
    return Layout(packed, direct, whole, views, flat)


def gradients(seg: Segment, lay: Any, grads: Ts) -> list[Tensor]:
    """The effective gradients in the params' dtype (each chunk is raised to float32 as it is read)."""
    return _single.effective_grads(seg.params, grads, seg.params, seg.hparams, foreach=False)


@dataclass
class _Span:
    """One run of elements stepped chunk by chunk: 1-D params and gradients, the state tensors
    (1-D views, or int8 tensors), ``s`` and ``p0`` 1-D (``p0`` 0-dim where compact)."""

    x: Tensor
    g: Tensor | None
    m: Tensor | None
    v: Tensor
    s: Tensor
    p0: Tensor


def _spans(seg: Segment, lay: Layout, grads: Ts, keys: Sequence[str]) -> list[tuple[_Span, Any]]:
    """The spans of the ``packed`` and ``direct`` params, each with what writes it back: for the
    packed span its index and the gathered state copies among ``keys`` (``_fused`` helpers), else
    None. The packed state not laid flat and not in ``keys`` is a placeholder (not read)."""
    out: list[tuple[_Span, Any]] = [
        (replace(span, g=grads[i].view(-1)), None) for i, span in zip(lay.direct, lay.views)
    ]
    if lay.packed:
        idx, flat = lay.packed, lay.flat
        x_flat, g_flat = _fused._gather_xg(seg.params, grads, idx)
        gathered, got = {}, {}
        for key in ("m", "v", "s"):
            item = flat.get(key)
            if isinstance(item, list) and key in keys:
                gathered[key] = item
                got[key] = _fused._cat(item)
            elif item is not None:
                got[key] = item if isinstance(item, Tensor) else item[0]
        p0 = flat["p0"]
        p0_flat = p0 if isinstance(p0, Tensor) else _fused._cat_scratch(p0, "p0")
        span = _Span(x_flat, g_flat, got.get("m"), got["v"], got["s"], p0_flat)
        out.append((span, (idx, gathered, got)))
    return out


def _flat(t: Tensor) -> Tensor:
    return t if _formats.is_int8(t) else t.view(-1)


def _write_packed(res: SegmentResult, span: _Span, back: Any, params: bool) -> None:
    """After a packed span's update: its params and any gathered (not laid flat) state written back."""
    idx, gathered, got = back
    if params:
        _fused._write_back(res.params, idx, span.x)
    for key, dst in (("m", res.exp_avg), ("v", res.exp_avg_sq), ("s", res.s)):
        if key in gathered and dst is not None:
            _fused._write_back(dst, idx, got[key])


def statistics(seg: Segment, lay: Any, grads: Ts, sc: StepScalars) -> tuple[Tensor, Tensor]:
    """The contract's statistics, chunk by chunk (reads only: ``s`` is decoded into scratch)."""
    lay = lay if lay is not None else layout(seg)
    p, dots, norms = seg.hparams.slice_p, [], []
    spans = [span for span, _ in _spans(seg, lay, grads, ("s",))]
    spans += [
        _Span(seg.params[i].reshape(-1), grads[i].reshape(-1), None, seg.exp_avg_sq[i], seg.s[i], seg.p0[i].reshape(-1))
        for i in lay.whole
    ]
    for span in spans:
        dtype, g = compute_dtype(span.x.dtype), cast(Tensor, span.g)
        for lo, hi, s_lo, s_hi in _chunks(span.x, p):
            s = _decode(span.s, "s", s_lo, s_hi, dtype)
            p0 = span.p0 if span.p0.numel() == 1 and span.s.numel() != 1 else span.p0[s_lo:s_hi]
            dot, norm = _single.statistics_of([span.x[lo:hi]], [g[lo:hi]], [s], [p0], sc=sc, slice_p=p)
            dots.append(dot.to(dtype))
            norms.append(norm.to(dtype))
    return torch.stack(dots).sum(), torch.stack(norms).sum()


def update(seg: Segment, lay: Any, grads: Ts, sc: StepScalars, out: SegmentResult | None) -> SegmentResult:
    """In place (not ``PURE``): m, v, s and x, chunk by chunk."""
    return _update(seg, lay, grads, sc, moments=True, params=True)


def _update(seg: Segment, lay: Any, grads: Ts, sc: StepScalars, *, moments: bool, params: bool) -> SegmentResult:
    lay = lay if lay is not None else layout(seg)
    hp = seg.hparams
    ms = None if seg.exp_avg is None else list(seg.exp_avg)
    res = SegmentResult(list(seg.params), ms, list(seg.exp_avg_sq), list(seg.s))
    sr = hp.stochastic_rounding and params
    for span, back in _spans(seg, lay, grads, ("m", "v", "s") if moments else ("m", "v")):
        _step_span(span, sc, hp.slice_p, moments=moments, params=params, sr=sr)
        if back is not None:
            _write_packed(res, span, back, params)
    for i in lay.whole:
        _step_whole(seg, i, grads[i], sc, moments=moments, params=params, sr=sr)
    return res


def _chunks(x: Tensor, slice_p: int) -> list[tuple[int, int, int, int]]:
    """(lo, hi, s_lo, s_hi) of each chunk of the elements of ``x`` (``CHUNK`` on CPU, else
    ``CHUNK_ACCELERATOR``): ``lo`` a multiple of ``slice_p`` and of the int8 block, so that the
    chunk's ``s`` is ``s[s_lo:s_hi]`` and its blocks are whole."""
    n = x.numel()
    unit = _formats.BLOCK * slice_p
    chunk = CHUNK if x.device.type == "cpu" else CHUNK_ACCELERATOR
    width = max(unit, chunk // unit * unit)
    return [(lo, min(lo + width, n), lo // slice_p, -(-min(lo + width, n) // slice_p)) for lo in range(0, n, width)]


def _step_span(span: _Span, sc: StepScalars, slice_p: int, *, moments: bool, params: bool, sr: bool) -> None:
    """The update of one span, chunk by chunk: decode, the specification's ops in place on the
    float chunk (``_single``'s, or ``_adam_chunk``'s where ``_adam_kwargs`` allows), encode (m, v, s
    with ``moments``; x with ``params``)."""
    assert span.g is not None
    dtype = compute_dtype(span.x.dtype)
    update_s = moments and sc.beta3 is not None and span.s.numel() > 0
    adam = _adam_kwargs(sc, span, slice_p) if moments and params else None
    for lo, hi, s_lo, s_hi in _chunks(span.x, slice_p):
        xc = span.x[lo:hi]
        x = xc if xc.dtype == dtype else _work(xc, dtype, "x")
        g = span.g[lo:hi]
        g = g if g.dtype == dtype and adam is None else _work(g, dtype, "g")  # (``_adam_chunk`` scales it)
        m = None if span.m is None else _decode(span.m, "exp_avg", lo, hi, dtype)
        v = _decode(span.v, "exp_avg_sq", lo, hi, dtype)
        s = _decode(span.s, "s", s_lo, s_hi, dtype) if update_s else span.s
        if adam is not None:
            m = _adam_chunk(x, g, m, v, s if update_s else None, sc, slice_p, adam)
        elif moments:
            dest = SegmentResult([x], None if m is None else [m], [v], [s])
            _single.update_moments([g], None if m is None else [m], [v], [s], sc=sc, slice_p=slice_p, out=dest)
        if params and adam is None:
            _single.update_params(
                [x], [g], None if m is None else [m], [v], sc=sc, out=SegmentResult([x], None, [], [])
            )
        if moments:  # (after the params: encoding overwrites the float m, v, s)
            noise = _shared_noise(span, hi - lo, update_s)
            if span.m is not None:
                _formats.encode(span.m, "exp_avg", lo, hi, m, noise)  # type: ignore[arg-type]
            _formats.encode(span.v, "exp_avg_sq", lo, hi, v, noise)
            if update_s:
                _formats.encode(span.s, "s", s_lo, s_hi, s, noise)
        if params and x is not xc and sr:
            _robust.round_into(xc, x, _noise(hi - lo, x.device, "x"))
        elif params and x is not xc:
            xc.copy_(x)


def _adam_kwargs(sc: StepScalars, span: _Span, slice_p: int) -> dict[str, Any] | None:
    """The keywords of ``torch._fused_adamw_`` that make it this step's m, v, x update (as
    ``_adamw``: lr = dlr, eps = d_new * eps, Adam's bias corrections 1, the gradient times d_old;
    betas[0] == 0: m a zeroed scratch, lr = dlr * d_new / d_old), or None where it does not apply:
    D on the device (its scalars are tensors: the kernel takes floats), a skip folded into them."""
    if sc.ok is not None or isinstance(sc.d_new, Tensor) or span.x.device.type not in ("cpu", "cuda"):
        return None
    b1 = sc.decays[0]
    lr = sc.dlr if span.m is not None else sc.dlr * sc.d_new / sc.weight
    step = torch.full((), _adamw.HUGE_STEP, dtype=torch.float32, device=span.x.device)
    return {**_adamw._FIXED, "lr": lr, "beta1": b1, "beta2": sc.decays[1], "eps": sc.eps_d, "state_steps": [step]}


def _adam_chunk(
    x: Tensor, g: Tensor, m: Tensor | None, v: Tensor, s: Tensor | None, sc: StepScalars, slice_p: int, kw: dict
) -> Tensor:
    """m, v, s and x of one float chunk in place (``g`` scratch: scaled here), as ``_single``'s
    ``update_moments`` then ``update_params`` compute them (x bit for bit, m within an ulp:
    benchmarks/NOTES.md, "Native path"): s <- beta3 s + s_scale g[::p], then one fused kernel.
    Returns m (a zeroed scratch where the step keeps none)."""
    if s is not None and sc.beta3 is not None:
        s.mul_(sc.beta3).add_(g[::slice_p] if slice_p > 1 else g, alpha=sc.s_scale)
    g.mul_(sc.weight)
    if m is None:
        m = torch.zeros_like(g)
    if sc.decay is not None:
        x.add_(x, alpha=-sc.decay)
    torch._fused_adamw_([x], [g], [m], [v], [], **kw)
    return m


def _shared_noise(span: _Span, n: int, update_s: bool) -> Tensor | None:
    """One draw of rounding bits for a chunk's bfloat16 m, v and s (each rounding unbiased; a
    third of the draws: ``random_`` was a third of the bfloat16 step, benchmarks/NOTES.md), or
    None where fewer than two of them are bfloat16."""
    keys = [t for t in (span.m, span.v, span.s if update_s else None) if t is not None]
    if sum(t.dtype == torch.bfloat16 for t in keys) < 2:
        return None
    return _noise(n, span.x.device, "noise")


def _noise(n: int, device: torch.device, slot: str) -> Tensor:
    """``_robust.rounding_noise`` of ``n`` elements into a reused buffer where ``_scratch`` has one."""
    return _robust.rounding_noise(n, device, _scratch.buffer(n, torch.int32, device, ("compact", slot)))


def _decode(t: Tensor, key: str, lo: int, hi: int, dtype: torch.dtype) -> Tensor:
    """``_formats.decode`` into a reused buffer (slot ``key``) where it makes a copy."""
    return _formats.decode(t, key, lo, hi, dtype, _scratch.buffer(hi - lo, dtype, t.device, ("compact", key)))


def _step_whole(seg: Segment, i: int, g: Tensor, sc: StepScalars, *, moments: bool, params: bool, sr: bool) -> None:
    """The update of one param stepped whole: contiguous float copies of x, g, m (and of v when it is
    param-shaped); ``_factored``'s kernels where ``v`` is factored (they take it as it is)."""
    x0, hp = seg.params[i], seg.hparams
    dtype = compute_dtype(x0.dtype)
    n = x0.numel()
    x, g = x0.reshape(-1).to(dtype, copy=True), g.reshape(-1).to(dtype)
    m0 = None if seg.exp_avg is None else seg.exp_avg[i]
    v0, s0 = seg.exp_avg_sq[i], seg.s[i]
    m = None if m0 is None else _formats.decode(_contiguous(m0), "exp_avg", 0, n, dtype).clone()
    factored = not _formats.is_int8(v0) and v0.shape != x0.shape
    v = v0 if factored else _formats.decode(_contiguous(v0), "exp_avg_sq", 0, n, dtype).clone()
    update_s = moments and sc.beta3 is not None and s0.numel() > 0
    s = _formats.decode(s0, "s", 0, s0.numel(), dtype).clone() if update_s else s0
    kernels: Any = _factored if factored else _single
    shaped = [t.view(x0.shape) for t in (x, g)]
    mm = None if m is None else [m.view(x0.shape)]
    vv = [v if factored else v.view(x0.shape)]
    if moments:
        dest = SegmentResult(shaped[:1], mm, vv, [s])
        kernels.update_moments(shaped[1:], mm, vv, [s], sc=sc, slice_p=hp.slice_p, out=dest)
        if m0 is not None and m is not None:
            _store(m0, "exp_avg", m)
        if not factored:
            _store(v0, "exp_avg_sq", v)
        if update_s:
            _formats.encode(s0, "s", 0, s0.numel(), s)
    if params:
        kernels.update_params(shaped[:1], shaped[1:], mm, vv, sc=sc, out=SegmentResult(shaped[:1], None, [], []))
        x0.copy_((_robust.stochastic_round(x, x0.dtype) if sr else x).view(x0.shape))


def _contiguous(t: Tensor) -> Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _store(t: Tensor, key: str, values: Tensor) -> None:
    """Encode a whole tensor's new ``values`` into state ``t`` (through a contiguous copy if needed)."""
    if t.is_contiguous():
        _formats.encode(t, key, 0, values.numel(), values)
        return
    flat = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    _formats.encode(flat, key, 0, values.numel(), values)
    t.copy_(flat)


def _work(t: Tensor, dtype: torch.dtype, slot: str) -> Tensor:
    """A copy of ``t`` as ``dtype`` in a reused buffer (``_scratch``) or a new tensor."""
    buf = _scratch.buffer(t.numel(), dtype, t.device, ("compact", slot))
    return t.to(dtype, copy=True) if buf is None else buf.view(t.shape).copy_(t)


def update_moments(
    gs: Ts, exp_avgs: Ts | None, exp_avg_sqs: Ts, ss: Ts, *, sc: StepScalars, slice_p: int, out: SegmentResult | None
) -> Moments:
    """The m, v, s half (``_partial``), in place, per param in chunks."""
    assert out is not None, "in place only"
    seg = _segment_of(gs, gs, exp_avgs, exp_avg_sqs, ss, slice_p)
    res = _update(seg, None, gs, sc, moments=True, params=False)
    return res.exp_avg, res.exp_avg_sq, res.s


def update_params(
    xs: Ts, gs: Ts, exp_avgs: Ts | None, exp_avg_sqs: Ts, *, sc: StepScalars, out: SegmentResult | None
) -> list[Tensor]:
    """The x half (``_partial``), in place, per param in chunks (16-bit params rounded to nearest)."""
    assert out is not None, "in place only"
    empty = [x.new_empty(0) for x in xs]
    gs = [x if g is None else g for x, g in zip(xs, gs)]  # (read only without exp_avg: ``_partial``)
    seg = _segment_of(xs, gs, exp_avgs, exp_avg_sqs, empty, 1)
    return _update(seg, None, gs, sc, moments=False, params=True).params


def _segment_of(xs: Ts, gs: Ts, ms: Ts | None, vs: Ts, ss: Ts, slice_p: int) -> Segment:
    from ._hyperparams import Hyperparams

    p0s = [s.new_zeros(()) for s in ss]
    return Segment(xs, gs, ms, vs, ss, p0s, Hyperparams(slice_p=slice_p))
