"""The D keys of the param groups, which trainers and loggers read (prodigyopt's: ``d``,
``d_max``, ``d_numerator``, ``d_denom``, ``d_hat``, ``k``; ours: ``skipped_steps``,
``effective_lr``), and their conversion to and from the core's ``DState``.

Default mode: Python numbers, written once per step. ``capturable``: persistent 0-dim tensors on
the params' device (the same objects in every group of a D-group), updated in place.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..functional import DState, Hyperparams
from ..functional._partial import effective_lrs
from ..functional._state import D_STATE_FIELDS

__all__ = [
    "FLOAT_D_KEYS",
    "bound",
    "d_dtype",
    "fresh_d_keys",
    "host_d_keys",
    "new_d_state",
    "record_in_place",
    "step_count",
    "to_numbers",
]

FLOAT_D_KEYS = ("d", "d_max", "d_numerator", "d_denom", "d_hat")


def record_in_place(groups: list[dict[str, Any]], states: list[dict[str, Any]], old: DState, new: DState) -> None:
    """Capturable: copy the new D state and effective_lr into the D-group's tensors and advance the
    stepped params' ``step``, all on the device. ``old`` holds those tensors: it is read first."""
    lrs = effective_lrs([Hyperparams.from_mapping(g) for g in groups], old)
    steps = [state["step"] for state in states]
    if steps:
        torch._foreach_add_(steps, new.k - old.k)  # 0 on a skipped step
    for key in D_STATE_FIELDS:
        groups[0][key].copy_(getattr(new, key))
    for group, lr in zip(groups, lrs):
        group["effective_lr"].copy_(lr)


def new_d_state(lead: dict[str, Any], device: torch.device, dtype: torch.dtype) -> DState:
    """A D state of 0-dim tensors from a group's D keys (numbers, or tensors read on the host)."""
    packed = torch.tensor(
        [float(lead[key]) for key in FLOAT_D_KEYS], dtype=dtype, device=device
    )  # one host-to-device copy for the D state
    counts = torch.tensor([int(lead["k"]), int(lead["skipped_steps"])], dtype=torch.int64, device=device)
    return DState(**dict(zip(FLOAT_D_KEYS, packed.unbind())), **dict(zip(("k", "skipped_steps"), counts.unbind())))


def d_dtype(key: str, stats: torch.dtype) -> torch.dtype:
    """The dtype of a D key's tensor: int64 for the counts, else the statistics dtype."""
    return torch.int64 if key in ("k", "skipped_steps") else stats


def bound(value: Any, device: torch.device, dtype: torch.dtype, seen: set[int]) -> bool:
    """Whether a group key already is a persistent tensor of this placement, not bound elsewhere."""
    return isinstance(value, Tensor) and value.device == device and value.dtype == dtype and id(value) not in seen


def to_numbers(group: dict[str, Any]) -> None:
    """A group's D keys as Python numbers, in place (tensors are read on the host)."""
    for key in (*FLOAT_D_KEYS, "effective_lr"):
        group[key] = float(group[key])
    for key in ("k", "skipped_steps"):
        group[key] = int(group[key])


def step_count(value: Any, p: Tensor, capturable: bool) -> Any:
    """``state[p]["step"]``: an int, or an int64 0-dim tensor on p's device when capturable."""
    if not capturable:
        return int(value)
    if isinstance(value, Tensor) and value.device == p.device and value.dtype == torch.int64:
        return value
    return torch.tensor(int(value), dtype=torch.int64, device=p.device)


def fresh_d_keys(d0: float) -> dict[str, Any]:
    """The D keys of a group that has not stepped, starting from ``d0``."""
    return {
        "d": d0,
        "d0": d0,
        "d_max": d0,
        "d_numerator": 0.0,
        "d_denom": 0.0,
        "d_hat": 0.0,
        "k": 0,
        "skipped_steps": 0,
    }


def host_d_keys(d: Any) -> dict[str, float]:
    """The float D keys of a host-held D state (``functional._native.HostD``)."""
    return {key: getattr(d, key) for key in FLOAT_D_KEYS}
