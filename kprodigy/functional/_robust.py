"""Robustness pieces of the step: the non-finite skip and low-precision parameter writes.

Everything here runs on the device without reading a value on the host: the skip decision is a
0-dim bool tensor ``ok`` and a skipped step is made a no-op by ``torch.where`` on the scalars
(``StepScalars.finish``: decays 1, gradient weight d and step size 0; D state kept) applied to
sanitized gradients (no NaN/inf, so that a zero weight gives an exact zero), or by a select in
the compiled kernels, never by a Python branch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["extremes", "sanitize", "stochastic_round", "write_back", "zero_nonfinite"]


def extremes(tensors: Sequence[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """0-dim tensors in ``dtype`` that are all finite iff every element of every tensor is.

    One read of each tensor, by a reduction that propagates NaN and cannot overflow:
    ``torch.aminmax`` per tensor on CPU (20-30x faster there than the inf-norm, see
    benchmarks/NOTES.md), elsewhere the max-norm ``torch._foreach_norm(ord=inf)`` (one fused
    kernel for all tensors on CUDA)."""
    ts = [t for t in tensors if t.numel() > 0]
    if not ts:
        return []
    if ts[0].device.type != "cpu" and not torch._C._functorch.is_functorch_wrapped_tensor(ts[0]):
        return [e.to(dtype) for e in torch._foreach_norm(ts, float("inf"))]
    return [e.to(dtype) for t in ts for e in torch.aminmax(t)]


def sanitize(tensors: Sequence[Tensor]) -> list[Tensor]:
    """``zero_nonfinite`` of each tensor."""
    return [zero_nonfinite(t) for t in tensors]


def zero_nonfinite(t: Tensor, out: Tensor | None = None) -> Tensor:
    """``nan_to_num(t, 0, 0, 0)`` (into ``out`` if given): equal to ``t`` when it is finite; on a
    skipped step the non-finite entries become 0, so that the zeroed coefficients give exact zeros
    (``0 * NaN`` would be NaN). As cheap as a copy, and independent of the skip decision."""
    return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0, out=out)


def stochastic_round(x: Tensor, dtype: torch.dtype) -> Tensor:
    """float32 ``x`` rounded to bfloat16 stochastically: up with probability equal to the dropped
    fraction (unbiased: E[round(x)] = x), using the global torch RNG. Other dtypes: plain cast.

    Adds 16 random low bits to the float32 bit pattern and truncates; inf and NaN stay inf and NaN.
    """
    if dtype != torch.bfloat16 or x.dtype != torch.float32:
        return x.to(dtype)
    bits = x.view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    return ((bits + noise) & -65536).view(torch.float32).to(dtype)


def write_back(originals: Sequence[Tensor], new: Sequence[Tensor], *, out: Sequence[Tensor] | None, sr: bool) -> list[Tensor]:
    """New params in the dtype of the originals (rounded stochastically when ``sr``), written into
    ``out`` (the originals, in place) if given. Tensors the kernel already updated in place pass through."""
    result = []
    for i, (x, y) in enumerate(zip(originals, new)):
        if y is x:
            result.append(x)
            continue
        y = stochastic_round(y, x.dtype) if sr else y.to(x.dtype)
        result.append(y if out is None else out[i].copy_(y))
    return result
