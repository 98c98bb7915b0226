"""Factored second moment (Adafactor-style row/column statistics), an explicit opt-in.

For a param ``x`` with two or more dimensions, seen as a matrix of ``rows = x.numel() // n`` by
``n = x.shape[-1]``, the second moment ``v`` (as many words as ``x``) is replaced by its row and
column means, packed in one 1-D tensor ``[r (rows), c (n)]``::

    r = b2 * r + mean_j((1 - b2) * d^2 * g_ij^2)     c = b2 * c + mean_i((1 - b2) * d^2 * g_ij^2)
    v_hat_ij = r_i * c_j / mean(r)                    (exact when v is rank one)

and the step uses ``v_hat`` where it would use ``v``. A param is factored exactly when its
``exp_avg_sq`` state has that packed shape (``init_factored_v``); other tensors keep a full ``v``.

The kernels run the per-tensor reference kernels of ``_single.py`` one tensor at a time: the
accumulate pass on a zero ``v`` gives this step's contribution ``(1 - b2) * d^2 * g^2``, whose row
and column means update ``r`` and ``c``; the apply pass gets ``v_hat``. So nothing of the step but
the factoring is stated here; the price is one param-sized temporary at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _single
from ._scalars import Coefficients

__all__ = ["accumulate", "apply", "init_factored_v", "is_factored"]


def init_factored_v(x: Tensor) -> Tensor:
    """Zero packed statistics ``[r, c]`` for param ``x`` (ndim >= 2): 1-D, rows + cols, x's dtype."""
    if x.dim() < 2:
        raise ValueError(f"a factored second moment needs a param with 2 or more dims, got shape {tuple(x.shape)}")
    cols = x.shape[-1]
    return torch.zeros(x.numel() // cols + cols, dtype=x.dtype, device=x.device)


def is_factored(xs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor]) -> bool:
    """Whether any of these params keeps a factored (packed, not param-shaped) second moment."""
    return any(v.shape != x.shape for x, v in zip(xs, exp_avg_sqs))


def _split(x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    cols = x.shape[-1]
    rows = x.numel() // cols
    if x.dim() < 2 or v.shape != (rows + cols,):
        raise ValueError(
            f"exp_avg_sq of shape {tuple(v.shape)} is neither like its param {tuple(x.shape)} nor the "
            f"factored statistics ({rows + cols},) of it"
        )
    return v[:rows], v[rows:]


def _v_hat(x: Tensor, v: Tensor) -> Tensor:
    """The full second moment a packed ``[r, c]`` stands for, shaped like ``x``."""
    if v.shape == x.shape:
        return v
    r, c = _split(x, v)
    scale = r.mean().clamp_min(torch.finfo(r.dtype).tiny)  # r == 0 (no gradient yet): v_hat = 0
    return (torch.outer(r, c) / scale).view(x.shape)


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
    decay: tuple[float | Tensor, float | Tensor] | None = None,
) -> tuple[list[Tensor] | None, list[Tensor], list[Tensor], Tensor, Tensor]:
    """Same contract as ``_single.accumulate``; factored entries of ``exp_avg_sqs`` are packed ``[r, c]``."""
    b2 = betas[1] if decay is None else decay[1]
    new_m: list[Tensor] | None = [] if exp_avgs is not None else None
    new_v: list[Tensor] = []
    new_s: list[Tensor] = []
    numerator = denom = torch.zeros_like(d)
    for i, x in enumerate(xs):
        v = exp_avg_sqs[i]
        factored = v.shape != x.shape
        v_in = torch.zeros_like(x) if factored else v  # zero v: the kernel returns this step's (1 - b2) d^2 g^2
        m, (v_out,), (s,), num, den = _single.accumulate(
            [x],
            [gs[i]],
            None if exp_avgs is None else [exp_avgs[i]],
            [v_in],
            [ss[i]],
            [p0s[i]],
            betas=betas,
            beta3=beta3,
            d=d,
            c=c,
            slice_p=slice_p,
            update_d=update_d,
            inplace=inplace,
            decay=decay,
        )
        if factored:
            r, col = _split(x, v)
            g2 = v_out.reshape(r.shape[0], col.shape[0])
            r = r.mul_(b2) if inplace else torch.mul(r, b2)
            col = col.mul_(b2) if inplace else torch.mul(col, b2)
            r = r.add_(g2.mean(1)) if inplace else torch.add(r, g2.mean(1))
            col = col.add_(g2.mean(0)) if inplace else torch.add(col, g2.mean(0))
            v_out = v if inplace else torch.cat([r, col])
        if new_m is not None and m is not None:
            new_m.extend(m)
        new_v.append(v_out)
        new_s.append(s)
        numerator, denom = numerator + num, denom + den
    return new_m, new_v, new_s, numerator, denom


def apply(
    xs: Sequence[Tensor],
    gs: Sequence[Tensor],
    exp_avgs: Sequence[Tensor] | None,
    exp_avg_sqs: Sequence[Tensor],
    *,
    dlr: Tensor,
    d_new: Tensor,
    eps: float,
    keep: Tensor | None,
    inplace: bool,
) -> list[Tensor]:
    """Same contract as ``_single.apply``, with ``v_hat`` for the factored entries."""
    out = []
    for i, x in enumerate(xs):
        (x_new,) = _single.apply(
            [x],
            [gs[i]],
            None if exp_avgs is None else [exp_avgs[i]],
            [_v_hat(x, exp_avg_sqs[i])],
            dlr=dlr,
            d_new=d_new,
            eps=eps,
            keep=keep,
            inplace=inplace,
        )
        out.append(x_new)
    return out
