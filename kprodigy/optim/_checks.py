"""Validation of what users hand to ``KProdigy``: param groups, settings (also as a scheduler
changed them), D-group agreement, gradients and checkpoints.

Every check runs before the optimizer changes anything and raises an error that names the
problem, so a rejected input leaves the optimizer exactly as it was. Host-side metadata only
(shapes, dtypes, devices), except checkpoint values, which are read once at load time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..functional import Hyperparams
from ..functional._distributed import is_dtensor
from ..functional._hyperparams import D_CONFIG

__all__ = [
    "check_d_group_agrees",
    "check_grads",
    "check_param_group",
    "check_settings",
    "check_state_dict",
    "hparams",
    "one_device",
]

_PER_TENSOR_KEYS = ("exp_avg", "exp_avg_sq", "s", "p0")
_D_FLOAT_KEYS = ("d", "d_max", "d_numerator", "d_denom", "d_hat", "d0")
_D_INT_KEYS = ("k", "skipped_steps")


def check_param_group(param_group: dict[str, Any], existing: Sequence[dict[str, Any]]) -> None:
    """A new group may be empty (torch accepts it: HF Trainer builds an empty no-decay group when
    only LoRA weights train) but holds no tensor twice, none already in ``existing``, and no
    complex tensor. ``param_group["params"]`` is materialized into a list (it may be a
    generator, which the checks consume); ``(name, tensor)`` pairs (``named_parameters()``) are
    split into the tensors and ``param_group["param_names"]``, as ``torch.optim.Optimizer`` does."""
    params = param_group.get("params")
    if params is None:
        raise ValueError("param group has no 'params' key; expected dict(params=[...], ...)")
    if isinstance(params, Tensor):
        params = [params]
    elif isinstance(params, set):
        raise TypeError("param group 'params' is a set, whose order changes between runs; use a list")
    else:
        params = list(params)
    names = [p[0] for p in params if isinstance(p, tuple)]
    if names and len(names) != len(params):
        raise ValueError("all optimizer params should be with/without names. Some param names are missing")
    if names:
        params = [p[1] for p in params]
        param_group["param_names"] = names
    for group in existing:  # torch.optim's rule and message
        if ("param_names" in param_group) != ("param_names" in group):
            current = "with names" if "param_names" in param_group else "without names"
            raise ValueError(
                "all optimizer param groups should be with/without names. "
                f"cannot add param group {current} to the optimizer"
            )
    param_group["params"] = params
    seen: dict[int, int] = {}
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"param group entry {i} is a {type(p).__name__}; KProdigy optimizes only Tensors")
        if id(p) in seen:
            raise ValueError(
                f"param group lists the same tensor twice (entries {seen[id(p)]} and {i}); list each parameter once"
            )
        seen[id(p)] = i
        if torch.is_complex(p):
            raise ValueError(
                f"param group entry {i} is complex ({p.dtype}); KProdigy needs real params: use torch.view_as_real"
            )
    for j, group in enumerate(existing):
        for p in group["params"]:
            if id(p) in seen:
                raise ValueError(
                    f"param group entry {seen[id(p)]} is already in param group {j}; a parameter may be in one group only"
                )


def check_grads(group: dict[str, Any], index: int, state: dict[Tensor, dict[str, Any]]) -> None:
    """The gradients of one group: dense, real, shaped like their params, state matching slice_p."""
    slice_p = group["slice_p"]
    for j, p in enumerate(group["params"]):
        g = p.grad
        if g is None:
            continue
        where = f"param {j} of param group {index}"
        if g.is_sparse:
            raise RuntimeError(
                f"KProdigy does not support sparse gradients ({where}); use dense gradients "
                "(e.g. sparse=False in nn.Embedding)"
            )
        if torch.is_complex(p) or torch.is_complex(g):
            raise RuntimeError(
                f"KProdigy does not support complex parameters ({where}); view them as real with torch.view_as_real"
            )
        if g.shape != p.shape:
            raise RuntimeError(
                f"a gradient of shape {tuple(g.shape)} belongs to a parameter of shape {tuple(p.shape)} ({where})"
            )
        s = state.get(p, {}).get("s")
        if s is not None and not is_dtensor(p) and s.numel() != (p.numel() + slice_p - 1) // slice_p:
            raise ValueError(
                f"slice_p={slice_p} does not match the state of {where} ({p.numel()} elements, s has "
                f"{s.numel()}); slice_p cannot change after the first step"
            )


def check_state_dict(
    state_dict: Any, param_groups: Sequence[dict[str, Any]], defaults: dict[str, Any]
) -> dict[Any, tuple[Tensor, Hyperparams]]:
    """Validate a whole checkpoint against the optimizer's param layout before loading it.

    Returns the map saved param id -> (param, the saved group's Hyperparams). Raises ValueError
    naming the group, param and key for missing keys, wrong shapes, non-floating or non-finite
    state, invalid hyperparameters or D values, or a different param layout.
    """
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("checkpoint is not an optimizer state_dict: expected a dict with 'state' and 'param_groups'")
    saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
    if not isinstance(saved_groups, (list, tuple)) or not isinstance(saved_state, dict):
        raise ValueError("checkpoint 'param_groups' must be a list and 'state' a dict")
    if len(saved_groups) != len(param_groups):
        raise ValueError(
            f"checkpoint has {len(saved_groups)} param groups but the optimizer has {len(param_groups)}; "
            "a different param layout"
        )
    id_map: dict[Any, tuple[Tensor, Hyperparams]] = {}
    frozen: set[Any] = set()  # ids of params whose group froze D (d_steps): s and p0 were freed
    for i, (saved, group) in enumerate(zip(saved_groups, param_groups)):
        if not isinstance(saved, dict) or "params" not in saved:
            raise ValueError(f"checkpoint param group {i} is not a dict with a 'params' list")
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"checkpoint param group {i} has {len(saved['params'])} params but the optimizer's has "
                f"{len(group['params'])}; a different param layout"
            )
        try:
            hp = Hyperparams.from_mapping({**defaults, **saved})
        except ValueError as e:
            raise ValueError(f"checkpoint param group {i}: {e}") from None
        for key in _D_FLOAT_KEYS:
            if key in saved and not _finite_number(saved[key]):
                raise ValueError(f"checkpoint param group {i}: {key}={saved[key]!r}; expected a finite number")
        for key in ("d", "d_max", "d0"):
            if key in saved and float(saved[key]) <= 0:
                raise ValueError(f"checkpoint param group {i}: {key}={saved[key]!r}; expected a number > 0")
        for key in _D_INT_KEYS:
            if key in saved and not (_integer(saved[key]) and int(saved[key]) >= 0):
                raise ValueError(f"checkpoint param group {i}: {key}={saved[key]!r}; expected an integer >= 0")
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
            raise ValueError(
                f"checkpoint has state for param id {pid!r}, which no param group lists; a different param layout"
            )
        p, hp = id_map[pid]
        _check_tensor_state(pid, st, p, hp, d_frozen=pid in frozen)
    return id_map


def _check_tensor_state(pid: Any, st: Any, p: Tensor, hp: Hyperparams, *, d_frozen: bool) -> None:
    where = f"checkpoint state of param id {pid!r} (shape {tuple(p.shape)})"
    if not isinstance(st, dict):
        raise ValueError(f"{where} is a {type(st).__name__}; expected a dict")
    if not st:
        return  # a param that never stepped
    required = ("exp_avg_sq",) + (() if d_frozen else ("s", "p0")) + (("exp_avg",) if hp.betas[0] > 0 else ())
    missing = [key for key in required if key not in st]
    if missing:
        raise ValueError(f"{where} is missing {missing}; is it a Prodigy/KProdigy checkpoint?")
    for key in _PER_TENSOR_KEYS:
        if key not in st:
            continue
        t = st[key]
        if not isinstance(t, Tensor):
            raise ValueError(f"{where}: {key} is a {type(t).__name__}; expected a tensor")
        if not t.is_floating_point():
            raise ValueError(f"{where}: {key} has dtype {t.dtype}; expected a floating dtype")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: {key} holds NaN or inf")
    if "exp_avg" in st and st["exp_avg"].shape != p.shape:
        raise ValueError(f"{where}: exp_avg has shape {tuple(st['exp_avg'].shape)}; expected the param's shape")
    v = st["exp_avg_sq"]
    packed = p.dim() >= 2 and v.shape == (p.numel() // p.shape[-1] + p.shape[-1],)  # factored=True: [rows, cols]
    if v.shape != p.shape and not packed:
        raise ValueError(
            f"{where}: exp_avg_sq has shape {tuple(v.shape)}; expected the param's shape "
            "(or the packed row and column statistics of factored=True)"
        )
    if is_dtensor(p) or d_frozen:
        return  # s and p0 of DTensor params may be per-rank shards; a frozen D freed them
    n = (p.numel() + hp.slice_p - 1) // hp.slice_p
    if st["s"].numel() != n:
        raise ValueError(
            f"{where}: s has {st['s'].numel()} elements; expected {n} (the param's elements with slice_p={hp.slice_p})"
        )
    p0 = st["p0"]
    if p0.numel() != n and p0.dim() != 0:
        raise ValueError(f"{where}: p0 has {p0.numel()} elements; expected {n} or a 0-dim zero")


def _finite_number(v: Any) -> bool:
    if isinstance(v, Tensor):
        return v.numel() == 1 and v.is_floating_point() and bool(torch.isfinite(v))
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v: Any) -> bool:
    if isinstance(v, Tensor):
        return v.numel() == 1 and not v.is_floating_point() and not v.is_complex()
    return isinstance(v, int) and not isinstance(v, bool)


def check_settings(group: dict[str, Any]) -> Hyperparams:
    """Every setting of a param group (at construction, in ``add_param_group`` and at each step,
    where a scheduler may have set them): ValueError naming the key and value (torch.optim's
    RuntimeError for ``fused`` and ``foreach`` both True). Returns its ``Hyperparams``."""
    if isinstance(group.get("lr"), Tensor):  # lr multiplies D, which the shell keeps on the host
        raise ValueError(
            "lr as a Tensor is not supported by KProdigy (lr is a multiplier of D); pass a Python float, "
            "e.g. lr=float(lr)"
        )
    hp = hparams(group)
    for key in ("foreach", "fused"):
        if group.get(key) is not None and not isinstance(group[key], bool):
            raise ValueError(f"Invalid {key}: {group[key]!r}; expected None, True or False")
    if group.get("fused") is True and group.get("foreach") is True:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    for key in ("factored", "fsdp_in_use", "capturable"):
        if not isinstance(group.get(key, False), bool):
            raise ValueError(f"Invalid {key}: {group[key]!r}; expected True or False")
    if group.get("capturable") and hp.d_steps is not None:
        raise ValueError(
            f"d_steps={hp.d_steps!r} is not supported with capturable=True (freezing D needs the "
            "step count on the host); use d_steps=None or capturable=False"
        )
    try:
        hash(group.get("d_group"))
    except TypeError:
        raise ValueError(f"Invalid d_group: {group['d_group']!r}; expected a hashable label such as a str") from None
    if group.get("d_frozen") and (hp.d_steps is None or group["k"] < hp.d_steps):
        raise ValueError(
            f"Invalid d_steps: {hp.d_steps!r}; D froze after d_steps steps (k={group['k']}) and its statistics "
            "were freed, so d_steps cannot be raised or removed after that"
        )
    return hp


def check_d_group_agrees(groups: list[dict[str, Any]], members: list[int]) -> None:
    """Groups sharing one D agree on the D settings (``Hyperparams.d_config``) and on capturable
    (how the D state is held)."""
    flags = [g["capturable"] for g in groups]
    if len(set(flags)) > 1:
        raise ValueError(
            f"param groups {members} share one D but have capturable={flags}; give them one value "
            "or different d_group labels"
        )
    hps = [hparams(g) for g in groups]
    for j, hp in zip(members[1:], hps[1:]):
        if hp.d_config() != hps[0].d_config():
            names = ", ".join(D_CONFIG)
            raise ValueError(
                f"Parameter groups {members[0]} and {j} share one D and must agree on {names}; got "
                f"{hps[0].d_config()} and {hp.d_config()}. Give them different d_group labels (or "
                "independent_d=True) for separate D values."
            )


def one_device(params: list[Tensor], members: list[int]) -> torch.device:
    device = params[0].device
    for p in params:
        if p.device != device:
            raise RuntimeError(
                f"param groups {members} share one D but hold params on {device} and {p.device}; "
                "put them on one device or use independent_d=True with one device per group"
            )
    return device


_HPARAMS: dict[tuple[Any, ...], Hyperparams] = {}  # validated Hyperparams by their group's values (a
# bounded memo of immutable values: like functools.lru_cache, it holds nothing else alive)
_HPARAMS_MAX = 256


def hparams(group: dict[str, Any]) -> Hyperparams:
    """``Hyperparams.from_mapping(group)``, validated once per distinct set of values (a scheduler
    changing lr or betas gives a new key). Keys carry the types (``True == 1`` must not hit)."""
    values = tuple(map(group.get, _HP_FIELDS, _MISSING))
    betas = values[_BETAS]
    try:
        key = (values, tuple(map(type, values)), tuple(map(type, betas)) if isinstance(betas, (tuple, list)) else None)
        hp = _HPARAMS.get(key)
    except TypeError:  # an unhashable value: validate it (and raise) without the cache
        return Hyperparams.from_mapping(group)
    if hp is None:
        # an lr schedule changes only lr: derive from the same values' last Hyperparams
        rest = key[0][:_LR] + key[0][_LR + 1 :], key[1][:_LR] + key[1][_LR + 1 :], key[2]
        same_rest = _BY_REST.get(rest) if values[_LR] is not _MISSING[0] else None
        hp = same_rest.with_lr(values[_LR]) if same_rest is not None else Hyperparams.from_mapping(group)
        if len(_HPARAMS) >= _HPARAMS_MAX:
            _HPARAMS.clear()
            _BY_REST.clear()
        _HPARAMS[key] = _BY_REST[rest] = hp
    return hp


_HP_FIELDS = Hyperparams.field_names()
_BETAS = _HP_FIELDS.index("betas")
_LR = _HP_FIELDS.index("lr")
_BY_REST: dict[tuple[Any, ...], Hyperparams] = {}  # the same, keyed by every value but lr
_MISSING = (object(),) * len(_HP_FIELDS)  # group.get's default: a missing key is not None
