"""Scalar math of the step, written once on 0-dim tensors and used by every backend.

Nothing here reads a tensor's value on the host: the D update is branch-free
(``torch.where``/``torch.maximum``), so the step never synchronises with the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._hyperparams import Hyperparams
from ._state import DState

__all__ = ["Coefficients", "coefficients", "reduce_d", "updates_d"]


@dataclass(frozen=True)
class Coefficients:
    """Per-group scalars of one step, 0-dim tensors in the statistics dtype."""

    dlr: Tensor  # d * lr * bias_correction: the step size of this step
    m_scale: Tensor  # d * (1 - beta1): weight of g in the exp_avg EMA
    v_scale: Tensor  # d^2 * (1 - beta2): weight of g^2 in the exp_avg_sq EMA
    numerator_scale: Tensor  # (d / d0) * dlr: weight of <g, p0 - x> in d_numerator
    s_scale: Tensor  # (d / d0) * (d if safeguard_warmup else dlr): weight of g in s


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


def coefficients(hp: Hyperparams, ds: DState) -> Coefficients:
    """The step's scalars for one group, from the D state *before* this step's D update."""
    b1, b2 = hp.betas
    d = ds.d
    dlr = d * (hp.lr * bias_correction(hp, ds.k, d.dtype))
    d_ratio = d / hp.d0
    return Coefficients(
        dlr=dlr,
        m_scale=d * (1 - b1),
        v_scale=d * d * (1 - b2),
        numerator_scale=d_ratio * dlr,
        s_scale=d_ratio * (d if hp.safeguard_warmup else dlr),
    )


def updates_d(hp: Hyperparams, k: Tensor) -> bool | Tensor:
    """Whether the step from step count ``k`` updates D (``k % d_update_freq == 0``), decided on
    the device: a 0-dim bool tensor, or True when ``d_update_freq == 1``."""
    return True if hp.d_update_freq == 1 else (k % hp.d_update_freq) == 0


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
    d_numerator = hp.beta3_value * ds.d_numerator + numerator_delta
    positive = denom > 0
    d_hat = hp.d_coef * d_numerator / torch.where(positive, denom, torch.ones_like(denom))
    d = torch.where(ds.d == hp.d0, torch.maximum(ds.d, d_hat), ds.d)
    d_max = torch.maximum(ds.d_max, d_hat)
    d = torch.minimum(d_max, d * hp.growth_rate)
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
