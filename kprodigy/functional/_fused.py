"""Fused kernels: the per-tensor reference (``_single.py``) compiled with ``torch.compile``.

There is no second statement of the math: ``accumulate``/``apply`` here call
``_single.accumulate``/``_single.apply`` on 1-D tensors inside ``torch.compile(fullgraph=True,
dynamic=True)``, so Inductor fuses each pass into one loop (C++/OpenMP on CPU, Triton on GPU)
with the two D statistics reduced in the same pass and no parameter-sized temporaries.

Layout, per call (one device and dtype, as ``_step._by_dtype`` guarantees):

- large tensors (``numel >= FLAT_MAX``) run the compiled kernel on a flat view of each tensor,
  in place (no copies): cost ~ the 13-words floor;
- small tensors are packed into flat buffers (``torch.cat``), stepped by one kernel call per
  pass, and written back (``torch._foreach_copy_``): a few multi-tensor copies instead of one
  compiled call (about 30 us of Python guards each) per tensor.

Shapes are dynamic (one graph serves every length), and D, lr, betas, ``s_scale``... are 0-dim
tensors or unspecialized floats, so changing them does not recompile. Graph-shaping options
(``slice_p``, whether exp_avg exists, whether D is updated, decoupled decay, ``inplace``) and
dtypes select among a handful of graphs, each compiled once.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import _robust, _single
from ._scalars import Coefficients

__all__ = ["FLAT_MAX", "accumulate", "apply", "available"]

FLAT_MAX = 1 << 16  # tensors with fewer elements are packed into flat buffers
TensorList = list[Tensor]


def _zero_nonfinite(g: Tensor) -> Tensor:
    """``_robust.sanitize`` for the compiled loop: the same values (non-finite entries 0, the
    rest unchanged), written as one compare and select. Inductor's C++ ``nan_to_num`` tests NaN
    lane by lane (not vectorized), which made the accumulate pass ~50% slower on CPU
    (benchmarks/NOTES.md, change 5)."""
    return torch.where(torch.abs(g) < math.inf, g, 0.0)


def _accumulate_1d(
    x: Tensor,
    g: Tensor,
    m: Tensor | None,
    v: Tensor,
    s: Tensor,
    p0: Tensor,
    betas: tuple[Tensor, Tensor],
    beta3: Tensor,
    d: Tensor,
    c: Coefficients,
    slice_p: int,
    update_d: bool,
    decay: tuple[Tensor, Tensor] | None = None,
    sanitize: bool = False,
) -> tuple[Tensor, Tensor]:
    """``_single.accumulate`` on one flat tensor, in place; returns (numerator_delta, denom).

    sanitize: replace non-finite gradient entries by 0 inside the loop (the non-finite skip).

    betas, beta3: 0-dim tensors (the reference's scalar arguments accept them when compiled).
    """
    if sanitize:
        g = _zero_nonfinite(g)
    _, _, _, num, den = _single.accumulate(
        [x],
        [g],
        None if m is None else [m],
        [v],
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
    )
    return num, den


def _apply_1d(
    x: Tensor,
    g: Tensor,
    m: Tensor | None,
    v: Tensor,
    dlr: Tensor,
    d_old: Tensor,
    d_new: Tensor,
    eps: float,
    keep: Tensor | None,
    sanitize: bool = False,
) -> None:
    """``_single.apply`` on one flat tensor, in place (``sanitize`` as in ``_accumulate_1d``)."""
    if sanitize:
        g = _zero_nonfinite(g)
    _single.apply(
        [x],
        [g],
        None if m is None else [m],
        [v],
        dlr=dlr,
        d_old=d_old,
        d_new=d_new,
        eps=eps,
        keep=keep,
        inplace=True,
    )


# Graphs per kernel: dtype x exp_avg present x update_d x slice_p x decoupled decay x packed or
# not; more than dynamo's default of 8 per function, so the limit is raised (once, globally).
_RECOMPILE_LIMIT = 64


@functools.cache
def _compiled(name: str) -> Callable[..., Any]:
    fn: Callable[..., Any] = _accumulate_1d if name == "accumulate" else _apply_1d
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, _RECOMPILE_LIMIT)
    return torch.compile(fn, fullgraph=True, dynamic=True)


_STATUS: dict[str, bool] = {}


def available(device: torch.device) -> bool:
    """Whether ``torch.compile`` works here (probed once per device type on a tiny kernel).

    On failure (no C++ compiler, no Triton...) warns once, in one line, and returns False; the
    caller then uses the foreach path.
    """
    key = device.type
    if key not in _STATUS:
        try:
            probe = torch.compile(lambda t: t * 2 + 1, fullgraph=True)
            probe(torch.ones(3, device=device))
            _STATUS[key] = True
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: fall back
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            warnings.warn(
                f"kprodigy: fused step unavailable on {key} ({type(exc).__name__}: {first}); using foreach",
                RuntimeWarning,
                stacklevel=3,
            )
            _STATUS[key] = False
    return _STATUS[key]


def _flat(t: Tensor) -> Tensor:
    return t.view(-1)


def _partition(xs: Sequence[Tensor], slice_p: int) -> tuple[list[int], list[int], list[int]]:
    """(packed, direct, eager) indices: small tensors go to flat buffers (slice_p == 1 only),
    other contiguous tensors run the kernel on a flat view, non-contiguous ones run eagerly."""
    packed, direct, eager = [], [], []
    for i, x in enumerate(xs):
        if not x.is_contiguous():
            eager.append(i)
        elif x.numel() < FLAT_MAX and slice_p == 1:
            packed.append(i)
        else:
            direct.append(i)
    return packed, direct, eager


def _cat(ts: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _p0_full(p0: Tensor, n: int) -> Tensor:
    """p0 as a flat tensor of ``n`` elements (a 0-dim zero p0 is broadcast)."""
    return p0.reshape(-1).expand(n) if p0.numel() == 1 and n != 1 else p0.reshape(-1)


def _pick(ts: Sequence[Tensor] | None, idx: list[int]) -> list[Tensor] | None:
    return None if ts is None else [ts[i] for i in idx]


def _write_back(dst: Sequence[Tensor], idx: list[int], flat: Tensor) -> None:
    """Copy the packed buffer ``flat`` back into ``dst[i]`` for i in idx (one multi-tensor copy)."""
    parts = torch.split(flat, [dst[i].numel() for i in idx])
    torch._foreach_copy_([dst[i] for i in idx], [p.view(dst[i].shape) for p, i in zip(parts, idx)])


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
) -> tuple[TensorList | None, TensorList, TensorList, Tensor, Tensor]:
    """Same contract as ``_single.accumulate``; ``sanitize`` zeroes non-finite gradient entries
    inside the compiled loop (the non-finite skip) instead of in a copy beforehand."""
    if not inplace:  # the pure step: copies, then the same in-place kernels
        exp_avgs = None if exp_avgs is None else [t.clone() for t in exp_avgs]
        exp_avg_sqs = [t.clone() for t in exp_avg_sqs]
        ss = [t.clone() for t in ss] if update_d else list(ss)
    kernel = _compiled("accumulate")
    # betas and beta3 as 0-dim tensors: a Python float used as ``alpha``/``value`` is a constant
    # of the graph, and a scheduler changing betas would recompile.
    b1, b2, b3 = (torch.as_tensor(b, dtype=d.dtype, device=d.device) for b in (*betas, beta3))
    kw: dict[str, Any] = dict(betas=(b1, b2), beta3=b3, d=d, c=c, slice_p=slice_p, update_d=update_d, decay=decay)
    if sanitize:  # the eager remainder below gets sanitised copies
        gs = list(gs)
        for i in _partition(xs, slice_p)[2]:
            gs[i] = _robust.sanitize([gs[i]])[0]
    nums: list[Tensor] = []
    dens: list[Tensor] = []
    packed, direct, eager = _partition(xs, slice_p)
    for i in direct:
        m = None if exp_avgs is None else _flat(exp_avgs[i])
        num, den = kernel(
            _flat(xs[i]), _flat(gs[i]), m, _flat(exp_avg_sqs[i]), ss[i], p0s[i].reshape(-1), sanitize=sanitize, **kw
        )
        nums.append(num)
        dens.append(den)
    if packed:
        ms = _pick(exp_avgs, packed)
        m_flat = None if ms is None else _cat(ms)
        v_flat, s_flat = _cat([exp_avg_sqs[i] for i in packed]), _cat([ss[i] for i in packed])
        p0_flat = _cat([_p0_full(p0s[i], ss[i].numel()) for i in packed])
        x_flat, g_flat = _cat([xs[i] for i in packed]), _cat([gs[i] for i in packed])
        num, den = kernel(x_flat, g_flat, m_flat, v_flat, s_flat, p0_flat, sanitize=sanitize, **kw)
        nums.append(num)
        dens.append(den)
        _write_back(exp_avg_sqs, packed, v_flat)
        if exp_avgs is not None and m_flat is not None:
            _write_back(exp_avgs, packed, m_flat)
        if update_d:
            _write_back(ss, packed, s_flat)
    if eager:
        _, _, _, num, den = _single.accumulate(
            [xs[i] for i in eager],
            [gs[i] for i in eager],
            _pick(exp_avgs, eager),
            [exp_avg_sqs[i] for i in eager],
            [ss[i] for i in eager],
            [p0s[i] for i in eager],
            inplace=True,
            **{**kw, "betas": betas, "beta3": beta3},
        )
        nums.append(num)
        dens.append(den)
    m_out = None if exp_avgs is None else list(exp_avgs)
    if not update_d or not nums:
        zero = torch.zeros_like(d)
        return m_out, list(exp_avg_sqs), list(ss), zero, zero
    return m_out, list(exp_avg_sqs), list(ss), torch.stack(nums).sum(), torch.stack(dens).sum()


def apply(
    xs: Sequence[Tensor],
    gs: Sequence[Tensor],
    exp_avgs: Sequence[Tensor] | None,
    exp_avg_sqs: Sequence[Tensor],
    *,
    dlr: Tensor,
    d_old: Tensor,
    d_new: Tensor,
    eps: float,
    keep: Tensor | None,
    inplace: bool,
    sanitize: bool = False,
) -> TensorList:
    """Same contract as ``_single.apply`` (``sanitize`` as in ``accumulate``)."""
    out = list(xs) if inplace else [x.clone() for x in xs]
    kernel = _compiled("apply")
    kw: dict[str, Any] = dict(dlr=dlr, d_old=d_old, d_new=d_new, eps=eps, keep=keep)
    packed, direct, eager = _partition(xs, 1)
    if sanitize:
        gs = list(gs)
        for i in eager:
            gs[i] = _robust.sanitize([gs[i]])[0]
    for i in direct:
        m = None if exp_avgs is None else _flat(exp_avgs[i])
        kernel(_flat(out[i]), _flat(gs[i]), m, _flat(exp_avg_sqs[i]), sanitize=sanitize, **kw)
    if packed:
        ms = _pick(exp_avgs, packed)
        x_flat = _cat([out[i] for i in packed])
        kernel(
            x_flat,
            _cat([gs[i] for i in packed]),
            None if ms is None else _cat(ms),
            _cat([exp_avg_sqs[i] for i in packed]),
            sanitize=sanitize,
            **kw,
        )
        _write_back(out, packed, x_flat)
    if eager:
        _single.apply(
            [out[i] for i in eager],
            [gs[i] for i in eager],
            _pick(exp_avgs, eager),
            [exp_avg_sqs[i] for i in eager],
            inplace=True,
            **kw,
        )
    return out
