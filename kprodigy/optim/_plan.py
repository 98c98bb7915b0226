"""The plan of a step as the shell keeps it: the groups' tensors as the core's segments (state
created on first use, ``segment``), the engine's plan over them (``build``), and whether a later
step may reuse it (``Kept.holds``: identities compared instead of validating and laying out)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..functional import Hyperparams, _distributed, _engine, _formats
from ..functional._state import STATE_KEYS, Segment
from . import _group_keys
from ._checks import check_d_group_agrees, check_grads, check_group, hparams, one_device

__all__ = ["Kept", "build", "normalize", "raw_state", "release", "segment"]


def build(opt: Any) -> Kept:
    """Validate everything (nothing changes on an error), create state where needed and build
    the plan of this step; kept for the next steps unless a param is a DTensor."""
    release(opt)
    for i, group in enumerate(opt.param_groups):
        check_group(group, i)
        check_grads(group, i, opt.state)
    members = opt.d_groups()
    for m in members:
        groups = [opt.param_groups[i] for i in m]
        check_d_group_agrees(groups, m)
        params = [p for g in groups for p in g["params"] if p.grad is not None]
        if params and not any(_distributed.is_dtensor(p) for p in params):
            one_device(params, m)
    on_host = not any(g["capturable"] for g in opt.param_groups)
    opt._bind()
    built = [[segment(opt.state, opt.param_groups[i]) for i in m] for m in members]
    stepped = [[ps for _, ps in d] for d in built]
    dtensor = any(_distributed.is_dtensor(p) for d in stepped for ps in d for p in ps)
    plan = _engine.build(
        [[seg for seg, _ in d] for d in built],
        on_host=on_host,
        foreach=[opt.param_groups[m[0]]["foreach"] for m in members],
        fused=[opt.param_groups[m[0]]["fused"] for m in members],
        pack=not dtensor,
        scaled=not dtensor,  # (kept: ``release`` normalizes it)
    )
    for d, ps_list in zip(plan.d_groups, stepped):  # the state as laid out (small params' packed)
        for member, ps in zip(d, ps_list):
            for key in STATE_KEYS:
                ts = getattr(member.seg, key)
                for p, t in zip(ps, ts or []):
                    if key in opt.state[p] and opt.state[p][key] is not t and not dtensor:
                        opt.state[p][key] = t
    kept = Kept(opt, plan, members, stepped)
    if not dtensor:
        opt._kept = kept
    return kept


def normalize(opt: Any) -> None:
    """The kept plan's scales multiplied into the state (``_engine.normalize``): ``opt.state``
    holds prodigyopt's values; the plan is kept."""
    kept = opt.__dict__.get("_kept")
    if kept is not None:
        _engine.normalize(kept.plan)


def release(opt: Any) -> None:
    """Drop the kept plan, its state normalized first."""
    normalize(opt)
    opt._kept = None


def raw_state(opt: Any) -> dict[Tensor, dict[str, Any]]:
    """``opt.state`` without normalizing it (the step's own bookkeeping)."""
    return opt.__dict__["state"]  # type: ignore[no-any-return]


def segment(states: dict[Tensor, dict[str, Any]], group: dict[str, Any]) -> tuple[Segment, list[Tensor]]:
    """The segment of a group's params with gradients (DTensors as their local shards: the math is
    per rank; state created on first use; ``s`` and ``p0`` empty once D froze), and those params."""
    hp = hparams(group)
    originals = [p for p in group["params"] if p.grad is not None]
    lists: dict[str, Any] = {key: [] for key in ("params", "grads", *STATE_KEYS)}
    for p in originals:
        state = states[p]
        if "exp_avg_sq" not in state:
            state.update(_distributed.init_state(p, hp, factored=group["factored"]))
            state["step"] = _group_keys.step_count(0, p, group["capturable"])
            if group["d_frozen"]:
                del state["s"], state["p0"]
        if hp.betas[0] > 0 and "exp_avg" not in state:  # betas[0] raised from 0 mid-training
            state["exp_avg"] = _formats.zeros(p, "exp_avg", hp.state_precision)
        x = _distributed.local(p)
        lists["params"].append(x)
        lists["grads"].append(_distributed.local(p.grad))  # type: ignore[arg-type]
        for key in STATE_KEYS:
            if key in state:
                t = state[key]
                lists[key].append(_distributed.flat_local(t) if key in ("s", "p0") else _distributed.local(t))
            elif key != "exp_avg":
                lists[key].append(x.new_empty(0))
    if hp.betas[0] == 0:
        lists["exp_avg"] = None
    return Segment(**lists, hparams=hp), originals


class Kept:
    """The plan of a step and what it was built from, so that a steady step checks identities
    instead of validating, gathering and laying out again (``holds``)."""

    def __init__(
        self, opt: Any, plan: _engine.Plan, members: list[list[int]], stepped: list[list[list[Tensor]]]
    ) -> None:
        self.plan, self.members, self.stepped = plan, members, stepped
        self.groups = list(opt.param_groups)
        self.by_d_group = [[self.groups[i] for i in m] for m in members]  # each D-group's param groups
        self.key = (opt.independent_d, [g["d_group"] for g in self.groups])
        self.hps = [hparams(g) for g in self.groups]
        self.settings = [_settings(g) for g in self.groups]
        self.ids = [tuple(map(id, g["params"])) for g in self.groups]
        flat = [p for d in stepped for ps in d for p in ps]
        self.idle = [p for g in self.groups for p in g["params"] if p.grad is None]  # no gradient then
        self.tensors = [_tensors(opt, p) for p in flat]
        self.state = raw_state(opt)  # each param's state dict is kept by identity (``_tensors``)
        self.dtensor = any(_distributed.is_dtensor(p) for p in flat)

    def holds(self, opt: Any) -> bool:
        """Whether ``opt`` still matches: the same groups, settings of the same shape, params with
        gradients of the same layout and the same state tensors. Settings that changed in their
        values only (an lr schedule) are validated and taken into the plan."""
        groups = opt.param_groups
        if len(groups) != len(self.groups) or (opt.independent_d, [g["d_group"] for g in groups]) != self.key:
            return False
        try:
            for i, (group, mine) in enumerate(zip(groups, self.groups)):
                if group is not mine or tuple(map(id, group["params"])) != self.ids[i]:
                    return False
                hp = hparams(group)  # (the same object while the values stay: a memo)
                if hp is not self.hps[i] or _flags(group) != self.settings[i][1]:
                    if _settings(group) != self.settings[i]:
                        return False
                    self._refresh(i, hp)
        except (ValueError, RuntimeError, TypeError):
            return False  # the full step raises it, with its context
        if any(p.grad is not None for p in self.idle) or raw_state(opt) is not self.state:
            return False
        for p, (kind, dtype, device, shape, contiguous), ptr, st, m, v, s, p0 in self.tensors:  # (a load
            g = p.grad  # replaces ``opt.state`` wholesale: above; cheapest checks first, no tuple per param)
            if type(g) is not kind or g.dtype is not dtype or g.shape != shape or g.is_contiguous() != contiguous:
                return False
            if p.data_ptr() != ptr:
                return False  # ``p.data = ...`` (``Module.to`` does it): the plan's views hold the old storage
            if g.device != device or st.get("exp_avg") is not m or st.get("exp_avg_sq") is not v:
                return False
            if st.get("s") is not s or st.get("p0") is not p0:
                return False
        return True

    def hps_by_d_group(self) -> list[list[Hyperparams]]:
        """Each D-group's param groups' hyperparameters, as ``holds`` last took them."""
        return [[self.hps[i] for i in m] for m in self.members]

    def _refresh(self, i: int, hp: Hyperparams) -> None:
        """Take a param group's new hyperparameter values into the plan."""
        self.hps[i] = hp
        for m, d in zip(self.members, self.plan.d_groups):
            for j, member in zip(m, d):
                if j == i:
                    _engine.refresh(member, hp)


def _flags(g: dict[str, Any]) -> tuple[Any, ...]:
    """The group's backend flags and how D is held (compared by identity: a changed value, even
    an equal one of another type, goes through the full step's checks)."""
    return (
        id(g["foreach"]),
        id(g["fused"]),
        id(g["factored"]),
        id(g["capturable"]),
        id(g["fsdp_in_use"]),
        id(g["d_frozen"]),
    )


def _settings(group: dict[str, Any]) -> tuple[Any, ...]:
    """What shapes the plan: a group's D settings and state layout (validated), and its flags."""
    hp = hparams(group)
    return ((hp.d_config(), hp.slice_p, hp.betas[0] > 0, hp.stochastic_rounding), _flags(group))


def _tensors(opt: Any, p: Tensor) -> tuple[Any, ...]:
    """What a planned param must still have: its gradient's type and layout, its storage, its state
    tensors."""
    g, st = p.grad, opt.state.get(p, {})
    assert g is not None, "a planned param has a gradient"
    layout = (type(g), g.dtype, g.device, g.shape, g.is_contiguous())
    return (p, layout, p.data_ptr(), st, *(st.get(key) for key in STATE_KEYS))
