"""The scalar math of the step, each rule written once for D on the host (Python numbers: the
optimizer's default mode) and on the device (0-dim tensors: ``capturable``, ``torch.func``,
``torch.compile``): the D schedule (``updates_d``, ``frozen``), the per-step scalars of a param
group (``step_scalars``), the D update with the all-zero-gradient rule and the non-finite skip
(``next_d``), ``d_ratio_cap`` (``cap_d_ratio``). The two forms differ only in the ops (``_Ops``:
Python conditionals, ``max``, ``math`` or their torch forms), so nothing here reads a device
tensor on the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._hyperparams import Hyperparams
from ._state import D_STATE_FIELDS, DState, Scalar, compute_dtype, is_wrapped

__all__ = ["StepScalars", "bias_correction", "cap_d_ratio", "frozen", "next_d", "step_scalars", "updates_d"]


@dataclass(frozen=True)
class _Ops:
    where: Callable[[Any, Any, Any], Any]
    maximum: Callable[[Any, Any], Any]
    minimum: Callable[[Any, Any], Any]
    sqrt: Callable[[Any], Any]
    expm1: Callable[[Any], Any]


_HOST = _Ops(lambda c, a, b: a if c else b, max, min, math.sqrt, math.expm1)
_DEVICE = _Ops(torch.where, torch.maximum, torch.minimum, torch.sqrt, torch.expm1)


def _ops(*values: Any) -> _Ops:
    """The device ops if any value is a tensor, else the host ones."""
    for v in values:
        if isinstance(v, Tensor):
            return _DEVICE
    return _HOST


def frozen(hp: Hyperparams, k: Scalar) -> bool:
    """Whether D no longer adapts at step count ``k`` (``d_steps`` reached; ``k`` on the host)."""
    if hp.d_steps is None:
        return False
    if isinstance(k, Tensor):
        raise ValueError(
            "d_steps needs the step count on the host; it is not supported with D on the device (capturable)"
        )
    return k >= hp.d_steps


def updates_d(hp: Hyperparams, k: Scalar) -> bool | Tensor:
    """Whether the step from step count ``k`` updates D (``k % d_update_freq == 0``, D not frozen):
    a bool, or for a tensor ``k`` (and ``d_update_freq > 1``) a 0-dim bool tensor."""
    return not frozen(hp, k) and (hp.d_update_freq == 1 or (k % hp.d_update_freq) == 0)


def bias_correction(hp: Hyperparams, k: Scalar) -> Scalar:
    """sqrt(1 - b2^(k+1)) / (1 - b1^(k+1)) if enabled, else 1 (``k``: the step count)."""
    if not hp.use_bias_correction:
        return 1.0
    ops = _ops(k)
    if isinstance(k, Tensor):  # in float64 where the device has it: 1 - 0.999 loses ~1e-5 in float32
        k = k.to(torch.float32 if k.device.type == "mps" else torch.float64)
    # 1 - b^(k+1) = -expm1((k+1) log b); log(0) = -inf gives exactly 1 for b = 0
    one_minus = [-ops.expm1((k + 1) * (math.log(b) if b > 0 else -math.inf)) for b in hp.betas]
    return ops.sqrt(one_minus[1]) / one_minus[0]


class StepScalars(NamedTuple):
    """Every scalar of one param group's step (a named tuple: one per group and step), Python
    floats or 0-dim tensors, from the D state before the step (``step_scalars``); ``finish`` adds
    the new D and folds in what the update must not do (a skipped step's record makes the update
    write what it read: decays 1, weights 0, step size 0)."""

    numerator_scale: Scalar  # (d/d0) * dlr: weight of <g[::p], p0 - x[::p]> in d_numerator
    s_scale: Scalar  # (d/d0) * (d if safeguard_warmup else dlr): weight of g[::p] in s; 0 where s is kept
    beta3: Scalar | None  # decay of s; 1 where s is kept; None: this step leaves s and D alone
    dlr: Scalar  # d * lr * bias_correction: the step size; 0 where the params stay
    weight: Scalar  # d before the update: m gets (1 - b1) * weight * g, v (1 - b2) * (weight * g)^2
    gains: tuple[float, float]  # (1 - b1, 1 - b2): the EMA weights, computed in float64 (not 1 - b rounded)
    decays: tuple[Scalar, Scalar]  # multipliers of m and v: the betas; 1 on a skipped step
    decay: Scalar | None  # weight_decay * dlr with decoupled decay (0 where the params stay), else None:
    # x + (-decay) * x, as prodigyopt (x * (1 - decay) would round 1 - decay to float32's spacing)
    eps: float
    d_new: Scalar | None = None  # D after the update (``finish``): the direction d_new * g when b1 == 0
    eps_d: Scalar | None = None  # d_new * eps: the floor of the denominator (``finish``)
    ok: Tensor | None = None  # the device-side skip decision folded in (``finish``), else None; a
    # kernel that multiplies g by the folded zeros zeroes g's non-finite entries first

    def with_(self, **changes: Any) -> StepScalars:
        """This record with ``changes`` (``_replace``, which dynamo before torch 2.8 does not trace;
        every field named: dynamo 2.7 inlines no generator over ``_fields`` here)."""
        c, s = changes.get, self
        return StepScalars(
            c("numerator_scale", s.numerator_scale), c("s_scale", s.s_scale), c("beta3", s.beta3), c("dlr", s.dlr),
            c("weight", s.weight), c("gains", s.gains), c("decays", s.decays), c("decay", s.decay), c("eps", s.eps),
            c("d_new", s.d_new), c("eps_d", s.eps_d), c("ok", s.ok),
        )  # fmt: skip

    def finish(self, d_new: Scalar | None, ok: Tensor | None = None, moves: Scalar = True) -> StepScalars:
        """The record of the update pass: ``d_new`` the D after the update (None: m, v, s only);
        ``moves`` False on an all-zero-statistics step (m, v, s move, nothing else, as prodigyopt);
        ``ok`` a device-side skip decision (False: nothing is written)."""
        s, eps_d = self, None if d_new is None else d_new * self.eps  # (every field named: see ``with_``)
        done = StepScalars(
            s.numerator_scale, s.s_scale, s.beta3, s.dlr, s.weight, s.gains, s.decays, s.decay, s.eps, d_new, eps_d, s.ok
        )
        if moves is not True:
            ops = _ops(moves)
            decay = None if self.decay is None else ops.where(moves, self.decay, 0.0)
            done = done.with_(dlr=ops.where(moves, self.dlr, 0.0), decay=decay)
        if ok is None:
            return done
        dtype = self.weight.dtype if isinstance(self.weight, Tensor) else torch.float64

        def sel(a: Scalar, b: float) -> Tensor:  # a where ok, else b (host numbers in float64, filled
            # on the device: torch.tensor(a, device=) copies from the host, a sync)
            return torch.where(ok, a if isinstance(a, Tensor) else torch.full((), a, dtype=dtype, device=ok.device), b)

        return done.with_(
            ok=ok,
            s_scale=sel(self.s_scale, 0.0),
            beta3=None if self.beta3 is None else sel(self.beta3, 1.0),
            dlr=sel(done.dlr, 0.0),
            weight=sel(self.weight, 0.0),
            decays=(sel(self.decays[0], 1.0), sel(self.decays[1], 1.0)),
            decay=None if done.decay is None else sel(done.decay, 0.0),
        )

    def like(self, x: Tensor) -> StepScalars:
        """This record for kernels on ``x``: inside ``torch.func`` transforms its 0-dim tensors in x's
        ``compute_dtype``, as outside them (vmap promotes a batched float64 D like a tensor)."""
        if torch.compiler.is_compiling() or not is_wrapped(x):
            return self
        dtype = compute_dtype(x.dtype)

        def cast(v: Any) -> Any:
            if isinstance(v, tuple):
                return tuple(cast(u) for u in v)
            return v.to(dtype) if isinstance(v, Tensor) and v.dtype != torch.bool else v

        return StepScalars(*(cast(v) for v in self))


def step_scalars(hp: Hyperparams, ds: DState, *, update_d: bool | Tensor, beta3: float) -> StepScalars:
    """The step's scalars for one group, from the D state *before* this step's D update. ``beta3``:
    the D-group's; ``update_d`` a 0-dim bool tensor is blended in (False: beta3 1, s_scale 0)."""
    b1, b2 = hp.betas
    d = ds.d
    dlr = d * (hp.lr * bias_correction(hp, ds.k))
    d_ratio = d / hp.d0
    numerator_scale, s_scale = d_ratio * dlr, d_ratio * (d if hp.safeguard_warmup else dlr)
    s_beta3: Scalar | None = None if update_d is False else beta3
    if isinstance(update_d, Tensor):
        s_beta3 = torch.where(update_d, torch.full_like(d, beta3), 1.0)
        s_scale = torch.where(update_d, s_scale, 0.0)
    decay = hp.weight_decay * dlr if hp.weight_decay > 0 and hp.decouple else None
    return StepScalars(numerator_scale, s_scale, s_beta3, dlr, d, (1 - b1, 1 - b2), (b1, b2), decay, hp.eps)


def next_d(ds: DState, total: Any, hp: Hyperparams, *, update_d: bool | Tensor) -> tuple[DState, Scalar, Scalar]:
    """The D state after a step, whether the params move, and whether the step is taken (``ok``).

    total: the D-group's statistics, ``[sum (d/d0) * dlr * <g, p0 - x>, sum ||s||_1]`` where
        ``update_d`` is not False, then the gradient extremes that decide the skip (with
        ``hp.skip_nonfinite``, a non-finite one skips the step: only ``skipped_steps`` moves).
    prodigyopt's rule (class docstring of ``KProdigy``); where ``denom == 0`` (all gradients zero)
    the D keys and k stay and the params do not move.
    """
    ok: Scalar = True
    if hp.skip_nonfinite and len(total):
        if isinstance(total, Tensor) or isinstance(total[0], Tensor):
            ok = torch.isfinite(total if isinstance(total, Tensor) else torch.stack(total)).all()
        else:
            ok = all(map(math.isfinite, total))
    numerator_delta, denom = (total[0], total[1]) if update_d is not False else (0.0, 0.0)  # (unused then)
    ops = _ops(ds.d, numerator_delta, denom, update_d, ok)
    moves: Scalar = True
    if update_d is False:
        new = ds.replace(k=ds.k + 1)
    else:
        d_numerator = hp.beta3_value * ds.d_numerator + numerator_delta
        positive = denom > 0
        d_hat = hp.d_coef * d_numerator / ops.where(positive, denom, 1.0)
        d_max = ops.maximum(ds.d_max, d_hat)
        d = ops.minimum(d_max, ops.where(ds.d == hp.d0, ops.maximum(ds.d, d_hat), ds.d) * hp.growth_rate)
        moves = positive if update_d is True else positive | ~update_d
        adapts = positive if update_d is True else positive & update_d
        new = DState(
            d=ops.where(adapts, d, ds.d),
            d_max=ops.where(adapts, d_max, ds.d_max),
            d_numerator=ops.where(adapts, d_numerator, ds.d_numerator),
            d_denom=ops.where(adapts, denom, ds.d_denom),
            d_hat=ops.where(adapts, d_hat, ds.d_hat),
            k=ops.where(moves, ds.k + 1, ds.k),
            skipped_steps=ds.skipped_steps,
        )
    if ok is True:
        return new, moves, ok
    kept = {f: ops.where(ok, getattr(new, f), getattr(ds, f)) for f in D_STATE_FIELDS[:-1]}
    return DState(**kept, skipped_steps=ds.skipped_steps + ops.where(ok, 0, 1)), moves, ok


def cap_d_ratio(
    before: Sequence[DState], states: Sequence[DState], live: Sequence[bool], ratio: float | None
) -> list[DState]:
    """``d_ratio_cap`` after a step: the D of each live D-group (some group with lr > 0) kept within
    ``ratio`` of the smallest live one, ``d_i <- min(d_i, ratio * min_j d_j)``, but never below its
    D ``before`` the step (a group joining at d0 does not pull the others down). Python floats or
    0-dim tensors (each stays on its device)."""
    out, idx = list(states), [j for j, is_live in enumerate(live) if is_live]
    if ratio is None or len(idx) < 2:
        return out
    ds, olds = [out[j].d for j in idx], [before[j].d for j in idx]
    if isinstance(ds[0], Tensor):
        floor = torch.stack([d.to(ds[0].device, torch.float64) for d in ds]).min() * ratio
        capped = [torch.maximum(o, torch.minimum(d, floor.to(d.device, d.dtype))) for d, o in zip(ds, olds)]
    else:
        capped = [d if d <= min(ds) * ratio else max(o, min(ds) * ratio) for d, o in zip(ds, olds)]
    for j, d, new in zip(idx, ds, capped):
        if new is not d:
            out[j] = out[j].replace(d=new)
    return out
