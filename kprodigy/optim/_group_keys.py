"""The D keys of the param groups, which trainers and loggers read (prodigyopt's: ``d``,
``d_max``, ``d_numerator``, ``d_denom``, ``d_hat``, ``k``; ours: ``skipped_steps``,
``effective_lr``), and their one reader and one writer (``read``, ``write``).

Default mode: Python numbers, written once per step. ``capturable``: persistent 0-dim tensors on
the params' device (the same objects in every group of a D-group), updated in place.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..functional import DState, Hyperparams
from ..functional._scalars import bias_correction
from ..functional._state import D_STATE_FIELDS, d_dtype

__all__ = ["FLOAT_D_KEYS", "bind", "fresh_d_keys", "read", "step_count", "to_numbers", "write"]

FLOAT_D_KEYS = D_STATE_FIELDS[:5]  # ("d", "d_max", "d_numerator", "d_denom", "d_hat")


def fresh_d_keys(d0: float) -> dict[str, Any]:
    """The D keys of a group that has not stepped, starting from ``d0``."""
    return {"d": d0, "d0": d0, "d_max": d0, "d_numerator": 0.0, "d_denom": 0.0, "d_hat": 0.0, "k": 0, "skipped_steps": 0}


def read(lead: dict[str, Any]) -> DState:
    """A D-group's D state from its first group's keys: Python numbers, or the bound tensors."""
    return DState(lead["d"], lead["d_max"], lead["d_numerator"], lead["d_denom"], lead["d_hat"], lead["k"], lead["skipped_steps"])


def write(groups: list[dict[str, Any]], hps: list[Hyperparams], old: DState, new: DState, stepped: bool) -> None:
    """The new D state into every group of a D-group (in place for capturable tensors), and each
    group's ``effective_lr`` (the step size ``d * lr * bias_correction`` the step applied, from
    the D state before it) when the D-group ``stepped``."""
    lrs = [old.d * (hp.lr * bias_correction(hp, old.k)) for hp in hps] if stepped else []
    if isinstance(groups[0]["d"], Tensor):
        for key in D_STATE_FIELDS:
            groups[0][key].copy_(getattr(new, key))
        for group, lr in zip(groups, lrs):
            group["effective_lr"].copy_(lr)
        return
    values = {key: getattr(new, key) for key in D_STATE_FIELDS}
    for group in groups:
        group.update(values)
    for group, lr in zip(groups, lrs):
        group["effective_lr"] = lr


def bind(groups: list[dict[str, Any]], device: torch.device, seen: set[int]) -> None:
    """Capturable: hold a D-group's D state in its groups' keys as persistent 0-dim tensors on
    ``device`` (``d_dtype``; counts int64), the same objects in every group (the first group's
    values win), never shared with another D-group (``seen``: ids already bound); and one
    ``effective_lr`` tensor per group. Tensors already bound there are kept (no host read)."""
    lead, dtype = groups[0], d_dtype(device)

    def bound(value: Any, dt: torch.dtype) -> bool:
        return isinstance(value, Tensor) and value.device == device and value.dtype == dt and id(value) not in seen

    if not all(bound(lead[key], torch.int64 if key in ("k", "skipped_steps") else dtype) for key in D_STATE_FIELDS):
        fresh = DState.of([lead[key] for key in FLOAT_D_KEYS], lead["k"], lead["skipped_steps"])
        lead.update({key: t.clone() for key, t in zip(D_STATE_FIELDS, _fields(fresh.on_device(device, dtype)))})
    seen.update(id(lead[key]) for key in D_STATE_FIELDS)
    for group in groups:
        group.update({key: lead[key] for key in D_STATE_FIELDS})
        if not bound(group["effective_lr"], dtype):
            group["effective_lr"] = torch.tensor(float(group["effective_lr"]), dtype=dtype, device=device)
        seen.add(id(group["effective_lr"]))


def _fields(ds: DState) -> list[Any]:
    return [getattr(ds, key) for key in D_STATE_FIELDS]


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
