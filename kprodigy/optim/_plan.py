"""The native path's plan, kept by the optimizer between steps: which param groups and params
it steps, in which buckets (``functional._native.FlatGroup``), and what it was built from, so
that a steady step checks identities instead of gathering, packing and validating again."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..functional import Hyperparams, _layout, _native
from ..functional._state import stat_dtype

__all__ = ["Plan", "PlanEntry"]


class PlanEntry:
    """One param group in a kept native plan: what it was built from, and its flat record."""

    def __init__(
        self,
        group: dict[str, Any],
        hp: Hyperparams,
        params: list[Tensor],
        stepped: list[Tensor],
        state: dict[Tensor, dict[str, Any]],
        flat: _native.FlatGroup | None,
    ) -> None:
        self.group, self.hp, self.params, self.stepped, self.flat = group, hp, params, stepped, flat
        self.has_grad = [p.grad is not None for p in params]
        self.states = [state[p] for p in stepped]
        self.tensors = [tuple(st.get(key) for key in _layout.STATE_KEYS) for st in self.states]
        self.shapes = [p.shape for p in stepped]
        self.dtype = flat.work.dtype if flat is not None else None
        self.device = flat.work.device if flat is not None else None

    def holds(self, state: dict[Tensor, dict[str, Any]]) -> bool:
        """Whether this step's group matches the plan: the same params with gradients, of the
        same dtype, device and shape, contiguous, and the same state tensors."""
        ps = self.group["params"]
        if len(ps) != len(self.params):
            return False
        for p, q, has in zip(ps, self.params, self.has_grad):
            if p is not q or (p.grad is None) == has:
                return False
        if self.flat is None:
            return True
        for p, st, (m, v, s, p0), shape in zip(self.stepped, self.states, self.tensors, self.shapes):
            g = p.grad
            if type(g) is not Tensor or g.dtype != self.dtype or g.device != self.device:
                return False
            if g.shape != shape or p.shape != shape or not g.is_contiguous():
                return False
            if state.get(p) is not st or st.get("exp_avg") is not m or st.get("exp_avg_sq") is not v:
                return False
            if st.get("s") is not s or st.get("p0") is not p0:
                return False
        return True


class Plan:
    """The native plan kept between steps: D-groups (``members``) and one entry per param group;
    per D-group the params it steps and their statistics dtype (fixed while the plan holds)."""

    def __init__(self, d_key: tuple[Any, ...], members: list[list[int]], entries: list[PlanEntry]) -> None:
        self.d_key, self.members, self.entries = d_key, members, entries
        self.params = [[p for i in m for p in entries[i].stepped] for m in members]
        self.dtypes = [stat_dtype([p.dtype for p in ps]) for ps in self.params]
        self.stepped = [p for ps in self.params for p in ps]
        self.lead_of = {i: m[0] for m in members for i in m}  # param group -> its D-group's first group
