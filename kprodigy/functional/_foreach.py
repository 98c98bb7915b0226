"""Multi-tensor kernels: the per-tensor sequence of ``_single.py`` with ``torch._foreach_*`` ops.

Callers pass lists that share one device and dtype (see ``_step.py``). Scalars that depend on D
are 0-dim tensors (the ``Tensor`` overloads of the foreach ops), never Python numbers read from
the device. Not usable under ``torch.func.vmap`` (no batching rules for foreach ops).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._scalars import Coefficients
from ._single import _l1, _up, _up_dtype

__all__ = ["accumulate", "apply"]

Scalar = float | Tensor
TensorList = list[Tensor]


def accumulate(
    xs: Sequence[Tensor],
    gs: Sequence[Tensor],
    exp_avgs: Sequence[Tensor] | None,
    exp_avg_sqs: Sequence[Tensor],
    ss: Sequence[Tensor],
    p0s: Sequence[Tensor],
    *,
    betas: tuple[float, float],
    beta3: Scalar,
    d: Tensor,
    c: Coefficients,
    slice_p: int,
    update_d: bool,
    inplace: bool,
    decay: tuple[Scalar, Scalar] | None = None,
) -> tuple[TensorList | None, TensorList, TensorList, Tensor, Tensor]:
    """Same contract as ``_single.accumulate``."""
    b1, b2 = betas
    k1, k2 = betas if decay is None else decay
    dg = torch._foreach_mul(list(gs), d)
    new_m = None
    if exp_avgs is not None:
        new_m = _mul(exp_avgs, k1, inplace)
        torch._foreach_add_(new_m, dg, alpha=1 - b1)
    new_v = _mul(exp_avg_sqs, k2, inplace)
    torch._foreach_addcmul_(new_v, dg, dg, value=1 - b2)
    del dg
    zero = torch.zeros_like(d)
    if not update_d or not xs:
        return new_m, new_v, list(ss), zero, zero
    g_sliced = [g.flatten()[::slice_p] for g in gs]
    diffs = torch._foreach_sub(list(p0s), [x.flatten()[::slice_p] for x in xs])
    dots = _sum_of_dots(g_sliced, diffs)
    del diffs
    new_s = _mul(ss, beta3, inplace)
    if d.device.type == "cpu":  # foreach ops are per-tensor loops on CPU: the passes of _single
        for s, g in zip(new_s, g_sliced):
            s.addcmul_(g, c.s_scale)  # s + g * s_scale, no temporary
        norms = [_l1(s) for s in new_s]
    else:  # one fused launch per op on CUDA (addcmul with a 0-dim operand would loop per tensor)
        scaled = torch._foreach_mul(g_sliced, c.s_scale)
        torch._foreach_add_(new_s, scaled)
        del scaled
        norms = list(torch._foreach_norm(new_s, 1, dtype=_up_dtype(new_s[0].dtype)))
    numerator = c.numerator_scale * dots.to(d.dtype)
    return new_m, new_v, new_s, numerator, torch.stack(norms).sum().to(d.dtype)


_DOT_CAT_MAX = 1 << 16  # tensors below this size join one concatenated dot product


def _sum_of_dots(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """sum_i <a_i, b_i> (flattened, accumulated in at least fp32); a 0-dim tensor.

    Small tensors are concatenated into one dot product (no per-tensor Python work); large ones
    take one ``torch.dot`` each (no concatenation copy). A 0-dim ``b_i`` (zero p0) broadcasts.
    """
    small = [i for i, t in enumerate(a) if t.numel() < _DOT_CAT_MAX]
    large = [i for i, t in enumerate(a) if t.numel() >= _DOT_CAT_MAX]
    parts: list[Tensor] = []
    if small:
        ca = torch.cat([a[i].reshape(-1) for i in small])
        cb = torch.cat([b[i].reshape(-1).expand(a[i].numel()) for i in small])
        parts.append(torch.dot(_up(ca), _up(cb)))
    parts.extend(torch.dot(_up(a[i].reshape(-1)), _up(b[i].reshape(-1).expand(a[i].numel()))) for i in large)
    return torch.stack(parts).sum()


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
) -> TensorList:
    """Same contract as ``_single.apply``."""
    if not xs:
        return []
    den = torch._foreach_sqrt(list(exp_avg_sqs))
    torch._foreach_add_(den, d_new * eps)  # sqrt(v) + d_new * eps
    torch._foreach_div_(den, -dlr)  # den / (-dlr): the step below is one addcdiv
    direction = list(exp_avgs) if exp_avgs is not None else torch._foreach_mul(list(gs), d_new)
    out = list(xs)
    if keep is not None:
        out = _mul(out, keep, inplace)
    elif not inplace:
        out = [x.clone() for x in out]
    torch._foreach_addcdiv_(out, direction, den)
    return out


def _mul(ts: Sequence[Tensor], a: Scalar, inplace: bool) -> TensorList:
    """a * ts, in place or into new tensors."""
    ts = list(ts)
    if inplace:
        torch._foreach_mul_(ts, a)
        return ts
    return list(torch._foreach_mul(ts, a))
