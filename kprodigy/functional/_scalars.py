"""Scalar math of the step, written once on 0-dim tensors and used by every backend.

Nothing here reads a tensor's value on the host: the D update is branch-free
(``torch.where``/``torch.maximum``), so the step never synchronises with the device.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from ._hyperparams import Hyperparams
from ._state import DState

__all__ = [
    "HostCoefficients",
    "StepScalars",
    "host_coefficients",
    "in_dtype",
    "reduce_d",
    "reduce_d_host",
    "step_scalars",
]


Scalar = float | Tensor


@dataclass(frozen=True)
class StepScalars:
    """Every scalar of one segment's step: 0-dim tensors in the statistics dtype, or a Python
    float where a hyperparameter is used as it is. ``step_scalars`` builds it from the D state
    before the step (the statistics pass reads the first three fields); ``finish`` adds D after
    the update and folds the non-finite skip in, for the update pass. A skipped step's record
    makes the update write exactly what it read: decays 1, weights 0, step size 0."""

    numerator_scale: Tensor  # (d/d0) * dlr: weight of <g[::p], p0 - x[::p]> in d_numerator
    s_scale: Tensor  # (d/d0) * (d if safeguard_warmup else dlr): weight of g[::p] in s; 0 where s is kept
    beta3: Scalar | None  # decay of s; 1 where s is kept; None: this step leaves s and D alone
    dlr: Tensor  # d * lr * bias_correction: the step size; 0 on a skipped step
    weight: Tensor  # d before the update: m gets (1 - b1) * weight * g, v (1 - b2) * (weight * g)^2; 0 if skipped
    betas: tuple[float, float]  # (b1, b2), for the EMA weights 1 - b1 and 1 - b2 (0-dim tensors when compiled)
    decays: tuple[Scalar, Scalar]  # multipliers of m and v: the betas; 1 on a skipped step
    keep: Tensor | None  # 1 - weight_decay * dlr with decoupled weight decay (1 if skipped), else None
    eps: float
    d_new: Tensor | None = None  # D after the update (``finish``): the direction d_new * g when b1 == 0
    eps_d: Tensor | None = None  # d_new * eps: the floor of the denominator (``finish``)
    ok: Tensor | None = None  # the skip decision folded in (0-dim bool; ``finish``); None: no skip. A kernel
    # that multiplies g by the folded zeros zeroes g's non-finite entries first (0 * NaN is NaN)

    def finish(self, d_new: Tensor | None, ok: Tensor | None) -> StepScalars:
        """The record of the update pass: ``d_new`` the D after this step's update (None: for
        an update of m, v and s only), ``ok`` the skip decision (None: skip_nonfinite off)."""
        done = replace(self, d_new=d_new, eps_d=None if d_new is None else d_new * self.eps)
        if ok is None:
            return done
        one = torch.ones_like(self.dlr)
        return replace(
            done,
            ok=ok,
            s_scale=torch.where(ok, self.s_scale, 0.0),
            beta3=None if self.beta3 is None else torch.where(ok, self.beta3, one),
            dlr=torch.where(ok, self.dlr, 0.0),
            weight=torch.where(ok, self.weight, 0.0),
            decays=(torch.where(ok, self.decays[0], one), torch.where(ok, self.decays[1], one)),
            keep=None if self.keep is None else torch.where(ok, self.keep, one),
        )


def bias_correction(hp: Hyperparams, k: Tensor, dtype: torch.dtype) -> Tensor | float:
    """sqrt(1 - beta2^(k+1)) / (1 - beta1^(k+1)) if enabled, else 1. ``k`` is the 0-dim step count."""
    if not hp.use_bias_correction:
        return 1.0
    b1, b2 = hp.betas
    # 1 - b^(k+1) = -expm1((k+1) log b), in float64 where the device has it: in float32,
    # 1 - 0.999 loses ~1e-5 relative (log(0) = -inf gives exactly 1 for b = 0)
    work = dtype if k.device.type == "mps" else torch.float64
    k1 = (k + 1).to(work)
    one_minus = [-torch.expm1(k1 * (math.log(b) if b > 0 else -math.inf)) for b in (b1, b2)]
    return (torch.sqrt(one_minus[1]) / one_minus[0]).to(dtype)


def step_scalars(hp: Hyperparams, ds: DState, *, update_d: bool | Tensor, beta3: float) -> StepScalars:
    """The step's scalars for one group, from the D state *before* this step's D update.

    update_d: whether this step updates D; a 0-dim bool tensor (decided on the device) is blended
    in: where it is False, beta3 is 1 and s_scale 0, so that s is written unchanged.
    beta3:    the D-group's (``beta3_value`` of its first group, which a frozen group may be)."""
    b1, b2 = hp.betas
    d = ds.d
    dlr, numerator_scale, s_scale = _step_scalars(hp, d, bias_correction(hp, ds.k, d.dtype))
    s_beta3: Scalar | None = None if update_d is False else beta3
    if isinstance(update_d, Tensor):
        s_beta3 = torch.where(update_d, torch.full_like(d, beta3), 1.0)  # beta3 in the stats dtype
        s_scale = torch.where(update_d, s_scale, 0.0)
    return StepScalars(
        numerator_scale=numerator_scale,
        s_scale=s_scale,
        beta3=s_beta3,
        dlr=dlr,
        weight=d,
        betas=(b1, b2),
        decays=(b1, b2),
        keep=1 - hp.weight_decay * dlr if hp.weight_decay > 0 and hp.decouple else None,
        eps=hp.eps,
    )


@dataclass(frozen=True)
class HostCoefficients:
    """``StepScalars``' dlr, numerator_scale and s_scale for the native path: Python floats (float64), computed on the host."""

    dlr: float
    numerator_scale: float
    s_scale: float


def host_coefficients(hp: Hyperparams, d: float, k: int) -> HostCoefficients:
    """``HostCoefficients`` from a D and step count held on the host, in float64."""
    bc = 1.0
    if hp.use_bias_correction:  # ``bias_correction``'s formula on Python floats (float64, as it computes)
        one_minus = [-math.expm1((k + 1) * (math.log(b) if b > 0 else -math.inf)) for b in hp.betas]
        bc = math.sqrt(one_minus[1]) / one_minus[0]
    return HostCoefficients(*_step_scalars(hp, d, bc))


def _step_scalars(hp: Hyperparams, d: Any, bc: Any) -> tuple[Any, Any, Any]:
    """(dlr, numerator_scale, s_scale) from D before the update and the bias correction: the one
    statement of these formulas, for 0-dim tensors and for Python floats alike."""
    dlr = d * (hp.lr * bc)
    d_ratio = d / hp.d0
    return dlr, d_ratio * dlr, d_ratio * (d if hp.safeguard_warmup else dlr)


def reduce_d(
    ds: DState,
    numerator_delta: Tensor,
    denom: Tensor,
    hp: Hyperparams,
    *,
    update_d: bool | Tensor,
) -> DState:
    """New D state from this step's summed statistics.

    numerator_delta: sum over tensors of (d/d0) * dlr * <g, p0 - x> (already all-reduced if sharded)
    denom:           sum over tensors of ||s||_1 after this step's s update
    update_d:        whether this step updates D (k % d_update_freq == 0); a bool or 0-dim bool tensor

    D moves only when ``update_d`` and ``denom > 0``; d never decreases. k always advances.
    """
    if update_d is False:
        return ds.replace(k=ds.k + 1)
    d_numerator, positive, d_hat, d, d_max = _d_rule(
        hp, ds.d, ds.d_max, ds.d_numerator, numerator_delta, denom, torch.where, torch.maximum, torch.minimum
    )
    moves = positive if update_d is True else positive & update_d
    new = DState(
        d=torch.where(moves, d, ds.d),
        d_max=torch.where(moves, d_max, ds.d_max),
        d_numerator=d_numerator,
        d_denom=denom,
        d_hat=torch.where(moves, d_hat, ds.d_hat),
        k=ds.k + 1,
        skipped_steps=ds.skipped_steps,
    )
    if isinstance(update_d, Tensor):
        return new.replace(
            d_numerator=torch.where(update_d, d_numerator, ds.d_numerator),
            d_denom=torch.where(update_d, denom, ds.d_denom),
        )
    return new


def reduce_d_host(
    d: float, d_max: float, d_hat: float, d_numerator: float, numerator_delta: float, denom: float, hp: Hyperparams
) -> tuple[float, float, float, float, float]:
    """``reduce_d`` (with ``update_d`` True) on Python floats (float64), for a D held on the host.

    Returns the new (d, d_max, d_numerator, d_denom, d_hat). The inputs are finite (the caller
    skips a step whose statistics are not)."""
    d_numerator, positive, new_hat, new_d, new_max = _d_rule(
        hp, d, d_max, d_numerator, numerator_delta, denom, _where, max, min
    )
    if not positive:  # D is left alone
        return d, d_max, d_numerator, denom, d_hat
    return new_d, new_max, d_numerator, denom, new_hat


def _where(cond: Any, a: Any, b: Any) -> Any:
    return a if cond else b


def _d_rule(
    hp: Hyperparams,
    d: Any,
    d_max: Any,
    d_numerator: Any,
    numerator_delta: Any,
    denom: Any,
    where: Callable[..., Any],
    maximum: Callable[..., Any],
    minimum: Callable[..., Any],
) -> tuple[Any, Any, Any, Any, Any]:
    """The D update, stated once for 0-dim tensors (``torch.where``/``maximum``/``minimum``) and
    Python floats (a conditional, ``max``, ``min``). Returns (d_numerator, denom > 0, d_hat, d,
    d_max), the last three valid where ``denom > 0``; d never decreases."""
    d_numerator = hp.beta3_value * d_numerator + numerator_delta
    positive = denom > 0
    d_hat = hp.d_coef * d_numerator / where(positive, denom, 1.0)
    new_d = where(d == hp.d0, maximum(d, d_hat), d)
    new_max = maximum(d_max, d_hat)
    return d_numerator, positive, d_hat, minimum(new_max, new_d * hp.growth_rate), new_max


def in_dtype(values: Sequence[float], dtype: torch.dtype) -> list[float]:
    """Python floats rounded to ``dtype`` (float32 or float64): the values a 0-dim tensor of that
    dtype would hold, without one."""
    if dtype == torch.float64:
        return list(values)
    fmt = f"{len(values)}f"
    try:
        return list(struct.unpack(fmt, struct.pack(fmt, *values)))
    except OverflowError:  # beyond float32's range: inf, as the tensor would hold
        return torch.tensor(list(values), dtype=dtype).tolist()
