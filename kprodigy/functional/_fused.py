"""Fused kernels: the per-tensor reference (``_single.py``) compiled with ``torch.compile``.

There is no second statement of the math: the kernels here call ``_single.accumulate`` and
``_single.apply`` on 1-D tensors inside ``torch.compile(fullgraph=True, dynamic=True)`` (C++/OpenMP
on CPU, Triton on GPU), in two passes that Inductor compiles to one loop each, with no
parameter-sized temporaries (benchmarks/NOTES.md, changes 5 and 9):

- ``accumulate``: the D statistics only (``_single.accumulate(write=False)``: reads g, p0, x, s;
  writes nothing);
- ``apply``, once D is updated: the new m, v, s (``_single.accumulate(stats=False)``) and x
  (``_single.apply``) in the same loop; with a skip decision ``ok``, the old values are kept by a
  select. 13 words per element in all.

Layout, per call (one device and dtype, as ``_step._by_dtype`` guarantees):

- large tensors (``numel >= FLAT_MAX``) run the compiled kernel on a flat view of each tensor,
  in place (no copies), when the param, its gradient and its state are all contiguous;
- small contiguous tensors are stepped together by one kernel call per pass: their state is used
  in place where it lies back to back in one buffer (``pack``/``flat_span``: the optimizer keeps
  it so), else gathered and written back; their params and gradients are gathered once per step
  (``gather``: reused CPU buffers), and the params written back after the apply pass;
- any other layout (a non-contiguous param, or a large one with a transposed gradient or state
  left in another memory format) runs the eager per-tensor kernels, which take any strides.

Shapes are dynamic (one graph serves every length), and D, lr, betas, ``s_scale``... are 0-dim
tensors or unspecialized floats, so changing them does not recompile. Graph-shaping options
(``slice_p``, whether exp_avg exists, whether D is updated, decoupled decay, ``inplace``) and
dtypes select among a handful of graphs, each compiled once.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import _robust, _scratch, _single
from ._scalars import Coefficients

__all__ = [
    "FLAT_MAX",
    "Gathered",
    "accumulate",
    "apply",
    "available",
    "compiled_whole",
    "flat_span",
    "gather",
    "moment_args",
    "pack",
    "unpacked_grads",
]

FLAT_MAX = 1 << 16  # tensors with fewer elements are packed into flat buffers
TensorList = list[Tensor]


def _accumulate_1d(
    x: Tensor,
    g: Tensor,
    m: Tensor | None,
    v: Tensor | None,
    s: Tensor,
    p0: Tensor,
    betas: tuple[Tensor, Tensor],
    beta3: Tensor,
    d: Tensor,
    c: Coefficients,
    slice_p: int,
    update_d: bool,
    decay: tuple[Tensor, Tensor] | None = None,
    write: bool = True,
) -> tuple[Tensor, Tensor]:
    """``_single.accumulate`` on one flat tensor, in place; returns (numerator_delta, denom).

    write: False computes the statistics only (m, v, s untouched; ``m``/``v`` may be None): the
    first pass of the fused step, whose second pass is ``_update_1d``.

    betas, beta3: 0-dim tensors (the reference's scalar arguments accept them when compiled).
    """
    _, _, _, num, den = _single.accumulate(
        [x],
        [g],
        None if m is None else [m],
        [] if v is None else [v],
        [s],
        [p0],
        betas=betas,  # type: ignore[arg-type]
        beta3=beta3,
        d=d,
        c=c,
        slice_p=slice_p,
        update_d=update_d,
        inplace=True,
        decay=decay,
        write=write,
    )
    return num, den


def _update_1d(
    x: Tensor,
    g: Tensor,
    m: Tensor | None,
    v: Tensor,
    s: Tensor,
    betas: tuple[Tensor, Tensor],
    beta3: Tensor,
    d: Tensor,
    c: Coefficients,
    slice_p: int,
    update_d: bool,
    dlr: Tensor,
    d_new: Tensor,
    eps: float,
    keep: Tensor | None,
    decay: tuple[Tensor, Tensor] | None = None,
    ok: Tensor | None = None,
) -> None:
    """The second pass of the fused step on one flat tensor, in place: the new m, v, s
    (``_single.accumulate`` without its statistics), then ``_single.apply``. With the statistics
    pass (``_accumulate_1d(write=False)``) before it, nothing is written before D is known, and
    each pass is one loop: 4 + 9 = 13 words per element (benchmarks/NOTES.md, change 9).

    ok: the non-finite skip's decision (0-dim bool): every tensor keeps its old value where it
    is False (a select in the loop, so NaN never reaches the state), else the new one.
    """
    olds = [x, v, s] + ([] if m is None else [m])
    # with a skip decision, the same in-place ops on copies (values of the compiled loop, not
    # memory), then a select; the in-place ops lower to the same code as without the skip
    news = olds if ok is None else [t.clone() for t in olds]
    new_x, new_v, new_s = news[:3]
    new_m = None if m is None else [news[3]]
    _single.accumulate(
        [new_x],
        [g],
        new_m,
        [new_v],
        [new_s],
        [],
        betas=betas,  # type: ignore[arg-type]
        beta3=beta3,
        d=d,
        c=c,
        slice_p=slice_p,
        update_d=update_d,
        inplace=True,
        decay=decay,
        stats=False,
    )
    _single.apply([new_x], [g], new_m, [new_v], dlr=dlr, d_new=d_new, eps=eps, keep=keep, inplace=True)
    if ok is not None:
        for old, new in zip(olds, news):
            old.copy_(torch.where(ok, new, old))


# Graphs per kernel: dtype x exp_avg present x update_d x slice_p x decoupled decay x packed or
# not; more than dynamo's default of 8 per function, so the limit is raised during our calls only
# (the process's setting is left as it is).
_RECOMPILE_LIMIT = 64


@functools.cache
def _compiled(name: str) -> Callable[..., Any]:
    kernels: dict[str, Callable[..., Any]] = {"statistics": _accumulate_1d, "update": _update_1d}
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


def compiled_whole(
    xs: Sequence[Tensor],
    gs: Sequence[Tensor],
    exp_avgs: Sequence[Tensor] | None,
    exp_avg_sqs: Sequence[Tensor],
    ss: Sequence[Tensor],
    slice_p: int,
) -> bool:
    """Whether every tensor takes the compiled kernels (none runs eagerly, see ``_partition``):
    then ``accumulate`` writes nothing and the skip may be decided in ``apply``."""
    return not _partition(xs, slice_p, (gs, exp_avgs, exp_avg_sqs, ss))[2]


def _cat(ts: Sequence[Tensor]) -> Tensor:
    """The tensors flattened and concatenated (a new buffer)."""
    return torch._C._nn.flatten_dense_tensors(list(ts))


def _cat_scratch(ts: Sequence[Tensor], slot: str) -> Tensor:
    """``_cat`` into a buffer reused by later steps on CPU (``_scratch``), keyed by ``slot`` and
    the first tensor, so that two gathers alive at once never share one."""
    first = ts[0]
    buf = _scratch.buffer(sum(t.numel() for t in ts), first.dtype, first.device, (slot, id(first)))
    return _cat(ts) if buf is None else torch.cat([t.reshape(-1) for t in ts], out=buf)


@dataclass(frozen=True)
class Gathered:
    """Flat copies of a segment's small params and gradients (``packed``: their indices), made
    once per step and shared by the non-finite check and both passes. The apply pass updates
    ``x`` and writes it back; nothing may change the params between the passes."""

    packed: list[int]
    x: Tensor
    g: Tensor


def gather(xs: Sequence[Tensor], gs: Sequence[Tensor], slice_p: int) -> Gathered | None:
    """The ``Gathered`` of one segment (one dtype, one device), or None if no tensor is packed."""
    packed = _partition(xs, slice_p)[0]
    return _gather_packed(xs, gs, packed) if packed else None


def _gather_packed(xs: Sequence[Tensor], gs: Sequence[Tensor], packed: list[int]) -> Gathered:
    return Gathered(packed, _cat_scratch([xs[i] for i in packed], "x"), _cat_scratch([gs[i] for i in packed], "g"))


def unpacked_grads(gs: Sequence[Tensor], gathered: Gathered | None) -> list[Tensor]:
    """The gradients as the non-finite check reads them: the packed ones as one flat tensor."""
    if gathered is None:
        return list(gs)
    skip = set(gathered.packed)
    return [gathered.g] + [g for i, g in enumerate(gs) if i not in skip]


def flat_span(ts: Sequence[Tensor]) -> Tensor | None:
    """The 1-D tensor whose consecutive slices are ``ts``, when they lie back to back in one
    buffer (as ``pack`` leaves them), else None. Reads pointers only: no copy, no sync."""
    if not ts:
        return None
    first = ts[0]
    dtype, ptr, size = first.dtype, first.data_ptr(), first.element_size()
    total = 0
    for t in ts:
        if t.dtype != dtype or t.data_ptr() != ptr + total * size or not t.is_contiguous():
            return None
        total += t.numel()
    if (first.storage_offset() + total) * size > first.untyped_storage().nbytes():
        return None  # adjacent addresses, but not one buffer
    return first.as_strided((total,), (1,))


def pack(ts: Sequence[Tensor]) -> list[Tensor]:
    """Copies of ``ts`` (same shapes, dtype, device), laid back to back in one new flat buffer.

    The optimizer keeps the state of small params this way: the fused kernels then step all of
    them in one call on the buffer itself, with no gathering copies (``flat_span``).
    """
    return list(torch._C._nn.unflatten_dense_tensors(_cat(ts), list(ts)))


def _gather(ts: Sequence[Tensor]) -> tuple[Tensor, bool]:
    """(flat tensor of ``ts``, whether it is a copy that must be written back)."""
    span = flat_span(ts)
    return (span, False) if span is not None else (_cat(ts), True)


def _p0_full(p0: Tensor, n: int) -> Tensor:
    """p0 as a flat tensor of ``n`` elements (a 0-dim zero p0 is broadcast)."""
    if p0.dim() == 1:
        return p0
    return p0.reshape(-1).expand(n) if p0.numel() == 1 and n != 1 else p0.reshape(-1)


def _pick(ts: Sequence[Tensor] | None, idx: list[int]) -> list[Tensor] | None:
    return None if ts is None else [ts[i] for i in idx]


def _write_back(dst: Sequence[Tensor], idx: list[int], flat: Tensor) -> None:
    """Copy the packed buffer ``flat`` back into ``dst[i]`` for i in idx (one multi-tensor copy)."""
    targets = [dst[i] for i in idx]
    torch._foreach_copy_(targets, torch._C._nn.unflatten_dense_tensors(flat, targets))


def accumulate(
    xs: Sequence[Tensor],
    gs: Sequence[Tensor],
    exp_avgs: Sequence[Tensor] | None,
    exp_avg_sqs: Sequence[Tensor],
    ss: Sequence[Tensor],
    p0s: Sequence[Tensor],
    *,
    betas: tuple[float, float],
    beta3: float | Tensor,
    d: Tensor,
    c: Coefficients,
    slice_p: int,
    update_d: bool,
    inplace: bool,
    decay: tuple[Tensor, Tensor] | None = None,
    sanitize: bool = False,
    gathered: Gathered | None = None,
) -> tuple[TensorList | None, TensorList, TensorList, Tensor, Tensor]:
    """Same contract as ``_single.accumulate``, except that the compiled kernels compute only the
    statistics here and leave m, v, s to ``apply`` (which then needs ``moments``: see
    ``moment_args``); non-contiguous tensors take the eager kernels, which write them now.
    ``sanitize``: the eager kernels get gradients with non-finite entries zeroed (the compiled
    statistics need none: a skipped step's statistics are discarded); ``gathered``: this step's
    ``gather(xs, gs, slice_p)``, made here if None."""
    if not inplace:  # the pure step: copies, updated in place by this pass and ``apply``
        exp_avgs = None if exp_avgs is None else [t.clone() for t in exp_avgs]
        exp_avg_sqs = [t.clone() for t in exp_avg_sqs]
        ss = [t.clone() for t in ss] if update_d else list(ss)
    kernel = _compiled("statistics")
    kw = moment_args(betas, beta3, d, c, slice_p, update_d, decay)
    packed, direct, eager = _partition(xs, slice_p, (gs, exp_avgs, exp_avg_sqs, ss))
    nums: list[Tensor] = []
    dens: list[Tensor] = []
    if update_d:  # no zeroing of non-finite g here: the statistics of a skipped step are discarded
        for i in direct:
            num, den = kernel(_flat(xs[i]), _flat(gs[i]), None, None, ss[i], p0s[i].reshape(-1), write=False, **kw)
            nums.append(num)
            dens.append(den)
        if packed:
            s_flat = _gather([ss[i] for i in packed])[0]  # read only here
            p0s_packed = [_p0_full(p0s[i], ss[i].numel()) for i in packed]
            p0_flat = flat_span(p0s_packed)
            if p0_flat is None:  # compact (0-dim) p0s are not packed: gathered into a reused buffer
                p0_flat = _cat_scratch(p0s_packed, "p0")
            reuse = gathered is not None and gathered.packed == packed
            flat = gathered if gathered is not None and reuse else _gather_packed(xs, gs, packed)
            num, den = kernel(flat.x, flat.g, None, None, s_flat, p0_flat, write=False, **kw)
            nums.append(num)
            dens.append(den)
    if eager:
        eager_gs = [gs[i] for i in eager]
        _, _, _, num, den = _single.accumulate(
            [xs[i] for i in eager],
            _robust.sanitize(eager_gs) if sanitize else eager_gs,
            _pick(exp_avgs, eager),
            [exp_avg_sqs[i] for i in eager],
            [ss[i] for i in eager],
            [p0s[i] for i in eager],
            inplace=True,
            betas=betas,
            beta3=beta3,
            d=d,
            c=c,
            slice_p=slice_p,
            update_d=update_d,
            decay=decay,
        )
        nums.append(num)
        dens.append(den)
    m_out = None if exp_avgs is None else list(exp_avgs)
    if not update_d or not nums:
        zero = torch.zeros_like(d)
        return m_out, list(exp_avg_sqs), list(ss), zero, zero
    return m_out, list(exp_avg_sqs), list(ss), torch.stack(nums).sum(), torch.stack(dens).sum()


def moment_args(
    betas: tuple[float, float],
    beta3: float | Tensor,
    d: Tensor,
    c: Coefficients,
    slice_p: int,
    update_d: bool,
    decay: tuple[Tensor, Tensor] | None = None,
) -> dict[str, Any]:
    """The compiled kernels' arguments for the moments (what ``accumulate`` was called with).

    betas and beta3 as 0-dim tensors: a Python float used as ``alpha``/``value`` is a constant of
    the graph, and a scheduler changing betas would recompile. Made by a fill on the device
    (``torch.full``), not a host-to-device copy: no sync, and allowed inside CUDA-graph capture.
    """
    b1, b2, b3 = (_device_scalar(b, d) for b in (*betas, beta3))
    return dict(betas=(b1, b2), beta3=b3, d=d, c=c, slice_p=slice_p, update_d=update_d, decay=decay)


def apply(
    xs: Sequence[Tensor],
    gs: Sequence[Tensor],
    exp_avgs: Sequence[Tensor] | None,
    exp_avg_sqs: Sequence[Tensor],
    ss: Sequence[Tensor],
    *,
    dlr: Tensor,
    d_new: Tensor,
    eps: float,
    keep: Tensor | None,
    inplace: bool,
    moments: dict[str, Any],
    sanitize: bool = False,
    gathered: Gathered | None = None,
    ok: Tensor | None = None,
) -> TensorList:
    """``_single.apply``, and for the tensors whose moments ``accumulate`` left (the compiled
    ones) first the new m, v, s, in place, in the same loop. ``moments``: ``moment_args`` of the
    ``accumulate`` call; ``ss``: the ``s`` list it returned. ``sanitize``, ``gathered`` as in
    ``accumulate`` (the gathered params must be unchanged since then; used only in place)."""
    out = list(xs) if inplace else [x.clone() for x in xs]
    kernel = _compiled("update")
    kw: dict[str, Any] = dict(dlr=dlr, d_new=d_new, eps=eps, keep=keep)
    packed, direct, eager = _partition(xs, moments["slice_p"], (gs, exp_avgs, exp_avg_sqs, ss))
    for i in direct:
        m = None if exp_avgs is None else _flat(exp_avgs[i])
        kernel(_flat(out[i]), _flat(gs[i]), m, _flat(exp_avg_sqs[i]), ss[i], ok=ok, **moments, **kw)
    if packed:
        m_flat, m_copied = (None, False) if exp_avgs is None else _gather([exp_avgs[i] for i in packed])
        v_flat, v_copied = _gather([exp_avg_sqs[i] for i in packed])
        s_flat, s_copied = _gather([ss[i] for i in packed])
        reuse = gathered is not None and inplace and gathered.packed == packed
        flat = gathered if gathered is not None and reuse else _gather_packed(out, gs, packed)
        kernel(flat.x, flat.g, m_flat, v_flat, s_flat, ok=ok, **moments, **kw)
        _write_back(out, packed, flat.x)
        if v_copied:
            _write_back(exp_avg_sqs, packed, v_flat)
        if exp_avgs is not None and m_flat is not None and m_copied:
            _write_back(exp_avgs, packed, m_flat)
        if moments["update_d"] and s_copied:
            _write_back(ss, packed, s_flat)
    if eager:  # their moments were written by ``accumulate``
        eager_gs = [gs[i] for i in eager]
        _single.apply(
            [out[i] for i in eager],
            _robust.sanitize(eager_gs) if sanitize else eager_gs,
            _pick(exp_avgs, eager),
            [exp_avg_sqs[i] for i in eager],
            inplace=True,
            **kw,
        )
    return out
