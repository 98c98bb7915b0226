"""The compact-state backend: ``_single``'s kernels on float32 chunks of state stored compactly
(``_formats``: bfloat16 written with stochastic rounding, int8 blocks), the backend contract of
``_single.py``.

Each pass walks every tensor in chunks (``CHUNK`` elements on CPU, ``CHUNK_ACCELERATOR`` on
CUDA, where each chunk costs a few dozen kernel launches): ``decode`` the chunk's m, v, s to
float32 (x and g too for 16-bit params), run the specification's ops on the chunk, ``encode`` the
new m, v, s and write x (rounded stochastically for bfloat16 params with ``stochastic_rounding``).
With D on the host the m, v, x ops are one ``torch._fused_adamw_`` call on the float chunk (as
``_adamw`` maps Prodigy onto it, ``_adam_kwargs``), and the bfloat16 m, v, s of a chunk are
rounded with one draw of bits by one pair of ops (``_Loaded``). The extra memory of a step is one
chunk's float32 working set, never a float32 copy of the state. Small contiguous params (slice_p
== 1, state laid back to back by the plan: ``PACKS``) are stepped in buckets of at most a chunk,
gathered into the layout's scratch. A param that is not contiguous, or keeps a factored ``v``, is
stepped whole (one tensor's float32 working set).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch
from torch import Tensor

from . import _adamw, _factored, _formats, _robust, _scratch, _single
from ._layout import SMALL, flat_span, p0_full, views
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
    "takes_16bit_params",
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


def takes_16bit_params(seg: Segment) -> bool:
    """Whether this backend steps ``seg`` of 16-bit params whose state is not compact (float32:
    ``state_precision="float32"``, decoded as views of itself) on its fused chunks: outside
    ``torch.func`` transforms and ``torch.compile``."""
    if torch.compiler.is_compiling() or not any(x.dtype in (torch.bfloat16, torch.float16) for x in seg.params):
        return False
    return not any(is_wrapped(t) for t in [*seg.params, *(seg.exp_avg or []), *seg.exp_avg_sq, *seg.s])


@dataclass
class _Span:
    """Elements stepped chunk by chunk: 1-D params and gradients (None in a layout: given each
    step), the state tensors (1-D views, or int8 tensors), ``s`` and ``p0`` 1-D (``p0`` 0-dim where
    compact), and its ``chunks`` (``_chunked``)."""

    x: Tensor
    g: Tensor | None
    m: Tensor | None
    v: Tensor
    s: Tensor
    p0: Tensor
    chunks: list[_Chunk] = field(default_factory=list)


@dataclass(eq=False)
class _Chunk:
    """Elements [lo, hi) of a span, [s_lo, s_hi) of its ``s``: ``state`` its m, v, s as ``_formats``
    reads them (tensor, key, lo, hi; m None without it); ``rows`` which of them are bfloat16 of the
    chunk's length (a float32 step loads and rounds them together, ``_load_chunk``), ``slices``
    their 1-D views there."""

    lo: int
    hi: int
    s_lo: int
    s_hi: int
    state: list[tuple[Tensor | None, str, int, int]]
    rows: list[int]
    slices: list[Tensor]


def _chunked(span: _Span, slice_p: int) -> _Span:
    """``span`` with its chunks (``CHUNK`` elements on CPU, else ``CHUNK_ACCELERATOR``), each
    starting at a multiple of ``slice_p`` and of the int8 block, so that its ``s`` is
    ``s[s_lo:s_hi]`` and its blocks are whole."""
    n, unit = span.x.numel(), _formats.BLOCK * slice_p
    width = max(unit, (CHUNK if span.x.device.type == "cpu" else CHUNK_ACCELERATOR) // unit * unit)
    for lo in range(0, n, width):
        hi = min(lo + width, n)
        s_lo, s_hi = lo // slice_p, -(-hi // slice_p)
        state = [(span.m, "exp_avg", lo, hi), (span.v, "exp_avg_sq", lo, hi), (span.s, "s", s_lo, s_hi)]
        rows = [j for j, (t, _, a, b) in enumerate(state) if t is not None and _row(t) and b - a == hi - lo]
        slices = [cast(Tensor, state[j][0]).view(-1)[state[j][2] : state[j][3]] for j in rows]
        span.chunks.append(_Chunk(lo, hi, s_lo, s_hi, state, rows, slices))
    return span


def _row(t: Tensor) -> bool:
    return t.dtype == torch.bfloat16 and t.is_contiguous()


@dataclass(eq=False)
class _Bucket:
    """Small contiguous params (``index``) stepped as one chunk: ``state`` their span, whose ``x``
    and ``g`` are the layout's scratch their values are gathered into (the params' dtype, for
    the statistics; float32, for both passes), and whose ``m``, ``v``, ``s``, ``p0`` are their
    state laid back to back (``p0_parts``: the p0 to gather where they are not); ``x32`` the
    scratch the update gathers the params into; ``*_views`` views of them shaped as the params."""

    index: list[int]
    state: _Span
    p0_parts: list[Tensor] | None
    x32: Tensor
    x16_views: list[Tensor]
    x32_views: list[Tensor]
    g32_views: list[Tensor]


@dataclass(frozen=True)
class Layout:
    """A segment's params as stepped: ``buckets`` of small ones (their state laid back to back),
    ``direct`` ones in chunks of their flat views (``views``, ``_Span.g`` None), ``whole`` ones
    (not contiguous, or a factored ``v``); ``step`` the state step of ``torch._fused_adamw_``."""

    buckets: list[_Bucket]
    direct: list[int]
    views: list[_Span]
    whole: list[int]
    step: Tensor


def layout(seg: Segment) -> Layout:
    slice_p, xs, ms, vs, ss, p0s = seg.hparams.slice_p, seg.params, seg.exp_avg, seg.exp_avg_sq, seg.s, seg.p0
    small, direct, whole = [], [], []
    for i, x in enumerate(xs):
        v = vs[i]
        if not x.is_contiguous() or (not _formats.is_int8(v) and v.shape != x.shape):
            whole.append(i)
        elif x.numel() < SMALL and slice_p == 1 and not any(_formats.is_int8(t) for t in (v, *(ms or [v])[i : i + 1])):
            small.append(i)
        else:
            direct.append(i)
    runs = []
    for run in _runs(xs, small):
        if not any(xs[i].numel() for i in run):
            continue  # (params with no elements: nothing to step)
        spans = _laid_flat(seg, run) if len(run) > 1 else None
        if spans is None:
            direct += run
        else:
            runs.append((run, spans))
    direct.sort()
    views = [
        _chunked(
            _Span(xs[i].view(-1), None, None if ms is None else _flat(ms[i]), _flat(vs[i]), ss[i], p0s[i].reshape(-1)),
            slice_p,
        )
        for i in direct
    ]
    step = torch.full((), _adamw.HUGE_STEP, dtype=torch.float32, device=xs[0].device) if xs else torch.ones(())
    if not runs:
        return Layout([], direct, views, whole, step)
    width, x0 = max(sum(xs[i].numel() for i in run) for run, _ in runs), xs[runs[0][0][0]]
    x16 = torch.empty(width, dtype=x0.dtype, device=x0.device)
    x32, g32 = (torch.empty(width, dtype=compute_dtype(x0.dtype), device=x0.device) for _ in range(2))
    return Layout([_bucket(seg, run, spans, x16, x32, g32) for run, spans in runs], direct, views, whole, step)


def _runs(xs: Ts, small: list[int]) -> list[list[int]]:
    """``small`` in runs of at most a chunk's elements."""
    runs: list[list[int]] = []
    total = 0
    for i in small:
        n = xs[i].numel()
        if not runs or total + n > (CHUNK if xs[i].device.type == "cpu" else CHUNK_ACCELERATOR):
            runs.append([])
            total = 0
        runs[-1].append(i)
        total += n
    return runs


def _laid_flat(seg: Segment, idx: list[int]) -> dict[str, Tensor] | None:
    """The 1-D spans of the m, v, s of params ``idx`` (``s`` empty where theirs are), or None where
    they do not lie back to back (state the plan did not lay out: ``_partial``)."""
    spans = {}
    for key, ts in (("m", seg.exp_avg), ("v", seg.exp_avg_sq), ("s", seg.s)):
        if ts is not None:
            sub = [ts[i] for i in idx]
            empty = key == "s" and not any(t.numel() for t in sub)
            span = seg.params[idx[0]].new_empty(0) if empty else flat_span(sub)
            if span is None:
                return None
            spans[key] = span
    return spans


def _bucket(seg: Segment, idx: list[int], spans: dict[str, Tensor], x16: Tensor, x32: Tensor, g32: Tensor) -> _Bucket:
    """The bucket of params ``idx``, their state ``spans``, on the shared scratch."""
    params = [seg.params[i] for i in idx]
    n = sum(x.numel() for x in params)
    s = spans["s"]
    p0_parts = [p0_full(seg.p0[i], seg.s[i].numel()) for i in idx]
    p0 = flat_span(p0_parts) if s.numel() else s
    state = _chunked(_Span(x16[:n], g32[:n], spans.get("m"), spans["v"], s, p0 if p0 is not None else s), 1)
    x16_views, x32_views, g32_views = (views(t[:n], params) for t in (x16, x32, g32))
    return _Bucket(idx, state, None if p0 is not None else p0_parts, x32[:n], x16_views, x32_views, g32_views)


def _flat(t: Tensor) -> Tensor:
    return t if _formats.is_int8(t) else t.view(-1)


def gradients(seg: Segment, lay: Any, grads: Ts) -> list[Tensor]:
    """The effective gradients in the params' dtype (each chunk is raised to float32 as it is read)."""
    return _single.effective_grads(seg.params, grads, seg.params, seg.hparams, foreach=False)


def statistics(seg: Segment, lay: Any, grads: Ts, sc: StepScalars) -> tuple[Tensor, Tensor]:
    """The contract's statistics, chunk by chunk (reads only: ``s`` is decoded into scratch)."""
    lay = lay if lay is not None else layout(seg)
    p, dots, norms = seg.hparams.slice_p, list[Tensor](), list[Tensor]()
    for b in lay.buckets:  # (each in turn: the next one reuses the scratch)
        torch._foreach_copy_(b.x16_views, [seg.params[i] for i in b.index])
        torch._foreach_copy_(b.g32_views, [grads[i] for i in b.index])
        _span_statistics(
            b.state if b.p0_parts is None else replace(b.state, p0=torch.cat(b.p0_parts)), sc, p, dots, norms
        )
    for i, span in zip(lay.direct, lay.views):
        _span_statistics(replace(span, g=grads[i].view(-1)), sc, p, dots, norms)
    for i in lay.whole:  # (flat copies where not contiguous: read only)
        x, g, p0 = seg.params[i].reshape(-1), grads[i].reshape(-1), seg.p0[i].reshape(-1)
        _span_statistics(_chunked(_Span(x, g, None, seg.exp_avg_sq[i], seg.s[i], p0), p), sc, p, dots, norms)
    if len(dots) == 1:
        return dots[0], norms[0]
    if not dots:  # (params with no elements)
        zero = seg.params[0].new_zeros((), dtype=compute_dtype(seg.params[0].dtype))
        return zero, zero
    return torch.stack(dots).sum(), torch.stack(norms).sum()


def _span_statistics(span: _Span, sc: StepScalars, slice_p: int, dots: list[Tensor], norms: list[Tensor]) -> None:
    """The ops of ``_single.statistics_of`` on each chunk of ``span`` (its g raised to the compute
    dtype; the new ``s`` in its decoded copy), appended to ``dots`` and ``norms``."""
    dtype, g, own = compute_dtype(span.x.dtype), cast(Tensor, span.g), span.s.dtype != compute_dtype(span.x.dtype)
    compact_p0 = span.p0.numel() == 1 and span.s.numel() != 1
    for c in span.chunks:
        s = _decode(span.s, "s", c.s_lo, c.s_hi, dtype)
        x, gc = span.x[c.lo : c.hi : slice_p], g[c.lo : c.hi : slice_p].to(dtype)
        dots.append(torch.dot(gc, torch.sub(span.p0 if compact_p0 else span.p0[c.s_lo : c.s_hi], x).to(dtype)))
        s_new = _single._op("mul", s, sc.beta3, out=s if own else None)
        norms.append(_single._l1(_single._axpy(s_new, gc, sc.s_scale, out=s_new), out=s_new))


def update(seg: Segment, lay: Any, grads: Ts, sc: StepScalars, out: SegmentResult | None) -> SegmentResult:
    """In place (not ``PURE``): m, v, s and x, chunk by chunk."""
    return _update(seg, lay, grads, sc, moments=True, params=True)


def _update(seg: Segment, lay: Any, grads: Ts, sc: StepScalars, *, moments: bool, params: bool) -> SegmentResult:
    lay = lay if lay is not None else layout(seg)
    hp = seg.hparams
    sr = hp.stochastic_rounding and params
    adam = _adam_kwargs(sc, seg, lay) if moments and params else None
    for i, span in zip(lay.direct, lay.views):
        _step_span(replace(span, g=grads[i].view(-1)), sc, hp.slice_p, moments=moments, params=params, sr=sr, adam=adam)
    for b in lay.buckets:
        xs = [seg.params[i] for i in b.index]
        torch._foreach_copy_(b.x32_views, xs)
        torch._foreach_copy_(b.g32_views, [grads[i] for i in b.index])
        _step_chunk(b.state, b.state.chunks[0], b.x32, cast(Tensor, b.state.g), sc, hp.slice_p, moments, params, adam)
        if params:
            _round_x(b.x32, xs[0].dtype, sr)
            torch._foreach_copy_(xs, b.x32_views)
    for i in lay.whole:
        _step_whole(seg, i, grads[i], sc, moments=moments, params=params, sr=sr)
    ms = None if seg.exp_avg is None else list(seg.exp_avg)
    return SegmentResult(list(seg.params), ms, list(seg.exp_avg_sq), list(seg.s))


def _step_span(
    span: _Span, sc: StepScalars, slice_p: int, *, moments: bool, params: bool, sr: bool, adam: dict | None
) -> None:
    """The update of one param's span, chunk by chunk: float copies of its x (16-bit params) and g
    (where ``adam`` scales it, or 16-bit), ``_step_chunk``, x written back."""
    dtype, g = compute_dtype(span.x.dtype), cast(Tensor, span.g)
    for c in span.chunks:
        xc, gc = span.x[c.lo : c.hi], g[c.lo : c.hi]
        x = xc if xc.dtype == dtype else _work(xc, dtype, "x")
        gc = gc if gc.dtype == dtype and adam is None else _work(gc, dtype, "g")
        _step_chunk(span, c, x, gc, sc, slice_p, moments, params, adam)
        if params and x is not xc:
            xc.copy_(_round_x(x, xc.dtype, sr))


def _step_chunk(
    span: _Span, c: _Chunk, x: Tensor, g: Tensor, sc: StepScalars, slice_p: int, moments: bool, params: bool,
    adam: dict | None,
) -> None:  # fmt: skip
    """Chunk ``c`` of ``span`` stepped in ``x`` from ``g`` (float; scratch where ``adam``: scaled
    there): m, v, s loaded (``_load_chunk``), the specification's ops (``_single``'s, or
    ``_adam_chunk``'s), m, v, s stored with ``moments`` (``_store_chunk``)."""
    update_s = moments and sc.beta3 is not None and span.s.numel() > 0
    loaded = _load_chunk(c, update_s, x.dtype, x.device)
    m, v, s = loaded.values
    v = cast(Tensor, v)
    if adam is not None:
        m = _adam_chunk(x, g, m, v, s, sc, slice_p, adam)
    else:
        ms = None if m is None else [m]
        if moments:
            ss = [s if s is not None else span.s]
            _single.update_moments([g], ms, [v], ss, sc=sc, slice_p=slice_p, out=SegmentResult([x], ms, [v], ss))
        if params:
            _single.update_params([x], [g], ms, [v], sc=sc, out=SegmentResult([x], None, [], []))
    if moments:  # (after the params: storing overwrites the float m, v, s)
        _store_chunk(c, loaded, _shared_noise(span, c.hi - c.lo, update_s))


@dataclass
class _Loaded:
    """A chunk's m, v, s in the compute dtype (None: absent or not stepped); ``rows`` a (k, n)
    scratch whose rows are those of ``joint`` (indices into them and ``_Chunk.rows``), or None."""

    values: list[Tensor | None]
    rows: Tensor | None
    joint: list[int]


def _load_chunk(c: _Chunk, update_s: bool, dtype: torch.dtype, device: torch.device) -> _Loaded:
    """The float m, v and (``update_s``) s of chunk ``c``: the bfloat16 ones of its length as rows
    of one scratch where two or more are and ``dtype`` is float32 (``_store_chunk`` rounds them with
    one pair of ops), the others decoded one by one."""
    n = c.hi - c.lo
    joint = c.rows if update_s or 2 not in c.rows else c.rows[:-1]
    joint = joint if len(joint) > 1 and dtype == torch.float32 else []
    rows = None
    if joint:
        buf = _scratch.buffer(len(joint) * n, dtype, device, ("compact", "rows"))
        rows = (torch.empty(len(joint) * n, dtype=dtype, device=device) if buf is None else buf).view(len(joint), n)
    values: list[Tensor | None] = [None, None, None]
    for j, (t, key, lo, hi) in enumerate(c.state if update_s else c.state[:2]):
        if t is None:
            continue
        if j in joint:
            values[j] = cast(Tensor, rows)[joint.index(j)].copy_(c.slices[c.rows.index(j)])
        else:
            values[j] = _decode(t, key, lo, hi, dtype)
    return _Loaded(values, rows, joint)


def _store_chunk(c: _Chunk, loaded: _Loaded, noise: Tensor | None) -> None:
    """Write chunk ``c``'s new m, v, s (``loaded``, stepped in place) into their state: the rows
    rounded at once, the others encoded one by one (``noise`` shared)."""
    if loaded.rows is not None:
        _robust.round_bits_(loaded.rows, noise)
        torch._foreach_copy_([c.slices[c.rows.index(j)] for j in loaded.joint], list(loaded.rows.unbind(0)))
    for j, value in enumerate(loaded.values):
        t, key, lo, hi = c.state[j]
        if t is not None and value is not None and j not in loaded.joint:
            _formats.encode(t, key, lo, hi, value, noise)


def _round_x(x: Tensor, dtype: torch.dtype, sr: bool) -> Tensor:
    """Float params ``x`` to be copied into params of ``dtype``: rounded stochastically in place
    where ``sr`` and bfloat16 (the copy is then exact), else as they are (it rounds to nearest)."""
    if sr and dtype == torch.bfloat16 and x.dtype == torch.float32:
        return _robust.round_bits_(x, _noise(x.numel(), x.device, "x"))
    return x


def _adam_kwargs(sc: StepScalars, seg: Segment, lay: Layout) -> dict[str, Any] | None:
    """The keywords of ``torch._fused_adamw_`` that make it this step's m, v, x update (as
    ``_adamw``: lr = dlr, eps = d_new * eps, Adam's bias corrections 1, the gradient times d_old;
    betas[0] == 0: m a zeroed scratch, lr = dlr * d_new / d_old), or None where it does not apply:
    D on the device (its scalars are tensors: the kernel takes floats), a skip folded into them."""
    if sc.ok is not None or isinstance(sc.d_new, Tensor) or lay.step.device.type not in ("cpu", "cuda"):
        return None
    return {**_adamw.unscaled_kwargs(sc, seg.exp_avg is not None), "state_steps": [lay.step]}


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
        x0.copy_(_round_x(x, x0.dtype, sr).view(x0.shape))


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
