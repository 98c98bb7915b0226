"""The scalar math of the step, each rule written once for D held on the host (Python numbers:
the optimizer's default mode, one host read per step) and on the device (0-dim tensors:
``capturable`` and the step under ``torch.func``/``torch.compile``, no host read).

- ``updates_d``, ``frozen``: the D schedule (``d_update_freq``; D frozen once ``k >= d_steps``);
- ``bias_correction``, ``step_scalars``: every per-step scalar of a param group (``StepScalars``);
- ``next_d``: the D update from the step's (reduced) statistics, the all-zero-gradient rule and
  the non-finite skip folded in;
- ``cap_d_ratio``: ``d_ratio_cap`` over the D-groups.

The host and device forms differ only in the operations used (``_Ops``): a Python conditional,
``max``, ``min`` and ``math`` against ``torch.where``, ``torch.maximum``, ``torch.minimum`` and
torch's elementwise functions, so nothing here reads a device tensor on the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._hyperparams import Hyperparams
from ._state import D_STATE_FIELDS, DState

__all__ = ["StepScalars", "bias_correction", "cap_d_ratio", "frozen", "next_d", "step_scalars", "updates_d"]

Scalar = Any  # a Python number or a 0-dim tensor


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
    """Whether D no longer adapts at step count ``k`` (``d_steps`` reached; needs ``k`` on the host)."""
    if hp.d_steps is None:
        return False
    if isinstance(k, Tensor):
        raise ValueError("d_steps needs the step count on the host; it is not supported with D on the device (capturable)")
    return k >= hp.d_steps


def updates_d(hp: Hyperparams, k: Scalar) -> bool | Tensor:
    """Whether the step from step count ``k`` updates D: ``k % d_update_freq == 0`` and D not
    frozen. A bool, or for a tensor ``k`` a 0-dim bool tensor decided on the device (True when
    ``d_update_freq == 1``)."""
    if frozen(hp, k):
        return False
    if hp.d_update_freq == 1:
        return True
    return (k % hp.d_update_freq) == 0


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
    """Every scalar of one param group's step: Python floats (D on the host) or 0-dim tensors (D
    on the device), built by ``step_scalars`` from the D state before the step; ``finish`` adds
    D after the update and folds in what the update must not do. A skipped step's record makes
    the update write exactly what it read (decays 1, weights 0, step size 0). (A named tuple:
    one is made per group and step.)"""

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
    ok: Tensor | None = None  # the device-side skip decision folded in (``finish``); None: no skip
    # folded. A kernel that multiplies g by the folded zeros zeroes g's non-finite entries first

    def with_(self, **changes: Any) -> StepScalars:
        """This record with ``changes`` (``_replace``, which dynamo before torch 2.8 does not trace;
        every field named, as dynamo 2.7 inlines no generator over ``_fields`` here)."""
        c, s = changes.get, self
        return StepScalars(
            c("numerator_scale", s.numerator_scale), c("s_scale", s.s_scale), c("beta3", s.beta3), c("dlr", s.dlr),
            c("weight", s.weight), c("gains", s.gains), c("decays", s.decays), c("decay", s.decay), c("eps", s.eps),
            c("d_new", s.d_new), c("eps_d", s.eps_d), c("ok", s.ok),
        )  # fmt: skip

    def finish(self, d_new: Scalar | None, ok: Tensor | None = None, moves: Scalar = True) -> StepScalars:
        """The record of the update pass. ``d_new``: D after this step's update (None: for an
        update of m, v and s only). ``moves``: whether the params move (False on a step whose
        D statistics were all zero: m, v and s are updated, nothing else, as in prodigyopt).
        ``ok``: a device-side skip decision (False: nothing is written)."""
        done = self.with_(d_new=d_new, eps_d=None if d_new is None else d_new * self.eps)
        if moves is not True:
            ops = _ops(moves)
            done = done.with_(
                dlr=ops.where(moves, self.dlr, 0.0),
                decay=None if self.decay is None else ops.where(moves, self.decay, 0.0),
            )
        if ok is None:
            return done
        dtype = self.weight.dtype if isinstance(self.weight, Tensor) else torch.float64

        def sel(a: Scalar, b: float) -> Tensor:  # a where ok, else b (host numbers in float64)
            return torch.where(ok, a if isinstance(a, Tensor) else torch.tensor(a, dtype=dtype, device=ok.device), b)

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
        """This record for kernels on ``x``: inside ``torch.func`` transforms, its 0-dim tensors
        in x's compute dtype (at least float32), so that a batched float64 D does not make the
        kernels compute in float64 (vmap promotes a batched scalar like a tensor), as outside them."""
        if torch.compiler.is_compiling() or not torch._C._functorch.is_functorch_wrapped_tensor(x):
            return self
        dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype

        def cast(v: Any) -> Any:
            return tuple(cast(u) for u in v) if isinstance(v, tuple) else v.to(dtype) if isinstance(v, Tensor) and v.dtype != torch.bool else v

        return StepScalars(*(cast(v) for v in self))


def step_scalars(hp: Hyperparams, ds: DState, *, update_d: bool | Tensor, beta3: float) -> StepScalars:
    """The step's scalars for one group, from the D state *before* this step's D update.

    update_d: whether this step updates D; a 0-dim bool tensor (decided on the device) is blended
    in: where it is False, beta3 is 1 and s_scale 0, so that s is written unchanged.
    beta3:    the D-group's (``beta3_value`` of its first group)."""
    b1, b2 = hp.betas
    d = ds.d
    dlr = d * (hp.lr * bias_correction(hp, ds.k))
    d_ratio = d / hp.d0
    numerator_scale, s_scale = d_ratio * dlr, d_ratio * (d if hp.safeguard_warmup else dlr)
    s_beta3: Scalar | None = None if update_d is False else beta3
    if isinstance(update_d, Tensor):
        s_beta3 = torch.where(update_d, torch.full_like(d, beta3), 1.0)
        s_scale = torch.where(update_d, s_scale, 0.0)
    return StepScalars(
        numerator_scale=numerator_scale,
        s_scale=s_scale,
        beta3=s_beta3,
        dlr=dlr,
        weight=d,
        gains=(1 - b1, 1 - b2),
        decays=(b1, b2),
        decay=hp.weight_decay * dlr if hp.weight_decay > 0 and hp.decouple else None,
        eps=hp.eps,
    )


def next_d(
    ds: DState, numerator_delta: Scalar, denom: Scalar, hp: Hyperparams, *, update_d: bool | Tensor, ok: Scalar = True
) -> tuple[DState, Scalar]:
    """The D state after a step, and whether the step moves the params.

    numerator_delta: sum over the D-group's tensors of (d/d0) * dlr * <g, p0 - x> (summed over ranks)
    denom:           sum of ||s||_1 after this step's s update (None where ``update_d`` is False)
    hp:              the D-group's settings (its first group's: beta3, d0, d_coef, growth_rate)
    update_d:        whether this step updates D (``updates_d``)
    ok:              False: the step is skipped (non-finite gradients): the state stays, except
                     ``skipped_steps + 1``.

    prodigyopt's rule: where ``denom > 0``, d_hat = d_coef * d_numerator / denom, d moves to
    max(d, d_hat) on its first move, d_max to max(d_max, d_hat), and d = min(d_max, d *
    growth_rate): d never decreases. A step that updates D with ``denom == 0`` (all gradients
    zero) changes nothing but m, v and s: the D keys and k stay, and the params do not move.
    Otherwise k advances.
    """
    ops = _ops(ds.d, numerator_delta, denom, update_d, ok)
    if update_d is False:
        new, moves = ds.replace(k=ds.k + 1), True
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
        return new, moves
    kept = {f: ops.where(ok, getattr(new, f), getattr(ds, f)) for f in D_STATE_FIELDS[:-1]}
    return DState(**kept, skipped_steps=ds.skipped_steps + ops.where(ok, 0, 1)), moves


def cap_d_ratio(
    before: Sequence[DState], states: Sequence[DState], live: Sequence[bool], ratio: float | None
) -> list[DState]:
    """``d_ratio_cap``: after a step, the D of every live D-group (some group with lr > 0, stepped
    or not) kept within ``ratio`` of the smallest live one, ``d_i <- min(d_i, ratio * min_j
    d_j)``, but never below its D ``before`` the step (a group joining at d0 does not pull the
    others down); the others as they are. D as Python floats or 0-dim tensors (any devices; each
    stays on its own)."""
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
