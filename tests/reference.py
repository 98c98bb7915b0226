"""A straightforward float64 re-statement of the K-Prodigy step (DESIGN.md), for tests only.

Deliberately naive: Python floats for D, one tensor at a time, no sharing of code with kprodigy.
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


@dataclass
class RefD:
    d: float
    d_max: float
    d_numerator: float = 0.0
    d_denom: float = 0.0
    d_hat: float = 0.0
    k: int = 0


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
)


class Reference:
    """groups: list of (list of float64 tensors, hyperparameter dict); d_groups: lists of group indices."""

    def __init__(self, groups: list[tuple[list[Tensor], dict]], d_groups: list[list[int]]):
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
        self.ds = [RefD(self.groups[m[0]].hp["d0"], self.groups[m[0]].hp["d0"]) for m in d_groups]

    def step(self, grads: list[list[Tensor | None]]) -> None:
        for members, D in zip(self.d_groups, self.ds):
            if all(g is None for i in members for g in grads[i]):
                continue  # no gradients in this D-group: nothing happens
            hp0 = self.groups[members[0]].hp
            beta3 = hp0["beta3"] if hp0["beta3"] is not None else math.sqrt(hp0["betas"][1])
            d0 = hp0["d0"]
            upd = D.k % hp0["d_update_freq"] == 0
            d = D.d
            active = [i for i in members if self.groups[i].hp["lr"] > 0 and any(g is not None for g in grads[i])]
            if not active:  # every group with gradients has lr == 0: nothing changes, k included
                continue
            numerator_delta = 0.0
            denom = 0.0
            dlrs = {}
            effective = {}
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
                    if upd:
                        gs = g.flatten()[::p]
                        numerator_delta += (d / d0) * dlr * float(torch.dot(gs, t.p0 - t.x.flatten()[::p]))
                        t.s = beta3 * t.s + (d / d0) * (d if hp["safeguard_warmup"] else dlr) * gs
                        denom += float(t.s.abs().sum())
                    if t.m is not None:
                        t.m = b1 * t.m + d * (1 - b1) * g
                    t.v = b2 * t.v + d * d * (1 - b2) * g * g
            if upd and denom == 0:  # all-zero statistics: m, v, s moved; x, D and k stay (prodigyopt)
                continue
            if upd:
                D.d_numerator = beta3 * D.d_numerator + numerator_delta
                D.d_denom = denom
                if denom > 0:
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
                    direction = t.m if t.m is not None else D.d * effective[id(t)]
                    t.x = t.x - dlr * direction / den
            D.k += 1

    def params(self, i: int) -> list[Tensor]:
        return [t.x for t in self.groups[i].tensors]
