"""State formats: how ``exp_avg`` (m), ``exp_avg_sq`` (v) and ``s`` are stored, and their codecs.

``state_precision`` (``Hyperparams``) names a format; ``resolve`` gives it for a param's dtype:

- ``"float32"``: m, v, s in float32 (float64 for float64 params), written as computed;
- ``"bfloat16"``: m, v, s in bfloat16, written with unbiased stochastic rounding (``_robust``);
- ``"int8"``: m and v blockwise-quantized (``Int8Codec``: one byte per element and a float32 scale
  per ``BLOCK`` elements, in one uint8 tensor: the codes, then the scales), ``s`` as in "bfloat16";
  a param under ``INT8_MIN`` elements keeps bfloat16 m and v (the cost of a scale is not worth it);
- ``"auto"`` (default): "float32" for float32/float64 params, "bfloat16" for 16-bit params (no
  more state than prodigyopt's, which keeps it in the param dtype; evidence: benchmarks/NOTES.md).

``p0`` keeps the param's dtype in every format (exact for 16-bit params; a 0-dim zero for params
that start at zero). A format is read from a tensor's dtype (``is_compact``), so a state holds
what it was made with until ``convert`` changes it (a checkpoint loaded under another format).
The kernels of ``_compact`` work on chunks: ``decode`` a chunk to float32, compute, ``encode`` it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _robust

__all__ = ["BLOCK", "INT8_MIN", "Int8Codec", "convert", "decode", "encode", "int8_nbytes", "is_compact", "is_int8"]
__all__ += ["resolve", "storage_dtype", "zeros"]

BLOCK = 256  # elements per int8 block, each with one float32 scale (as bitsandbytes and torchao)
INT8_MIN = 4096  # params with fewer elements keep bfloat16 m and v under "int8" (bitsandbytes' min_8bit_size)
MOMENTS = ("exp_avg", "exp_avg_sq")


def resolve(param_dtype: torch.dtype, precision: str) -> str:
    """The format of a param's state: ``precision`` with "auto" resolved for ``param_dtype``."""
    if precision != "auto":
        return precision
    return "bfloat16" if param_dtype in (torch.float16, torch.bfloat16) else "float32"


def storage_dtype(param_dtype: torch.dtype, precision: str, key: str, numel: int) -> torch.dtype:
    """Dtype of state ``key`` (exp_avg, exp_avg_sq, s) of a param: uint8 for int8 blocks."""
    fmt = resolve(param_dtype, precision)
    if fmt == "float32":
        return torch.float64 if param_dtype == torch.float64 else torch.float32
    if fmt == "int8" and key in MOMENTS and numel >= INT8_MIN:
        return torch.uint8
    return torch.bfloat16


def zeros(x: Tensor, key: str, precision: str) -> Tensor:
    """A zero state ``key`` for param ``x`` (all of it; ``s`` is made by the caller): like ``x`` in
    memory format, or an int8 tensor (``int8_nbytes`` bytes; zero codes and scales are zeros)."""
    dtype = storage_dtype(x.dtype, precision, key, x.numel())
    if dtype == torch.uint8:
        return torch.zeros(int8_nbytes(x.numel()), dtype=torch.uint8, device=x.device)
    return torch.zeros_like(x, dtype=dtype, memory_format=torch.preserve_format)


def is_int8(t: Tensor) -> bool:
    return t.dtype == torch.uint8


def is_compact(t: Tensor) -> bool:
    """Whether state ``t`` is in a compact format: bfloat16 (written with stochastic rounding when
    the compact kernels run) or int8 blocks."""
    return t.dtype in (torch.bfloat16, torch.uint8)


def int8_nbytes(n: int) -> int:
    """Bytes of the int8 form of ``n`` elements: the codes padded to whole blocks, then a float32
    scale per block."""
    blocks = -(-n // BLOCK)
    return blocks * (BLOCK + 4)


def _int8_parts(t: Tensor) -> tuple[Tensor, Tensor]:
    """(codes (blocks, BLOCK) uint8, scales (blocks,) float32) of an int8 state tensor (views)."""
    blocks = t.numel() // (BLOCK + 4)
    codes = t[: blocks * BLOCK].view(blocks, BLOCK)
    return codes, t[blocks * BLOCK :].view(torch.float32)


class Int8Codec:
    """A code map of 256 levels for one moment, applied per block of ``BLOCK`` elements with the
    block's scale (its largest magnitude in the map's domain), rounding stochastically (``sr``:
    a neighbouring level with the probability that keeps the mean) or to the nearest level.

    Signed (m): code = sign * level, levels 1..127 ``2^((level - 127) / per_octave)`` of the scale
    (``log``) or ``level / 127`` (linear), level 0 the zero. Unsigned (v): the levels hold sqrt(v),
    where Adam's denominator needs relative precision: 256 log levels, none of them zero (a value
    below the lowest reads as the lowest: v over-estimated, the safe side), or ``level / 255``."""

    def __init__(self, *, signed: bool, log: bool, per_octave: float, sr: bool) -> None:
        self.signed, self.log, self.per_octave, self.sr = signed, log, per_octave, sr
        self.top = 127 if signed else 255

    def level_value(self, level: Tensor) -> Tensor:
        """The magnitude, relative to the scale, of (float) integer levels."""
        if not self.log:
            return level / self.top
        value = torch.exp2((level - self.top) / self.per_octave)
        return torch.where(level > 0, value, 0.0) if self.signed else value

    def decode(self, codes: Tensor, scales: Tensor) -> Tensor:
        """(blocks, BLOCK) uint8 codes, (blocks,) scales -> float32 values shaped as ``codes``."""
        if self.signed:
            c = codes.view(torch.int8).float()
            return self.level_value(c.abs()).copysign_(c).mul_(scales[:, None])
        return self.level_value(codes.float()).mul_(scales[:, None]).square_()

    def encode(self, values: Tensor, codes: Tensor, scales: Tensor) -> None:
        """Write (blocks, BLOCK) float32 ``values`` into ``codes`` and ``scales`` (in place)."""
        mag = values.abs() if self.signed else values.clamp(min=0).sqrt_()
        scale = mag.amax(dim=1)
        scales.copy_(scale)
        rel = mag.div_(scale.clamp(min=torch.finfo(torch.float32).tiny)[:, None])  # in [0, 1]
        pos = torch.log2(rel).mul_(self.per_octave).add_(self.top) if self.log else rel * self.top
        # the fractional position between two levels, in the value domain; a value on a level (up
        # to float rounding: 1e-4 of a step) stays there, so that decode -> encode is exact
        low = pos.add_(1e-4).floor_().clamp_(0, self.top - 1)
        lo_v = self.level_value(low)
        frac = (rel - lo_v).div_(self.level_value(low + 1).sub_(lo_v))
        if self.sr:
            up = torch.rand_like(frac).add_(1e-4).lt_(frac)
        else:
            up = frac.gt_(0.5)
        level = low.add_(up)
        if self.signed:
            codes.view(torch.int8).copy_(level.copysign_(values))
        else:
            codes.copy_(level)


M_CODEC = Int8Codec(signed=True, log=True, per_octave=8.0, sr=True)
V_CODEC = Int8Codec(signed=False, log=True, per_octave=16.0, sr=True)


def _codec(key: str) -> Int8Codec:
    return M_CODEC if key == "exp_avg" else V_CODEC


def decode(
    t: Tensor, key: str, lo: int, hi: int, dtype: torch.dtype = torch.float32, out: Tensor | None = None
) -> Tensor:
    """Elements [lo, hi) of state ``t`` (contiguous; logical order) in ``dtype``: a view where ``t``
    holds ``dtype`` (in place updates reach ``t``), else a new tensor (or ``out``, a buffer of
    ``hi - lo`` elements of ``dtype``, for bfloat16 state); ``lo`` a multiple of ``BLOCK`` for int8 state."""
    if is_int8(t):
        b0, b1 = lo // BLOCK, -(-hi // BLOCK)
        codes, scales = _int8_parts(t)
        return _codec(key).decode(codes[b0:b1], scales[b0:b1]).view(-1)[: hi - lo].to(dtype)
    flat = t.view(-1)[lo:hi]
    if flat.dtype == dtype:
        return flat
    return flat.to(dtype) if out is None else out.copy_(flat)


def encode(t: Tensor, key: str, lo: int, hi: int, values: Tensor, noise: Tensor | None = None) -> None:
    """Store float ``values`` as elements [lo, hi) of state ``t``: int8 codes (a block is whole
    unless it ends the tensor), bfloat16 stochastically rounded (with ``noise``, ``_robust.
    rounding_noise`` of at least ``hi - lo`` elements, if given; float32 ``values`` are scratch
    then: overwritten), float copied (a no-op for the view ``decode`` gave)."""
    if is_int8(t):
        b0, b1 = lo // BLOCK, -(-hi // BLOCK)
        codes, scales = _int8_parts(t)
        full = values
        if values.numel() != (b1 - b0) * BLOCK:  # the tensor's last block: padded with zeros
            full = values.new_zeros((b1 - b0) * BLOCK)
            full[: values.numel()] = values
        _codec(key).encode(full.view(-1, BLOCK), codes[b0:b1], scales[b0:b1])
        return
    flat = t.view(-1)[lo:hi]
    if flat.data_ptr() == values.data_ptr() and flat.dtype == values.dtype:
        return
    if flat.dtype == torch.bfloat16:  # (float64 values: to float32 first, 2^-24 relative, then unbiased)
        values = _robust.round_bits_(values.to(torch.float32), noise)
    flat.copy_(values)


def convert(t: Tensor, key: str, x: Tensor, precision: str, chunk: int = 1 << 20) -> Tensor:
    """State ``t`` (exp_avg, exp_avg_sq or s of param ``x``, any format) in the format of
    ``precision``, chunk by chunk (no float32 copy of the whole); ``t`` itself if it is so already.
    A factored ``v`` (row and column means, not param-shaped) is kept as ``s`` is (never int8)."""
    param_shaped = key in MOMENTS and (is_int8(t) or t.shape == x.shape)
    numel = x.numel() if param_shaped else t.numel()
    want = storage_dtype(x.dtype, precision, key if param_shaped else "s", numel)
    if t.dtype == want:
        return t
    if param_shaped:
        out = zeros(x, key, precision)
        src = t if is_int8(t) else t.contiguous()
    else:
        out, src = torch.zeros(t.shape, dtype=want, device=t.device), t.contiguous()
    flat_out = out if is_int8(out) else out.view(-1)  # (a param-shaped ``out`` is contiguous here)
    if not is_int8(out) and not out.is_contiguous():
        flat_out = torch.zeros(numel, dtype=want, device=t.device)
    step = max(BLOCK, chunk // BLOCK * BLOCK)
    for lo in range(0, numel, step):
        hi = min(lo + step, numel)
        encode(flat_out, key, lo, hi, decode(src, key, lo, hi).clone())
    if flat_out is not out:
        out.copy_(flat_out.view(out.shape))
    return out
