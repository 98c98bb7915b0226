"""Robustness pieces of the step, on the device: the non-finite skip, low-precision param writes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._state import is_wrapped

__all__ = ["extremes", "round_bits_", "rounding_noise", "sanitize", "stochastic_round", "write_back", "zero_nonfinite"]


def extremes(tensors: Sequence[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """0-dim tensors in ``dtype``, all finite iff every element of every tensor is: one read by a
    reduction that propagates NaN and cannot overflow, ``torch.aminmax`` per tensor on CPU (20-30x
    faster there than the inf-norm: benchmarks/NOTES.md), else ``torch._foreach_norm(ord=inf)``
    (one fused kernel on CUDA)."""
    ts = [t for t in tensors if t.numel() > 0]
    if not ts:
        return []
    if ts[0].device.type != "cpu" and not is_wrapped(ts[0]):
        return [e.to(dtype) for e in torch._foreach_norm(ts, float("inf"))]
    return [e.to(dtype) for t in ts for e in torch.aminmax(t)]


def sanitize(tensors: Sequence[Tensor]) -> list[Tensor]:
    """``zero_nonfinite`` of each tensor."""
    return [zero_nonfinite(t) for t in tensors]


def zero_nonfinite(t: Tensor, out: Tensor | None = None) -> Tensor:
    """``nan_to_num(t, 0, 0, 0)`` (into ``out``): ``t`` where finite; on a skipped step the zeroed
    coefficients then give exact zeros (``0 * NaN`` is NaN). As cheap as a copy."""
    return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0, out=out)


def stochastic_round(x: Tensor, dtype: torch.dtype, noise: Tensor | None = None) -> Tensor:
    """float32 ``x`` rounded to bfloat16 stochastically, unbiased (else a cast): 16 random low bits
    added to the float32 pattern, then truncated; inf and NaN stay. ``noise``: those bits for x's
    last dimension (``rounding_noise``; read, not written; one draw serves every row), else drawn
    here for every element."""
    if dtype != torch.bfloat16 or x.dtype != torch.float32:
        return x.to(dtype)
    return _rounded(x, noise, into_x=False).to(dtype)


def round_bits_(x: Tensor, noise: Tensor | None = None) -> Tensor:
    """float32 ``x`` rounded in place to the bfloat16 values ``stochastic_round`` gives, still
    float32 (their cast, by ``copy_``, is then exact): two passes fewer, no temporaries. ``noise``
    as there, for the last dimension (one draw serves every row of a (k, n) ``x``)."""
    return _rounded(x, noise, into_x=True)


def _rounded(x: Tensor, noise: Tensor | None, *, into_x: bool) -> Tensor:
    """float32 ``x`` with random low bits added and cleared (bfloat16 values, still float32): in
    ``x`` itself (``into_x``), else in the draw or a new tensor."""
    bits = x.view(torch.int32)
    if noise is None:
        drawn = rounding_noise(bits.numel(), bits.device).view_as(bits)
        total = bits.add_(drawn) if into_x else drawn.add_(bits)
    else:
        total = torch.add(bits, noise[: bits.shape[-1]], out=bits if into_x else None)
    return total.bitwise_and_(-65536).view(torch.float32)


FEW_BITS = 1 << 12  # elements under which ``rounding_noise`` draws per element, in one op


def rounding_noise(n: int, device: torch.device, out: Tensor | None = None) -> Tensor:
    """(n,) int32 uniform in [0, 2^16) (into ``out``, an int32 buffer of n): the random low bits of
    ``stochastic_round``, four per 64 random bits on CPU and CUDA (``random_`` over int64's full
    range, cut into 16-bit lanes: on CPU 2x faster than ``random_`` per int32 element, which
    ``randint_like`` is 1.7x slower than). One draw may serve the m, v and s of the same elements in one step
    (``_compact``): each rounding stays unbiased; a third of the draws."""
    out = torch.empty(n, dtype=torch.int32, device=device) if out is None else out
    # per element where the full-range draw is not known to exist, and inside torch.compile (torch
    # 2.7's FX printed aten.random.from, a keyword: a SyntaxError)
    if device.type not in ("cpu", "cuda") or torch.compiler.is_compiling():
        return out.random_().bitwise_and_(0xFFFF)
    if n < FEW_BITS:  # one op: fewer ops beat fewer draws (769 elements on CPU: 3.0 against 9.2 us)
        return out.random_(0, 1 << 16)
    wide = torch.empty(-(-n // 4), dtype=torch.int64, device=device).random_(-(2**63), None)
    return out.copy_(wide.view(torch.int16)[:n]).bitwise_and_(0xFFFF)


def write_back(xs: Sequence[Tensor], new: Sequence[Tensor], *, out: Sequence[Tensor] | None, sr: bool) -> list[Tensor]:
    """New params in the originals' dtype (rounded stochastically when ``sr``), written into ``out``
    if given; tensors the kernel updated in place pass through."""
    result = []
    for i, (x, y) in enumerate(zip(xs, new)):
        if y is x:
            result.append(x)
            continue
        y = stochastic_round(y, x.dtype) if sr else y.to(x.dtype)
        result.append(y if out is None else out[i].copy_(y))
    return result
