"""Checkpoints of the functional state: a plain-dict form, and conversions to/from ``KProdigy``.

``state_to_dict``/``state_from_dict``: plain containers and tensors, which
``torch.load(weights_only=True)`` reads back (it refuses custom classes such as ``State``).
``to_/from_optimizer_state_dict``: the format of ``KProdigy.state_dict()`` (per-param ``exp_avg``,
``exp_avg_sq``, ``s``, ``p0``, ``step``; the D group keys as Python numbers), params in
``torch.utils._pytree.tree_leaves(params)`` order (for ``dict(model.named_parameters())``,
``model.parameters()`` order), so a run moves between the functional loop and the class. They
read tensors on the host: call them between steps, not inside a compiled or vmapped step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from . import _formats
from ._distributed import is_dtensor
from ._hyperparams import Hyperparams
from ._state import D_FLOATS, D_STATE_FIELDS, STATE_KEYS, DState, State, check_state, d_dtype

__all__ = ["check_optimizer_state_dict", "from_optimizer_state_dict", "state_from_dict", "state_to_dict"]
__all__ += ["to_optimizer_state_dict"]


def state_to_dict(state: State) -> dict[str, Any]:
    """``state`` as plain containers, tensors shared: ``{"exp_avg", "exp_avg_sq", "s", "p0": <params'
    structure>, "d": {...}}``; a structure of other than lists, tuples and dicts raises TypeError."""
    check_state(state)
    for name in STATE_KEYS:
        _check_plain(getattr(state, name), name)
    d = {f: getattr(state.d, f) for f in D_STATE_FIELDS}
    return {**{name: getattr(state, name) for name in STATE_KEYS}, "d": d}


def state_from_dict(data: Mapping[str, Any]) -> State:
    """The ``State`` saved by ``state_to_dict`` (e.g. after ``torch.load``); checked, tensors shared."""
    if not isinstance(data, Mapping):
        raise TypeError(f"expected the dict written by state_to_dict, got {type(data).__name__}")
    missing = [k for k in (*STATE_KEYS, "d") if k not in data]
    if missing:
        raise ValueError(f"state dict lacks keys {missing}; expected the keys {[*STATE_KEYS, 'd']}")
    d = data["d"]
    if not isinstance(d, Mapping) or sorted(d) != sorted(D_STATE_FIELDS):
        got = sorted(d) if isinstance(d, Mapping) else type(d).__name__
        raise ValueError(f"state dict 'd' must be a dict with keys {sorted(D_STATE_FIELDS)}; got {got}")
    for name in D_STATE_FIELDS:
        if not isinstance(d[name], Tensor):
            raise TypeError(f"state dict 'd'[{name!r}] is a {type(d[name]).__name__}; expected a tensor")
    spec = pytree.tree_structure(data["exp_avg_sq"])
    for name in STATE_KEYS:
        if data[name] is None and name == "exp_avg":
            continue
        leaves, fspec = pytree.tree_flatten(data[name])
        if fspec != spec:
            raise ValueError(f"state dict {name!r} has structure {fspec} but 'exp_avg_sq' has {spec}")
        if not all(isinstance(t, Tensor) for t in leaves):
            raise TypeError(f"state dict {name!r} holds a non-tensor leaf; expected tensors only")
    return State(**{name: data[name] for name in STATE_KEYS}, d=DState(**{f: d[f] for f in D_STATE_FIELDS}))


def to_optimizer_state_dict(state: State, hparams: Hyperparams) -> dict[str, Any]:
    """``state`` as a ``KProdigy.state_dict()`` of one param group (``hparams``), params numbered
    0..n-1, tensors copied; load it with ``KProdigy(params_in_leaf_order).load_state_dict(sd)``."""
    check_state(state)
    leaves = {name: None if (v := getattr(state, name)) is None else pytree.tree_leaves(v) for name in STATE_KEYS}
    n = len(leaves["exp_avg_sq"] or [])
    if (leaves["exp_avg"] is None) != (hparams.betas[0] == 0):
        raise ValueError(f"state.exp_avg presence does not match betas[0]={hparams.betas[0]}")
    scalars = torch.stack([getattr(state.d, key).detach().to("cpu", torch.float64) for key in D_FLOATS])
    if scalars.dim() != 1:
        raise ValueError(
            f"state.d holds D of shape {tuple(state.d.d.shape)}; convert one ensemble member at a time "
            "(e.g. torch.utils._pytree.tree_map(lambda t: t[i], state))"
        )
    k = int(state.d.k)
    tensors = {name: ts for name, ts in leaves.items() if ts is not None}
    per_param = {i: {**{name: ts[i].detach().clone() for name, ts in tensors.items()}, "step": k} for i in range(n)}
    group: dict[str, Any] = {name: getattr(hparams, name) for name in Hyperparams.field_names()}
    group.update(zip(D_FLOATS, scalars.tolist()))
    group.update(k=k, skipped_steps=int(state.d.skipped_steps), d0=hparams.d0, params=list(range(n)))
    return {"state": per_param, "param_groups": [group]}


def from_optimizer_state_dict(
    state_dict: Mapping[str, Any], *, groups: int | Sequence[int] | None = None, like: Any = None
) -> State:
    """The functional ``State`` of one D-group of a ``KProdigy.state_dict()``, tensors copied.

    groups: the indices of the D-group's param groups (default: all, which must hold one D).
    like: a pytree of params (e.g. ``dict(model.named_parameters())``) whose structure the state
        takes, leaves in the groups' param order (default: a list). Hyperparameters:
        ``Hyperparams.from_mapping(state_dict["param_groups"][i])``.
    """
    all_groups = list(state_dict["param_groups"])
    idx = list(range(len(all_groups))) if groups is None else [groups] if isinstance(groups, int) else list(groups)
    if not idx or any(not 0 <= i < len(all_groups) for i in idx):
        raise ValueError(f"groups={groups!r} does not index the {len(all_groups)} param groups")
    chosen = [all_groups[i] for i in idx]
    lead = chosen[0]
    for i, g in zip(idx[1:], chosen[1:]):
        if any(float(g[key]) != float(lead[key]) for key in D_FLOATS) or int(g["k"]) != int(lead["k"]):
            raise ValueError(
                f"param groups {idx[0]} and {i} hold different D estimates (independent D); "
                "convert one D-group at a time with groups=[...]"
            )
    for key, why in (("d_frozen", "D is frozen (d_steps): s and p0 were freed"), ("factored", "factored=True")):
        if any(g.get(key) for g in chosen):
            raise ValueError(f"the functional state has no form for a group with {why}; convert groups without it")
    names = STATE_KEYS if Hyperparams.from_mapping(lead).betas[0] > 0 else STATE_KEYS[1:]  # (exp_avg if b1 > 0)
    ids = [pid for g in chosen for pid in g["params"]]
    fields: dict[str, list[Tensor]] = {name: [] for name in names}
    for pid in ids:
        entry = state_dict["state"].get(pid)
        if entry is None or "exp_avg_sq" not in entry:
            raise ValueError(
                f"param {pid} has no optimizer state (it never had a gradient); the functional state "
                "needs every param: take one optimizer step with all gradients first"
            )
        for name in names:
            if name not in entry:
                raise ValueError(f"param {pid} lacks state {name!r}")
            fields[name].append(entry[name].detach().clone())
    if not ids:
        raise ValueError(f"param groups {idx} hold no params")
    device = fields["exp_avg_sq"][0].device
    host = DState.of([lead[key] for key in D_FLOATS], lead["k"], lead.get("skipped_steps", 0))
    spec = pytree.tree_structure(like) if like is not None else pytree.tree_structure(fields["exp_avg_sq"])
    if spec.num_leaves != len(ids):
        raise ValueError(f"like has {spec.num_leaves} tensors but the param groups hold {len(ids)} params")
    mirror: dict[str, Any] = {"exp_avg": None, **{k: pytree.tree_unflatten(ts, spec) for k, ts in fields.items()}}
    return State(**mirror, d=host.on_device(device, d_dtype(device)))


def _check_plain(value: Any, where: str) -> None:
    if value is None or isinstance(value, Tensor):
        return
    if type(value) not in (list, tuple, dict):
        raise TypeError(
            f"state.{where} is a {type(value).__name__}; the plain-dict form keeps lists, tuples and dicts "
            "only (what torch.load(weights_only=True) reads): build the state from params in such containers"
        )
    items = value.values() if isinstance(value, dict) else value
    for i, item in enumerate(items):
        _check_plain(item, f"{where}[{i}]")


def check_optimizer_state_dict(
    state_dict: Any, param_groups: Sequence[dict[str, Any]], defaults: dict[str, Any]
) -> dict[Any, tuple[Tensor, Hyperparams]]:
    """Validate a whole ``KProdigy.state_dict()`` against an optimizer's param groups before it loads:
    ValueError naming the group, param and key (missing keys, wrong shapes, non-floating or
    non-finite state, invalid hyperparameters or D values, another param layout). Returns the map
    saved param id -> (param, the saved group's Hyperparams)."""
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("checkpoint is not an optimizer state_dict: expected a dict with 'state' and 'param_groups'")
    saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
    if not isinstance(saved_groups, (list, tuple)) or not isinstance(saved_state, dict):
        raise ValueError("checkpoint 'param_groups' must be a list and 'state' a dict")
    layout = "a different param layout"
    if len(saved_groups) != len(param_groups):
        n, mine = len(saved_groups), len(param_groups)
        raise ValueError(f"checkpoint has {n} param groups but the optimizer has {mine}; {layout}")
    id_map: dict[Any, tuple[Tensor, Hyperparams]] = {}
    frozen: set[Any] = set()  # ids of params whose group froze D (d_steps): s and p0 were freed
    for i, (saved, group) in enumerate(zip(saved_groups, param_groups)):
        where = f"checkpoint param group {i}"
        if not isinstance(saved, dict) or "params" not in saved:
            raise ValueError(f"{where} is not a dict with a 'params' list")
        if len(saved["params"]) != len(group["params"]):
            n, mine = len(saved["params"]), len(group["params"])
            raise ValueError(f"{where} has {n} params but the optimizer's has {mine}; {layout}")
        try:
            hp = Hyperparams.from_mapping({**defaults, **saved})
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        for key, rule, expected in _D_KEY_RULES:
            if key in saved and not rule(saved[key]):
                raise ValueError(f"{where}: {key}={saved[key]!r}; expected {expected}")
        for pid, p in zip(saved["params"], group["params"]):
            if pid in id_map:
                raise ValueError(f"checkpoint lists param id {pid!r} in more than one place")
            id_map[pid] = (p, hp)
            if saved.get("d_frozen"):
                frozen.add(pid)
    for pid, st in saved_state.items():
        if pid not in id_map and not isinstance(pid, int):
            continue  # not a param index: torch keeps such entries as they are (``Optimizer.state_dict``)
        if pid not in id_map:
            raise ValueError(f"checkpoint has state for param id {pid!r}, which no param group lists; {layout}")
        _check_param_state(pid, st, *id_map[pid], d_frozen=pid in frozen)
    return id_map


def _check_param_state(pid: Any, st: Any, p: Tensor, hp: Hyperparams, *, d_frozen: bool) -> None:
    where = f"checkpoint state of param id {pid!r} (shape {tuple(p.shape)})"
    if not isinstance(st, dict):
        raise ValueError(f"{where} is a {type(st).__name__}; expected a dict")
    if not st:
        return  # a param that never stepped
    required = ("exp_avg_sq",) + (() if d_frozen else ("s", "p0")) + (("exp_avg",) if hp.betas[0] > 0 else ())
    missing = [key for key in required if key not in st]
    if missing:
        raise ValueError(f"{where} is missing {missing}; is it a Prodigy/KProdigy checkpoint?")
    for key in (k for k in STATE_KEYS if k in st):
        t = st[key]
        if not isinstance(t, Tensor):
            raise ValueError(f"{where}: {key} is a {type(t).__name__}; expected a tensor")
        int8 = key in _formats.MOMENTS and t.dtype == torch.uint8  # int8 blocks (``_formats``)
        if int8 and t.shape != (_formats.int8_nbytes(p.numel()),):
            want = _formats.int8_nbytes(p.numel())
            raise ValueError(f"{where}: {key} holds {t.numel()} bytes of int8 blocks; expected {want}")
        if not t.is_floating_point() and not int8:
            raise ValueError(f"{where}: {key} has dtype {t.dtype}; expected a floating dtype (or int8 blocks)")
        if not int8 and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: {key} holds NaN or inf")
    if "exp_avg" in st and st["exp_avg"].shape != p.shape and st["exp_avg"].dtype != torch.uint8:
        raise ValueError(f"{where}: exp_avg has shape {tuple(st['exp_avg'].shape)}; expected the param's shape")
    v = st["exp_avg_sq"]
    packed = p.dim() >= 2 and v.shape == (math.prod(p.shape[:-1]) + p.shape[-1],)  # factored=True: [rows, cols]
    if v.shape != p.shape and not packed and v.dtype != torch.uint8:
        raise ValueError(
            f"{where}: exp_avg_sq has shape {tuple(v.shape)}; expected the param's shape "
            "(or the packed row and column statistics of factored=True)"
        )
    if is_dtensor(p) or d_frozen:
        return  # s and p0 of DTensor params may be per-rank shards; a frozen D freed them
    n = (p.numel() + hp.slice_p - 1) // hp.slice_p
    if st["s"].numel() != n:
        got, sp = st["s"].numel(), hp.slice_p
        raise ValueError(f"{where}: s has {got} elements; expected {n} (the param's elements with slice_p={sp})")
    if st["p0"].numel() != n and st["p0"].dim() != 0:
        raise ValueError(f"{where}: p0 has {st['p0'].numel()} elements; expected {n} or a 0-dim zero")


def _finite_number(v: Any) -> bool:
    if isinstance(v, Tensor):
        return v.numel() == 1 and v.is_floating_point() and bool(torch.isfinite(v))
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v: Any) -> bool:
    if isinstance(v, Tensor):
        return v.numel() == 1 and not v.is_floating_point() and not v.is_complex()
    return isinstance(v, int) and not isinstance(v, bool)


_Rule = tuple[str, Callable[[Any], bool], str]  # a group key, its test, what it expects
_D_KEY_RULES: list[_Rule] = [(k, _finite_number, "a finite number") for k in (*D_FLOATS, "d0")]
_D_KEY_RULES += [(k, lambda v: float(v) > 0, "a number > 0") for k in ("d", "d_max", "d0")]
_D_KEY_RULES += [(k, lambda v: _integer(v) and int(v) >= 0, "an integer >= 0") for k in ("k", "skipped_steps")]
