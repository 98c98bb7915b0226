"""Validation of what users hand to ``KProdigy``: param groups, settings (also as a scheduler
changed them), D-group agreement and gradients (checkpoints: ``functional._checkpoint``). Every
check runs before the optimizer changes anything and names the problem; host metadata only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..functional import Hyperparams
from ..functional._distributed import is_dtensor
from ..functional._hyperparams import D_CONFIG, hparams

__all__ = ["check_d_group_agrees", "check_grads", "check_group", "check_param_group", "check_settings", "hparams"]
__all__ += ["one_device"]


def check_param_group(param_group: dict[str, Any], existing: Sequence[dict[str, Any]]) -> None:
    """A new group may be empty (as torch allows: HF Trainer builds an empty no-decay group when only
    LoRA weights train) but holds no tensor twice, none already in ``existing``, no complex one.
    ``params`` becomes a list (a generator is consumed by the checks); ``(name, tensor)`` pairs
    are split into the tensors and ``param_names``, as ``torch.optim.Optimizer`` does."""
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
                    f"param group entry {seen[id(p)]} is already in param group {j}; "
                    "a parameter may be in one group only"
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
        st = state.get(p, {})
        m = st.get("exp_avg")  # (param-shaped, but as int8 blocks)
        if isinstance(m, Tensor) and m.dtype != torch.uint8 and m.shape != p.shape and not is_dtensor(p):
            raise ValueError(
                f"{where} has shape {tuple(p.shape)} but its state was made for shape {tuple(m.shape)} (was "
                "p.data replaced by a tensor of another shape?); reset its state (del optimizer.state[p]) "
                "or keep its shape"
            )
        s = st.get("s")
        if s is not None and not is_dtensor(p) and s.numel() != (p.numel() + slice_p - 1) // slice_p:
            raise ValueError(
                f"slice_p={slice_p} does not match the state of {where} ({p.numel()} elements, s has "
                f"{s.numel()}); slice_p cannot change after the first step, nor the param's size"
            )


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


def check_group(group: dict[str, Any], i: int, where: str = "param group") -> Hyperparams:
    """``check_settings`` naming the group in its ValueError."""
    try:
        return check_settings(group)
    except ValueError as e:
        raise ValueError(f"{where} {i}: {e}") from None


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
