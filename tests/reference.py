"""A straightforward float64 re-statement of the K-Prodigy step (DESIGN.md), for tests only.

Deliberately naive: Python floats for D, one tensor at a time, no sharing of code with kprodigy.

The rules it states (each one prodigyopt 1.1.2's where prodigyopt defines it):

- D arithmetic in float64 (Python floats, as prodigyopt keeps d, d_max, d_numerator, d_hat);
  ``d`` never decreases and is never below ``d0``; the first jump tests ``d == d0`` in float64.
- ``beta3=None`` means sqrt(betas[1]) of the D-group's FIRST param group; so do ``d0``, ``d_coef``,
  ``growth_rate``, ``d_update_freq``, ``d_steps`` and ``skip_nonfinite`` (equal in a D-group).
- A D-group with no gradients, or whose groups with gradients all have ``lr == 0``, changes
  nothing on that step, ``k`` included. A group with ``lr == 0`` inside a D-group that steps is
  frozen: its params, moments and state do not change (no weight decay either).
- A non-finite gradient (in a group with ``lr > 0``) with ``skip_nonfinite`` skips the D-group's
  step whole: params, moments, ``s``, D keys unchanged, ``k`` does not advance,
  ``skipped_steps`` += 1.
- On a step that updates D (``k % d_update_freq == 0`` and D not frozen by ``d_steps``) whose
  ``d_denom`` is 0 (all-zero gradients with ``s`` zero, e.g. the first steps or ``beta3 = 0``):
  m, v and s are updated with the gradient, then nothing else: no param update (no weight decay),
  D keys and ``k`` unchanged, the tensors' ``step`` does not advance (prodigyopt: ``if d_denom == 0:
  return loss``). A step that does not update D has no such check.
- ``d_steps``: D is frozen once ``k >= d_steps`` (no statistics, no D update).
- A schedule may change a group's hyperparameters between steps (``ref.groups[i].hp``): when
  ``betas[0]`` rises from 0, ``m`` starts as zeros; while ``betas[0] == 0``, ``m`` is kept untouched.
- ``d_ratio_cap``: after every step, the D of every live D-group (some group with ``lr > 0``, whether
  it stepped or not) is capped at ``d_ratio_cap`` x the smallest live D; a D never goes back down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class RefTensor:
    x: Tensor
    m: Tensor | None
    v: Tensor
    s: Tensor
    p0: Tensor
    step: int = 0  # the param's own step count (``state[p]["step"]``)


@dataclass
class RefD:
    d: float
    d_max: float
    d_numerator: float = 0.0
    d_denom: float = 0.0
    d_hat: float = 0.0
    k: int = 0
    skipped_steps: int = 0


@dataclass
class RefGroup:
    hp: dict
    tensors: list[RefTensor] = field(default_factory=list)


DEFAULTS = dict(
    lr=1.0,
    betas=(0.9, 0.999),
    beta3=None,
    eps=1e-8,
    weight_decay=0.0,
    decouple=True,
    use_bias_correction=False,
    safeguard_warmup=False,
    d0=1e-6,
    d_coef=1.0,
    growth_rate=math.inf,
    d_update_freq=1,
    slice_p=1,
    maximize=False,
    skip_nonfinite=True,
    d_steps=None,
)


class Reference:
    """groups: list of (list of tensors, hyperparameter dict); d_groups: lists of group indices.

    d_ratio_cap: the optimizer-wide cap of the D ratios (None: none).
    """

    def __init__(
        self, groups: list[tuple[list[Tensor], dict]], d_groups: list[list[int]], *, d_ratio_cap: float | None = None
    ):
        self.groups = []
        for params, hp in groups:
            hp = {**DEFAULTS, **hp}
            p = hp["slice_p"]
            tensors = []
            for x in params:
                x = x.detach().clone().double()
                sliced = x.flatten()[::p]
                p0 = sliced.clone() if bool(x.any()) else torch.zeros((), dtype=x.dtype)
                m = torch.zeros_like(x) if hp["betas"][0] > 0 else None
                tensors.append(RefTensor(x, m, torch.zeros_like(x), torch.zeros_like(sliced), p0))
            self.groups.append(RefGroup(hp, tensors))
        self.d_groups = d_groups
        self.d_ratio_cap = d_ratio_cap
        self.ds = [RefD(self.groups[m[0]].hp["d0"], self.groups[m[0]].hp["d0"]) for m in d_groups]

    def step(self, grads: list[list[Tensor | None]]) -> None:
        before = [D.d for D in self.ds]
        for members, D in zip(self.d_groups, self.ds):
            self._step_d_group(members, D, grads)
        if self.d_ratio_cap is not None:
            live = [j for j, members in enumerate(self.d_groups) if any(self.groups[i].hp["lr"] > 0 for i in members)]
            if live:
                floor = min(self.ds[j].d for j in live) * self.d_ratio_cap
                for j in live:
                    self.ds[j].d = max(before[j], min(self.ds[j].d, floor))

    def _step_d_group(self, members: list[int], D: RefD, grads: list[list[Tensor | None]]) -> None:
        hp0 = self.groups[members[0]].hp
        active = [i for i in members if self.groups[i].hp["lr"] > 0 and any(g is not None for g in grads[i])]
        if not active:
            return  # no gradients, or every group with gradients frozen: nothing happens, k stays
        if hp0["skip_nonfinite"] and any(
            not bool(torch.isfinite(g).all()) for i in active for g in grads[i] if g is not None
        ):
            D.skipped_steps += 1
            return
        beta3 = hp0["beta3"] if hp0["beta3"] is not None else math.sqrt(hp0["betas"][1])
        d0 = hp0["d0"]
        frozen = hp0["d_steps"] is not None and D.k >= hp0["d_steps"]
        upd = not frozen and D.k % hp0["d_update_freq"] == 0
        d = D.d
        numerator_delta = 0.0
        denom = 0.0
        dlrs = {}
        effective = {}
        new = {}  # id(tensor) -> (m, v, s): committed after the d_denom check
        for i in active:
            hp = self.groups[i].hp
            b1, b2 = hp["betas"]
            bc = math.sqrt(1 - b2 ** (D.k + 1)) / (1 - b1 ** (D.k + 1)) if hp["use_bias_correction"] else 1.0
            dlr = dlrs[i] = d * hp["lr"] * bc
            p = hp["slice_p"]
            for t, g in zip(self.groups[i].tensors, grads[i]):
                if g is None:
                    continue
                g = g.double()
                if hp["maximize"]:
                    g = -g
                if hp["weight_decay"] and not hp["decouple"]:
                    g = g + hp["weight_decay"] * t.x
                effective[id(t)] = g
                s = t.s
                if upd:
                    gs = g.flatten()[::p]
                    numerator_delta += (d / d0) * dlr * float(torch.dot(gs, t.p0 - t.x.flatten()[::p]))
                    s = beta3 * t.s + (d / d0) * (d if hp["safeguard_warmup"] else dlr) * gs
                    denom += float(s.abs().sum())
                if b1 > 0 and t.m is None:
                    t.m = torch.zeros_like(t.x)  # betas[0] raised from 0 by a schedule: m starts at zero
                m = b1 * t.m + d * (1 - b1) * g if b1 > 0 else t.m  # b1 == 0: m (if any) is kept untouched
                v = b2 * t.v + d * d * (1 - b2) * g * g
                new[id(t)] = (m, v, s)
        for i in active:
            for t in self.groups[i].tensors:
                if id(t) in new:
                    t.m, t.v, t.s = new[id(t)]
        if upd and denom == 0:
            return  # prodigyopt: moments and s decayed, nothing else (no param update, D and k kept)
        if upd:
            D.d_numerator = beta3 * D.d_numerator + numerator_delta
            D.d_denom = denom
            D.d_hat = hp0["d_coef"] * D.d_numerator / denom
            new_d = max(d, D.d_hat) if d == d0 else d
            D.d_max = max(D.d_max, D.d_hat)
            D.d = min(D.d_max, new_d * hp0["growth_rate"])
        for i in active:
            hp = self.groups[i].hp
            dlr = dlrs[i]
            for t, g in zip(self.groups[i].tensors, grads[i]):
                if g is None:
                    continue
                den = t.v.sqrt() + D.d * hp["eps"]  # D after this step's update
                if hp["weight_decay"] and hp["decouple"]:
                    t.x = t.x * (1 - hp["weight_decay"] * dlr)
                direction = t.m if hp["betas"][0] > 0 else D.d * effective[id(t)]
                t.x = t.x - dlr * direction / den
                t.step += 1
        D.k += 1

    def params(self, i: int) -> list[Tensor]:
        return [t.x for t in self.groups[i].tensors]
