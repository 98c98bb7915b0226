"""The D keys of the param groups, which trainers and loggers read (prodigyopt's ``d``, ``d_max``,
``d_numerator``, ``d_denom``, ``d_hat``, ``k``; ``skipped_steps``; the step keys ``effective_lr``
and ``step_size``), and their one reader and one writer: Python numbers, or with ``capturable``
persistent 0-dim tensors on the params' device (shared by a D-group's groups), updated in place.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..functional import DState, Hyperparams
from ..functional._scalars import bias_correction
from ..functional._state import D_FLOATS, D_STATE_FIELDS, d_dtype

__all__ = ["STEP_KEYS", "bind", "fresh_d_keys", "read", "step_count", "to_numbers", "write"]

STEP_KEYS = ("effective_lr", "step_size")


def fresh_d_keys(d0: float) -> dict[str, Any]:
    """The D keys of a group that has not stepped, starting from ``d0``."""
    floats = {"d": d0, "d0": d0, "d_max": d0, "d_numerator": 0.0, "d_denom": 0.0, "d_hat": 0.0}
    return {**floats, "k": 0, "skipped_steps": 0}


def read(g: dict[str, Any]) -> DState:
    """A D-group's D state from its first group's keys: Python numbers, or the bound tensors."""
    return DState(g["d"], g["d_max"], g["d_numerator"], g["d_denom"], g["d_hat"], g["k"], g["skipped_steps"])


def write(groups: list[dict[str, Any]], hps: list[Hyperparams], old: DState, new: DState, stepped: bool) -> None:
    """The new D state into every group of a D-group (in place for capturable tensors) and, when it
    ``stepped``, each group's ``effective_lr = lr * bias_correction`` (the multiplier of D, as
    prodigy-plus-schedule-free defines it) and ``step_size = d * effective_lr`` (the step applied,
    with D before the step)."""
    effs = [hp.lr * bias_correction(hp, old.k) for hp in hps] if stepped else []
    steps = [(eff, old.d * eff) for eff in effs]
    if isinstance(groups[0]["d"], Tensor):
        for key in D_STATE_FIELDS:
            groups[0][key].copy_(getattr(new, key))
        for group, values in zip(groups, steps):
            for key, value in zip(STEP_KEYS, values):
                # (a host number filled in: copy_ would copy it from the host, a sync)
                group[key].copy_(value) if isinstance(value, Tensor) else group[key].fill_(value)
        return
    new_values = vars(new)  # (a dataclass's fields: D_STATE_FIELDS)
    for group in groups:
        group.update(new_values)
    for group, (eff, size) in zip(groups, steps):
        group["effective_lr"], group["step_size"] = eff, size


def bind(groups: list[dict[str, Any]], device: torch.device, seen: set[int]) -> None:
    """Capturable: a D-group's D keys as persistent 0-dim tensors on ``device`` (``d_dtype``; counts
    int64), the same objects in every group (the first group's values win), never another
    D-group's (``seen``: ids bound); a tensor per group for each step key. Bound ones are kept."""
    lead, dtype = groups[0], d_dtype(device)

    def bound(value: Any, dt: torch.dtype) -> bool:
        return isinstance(value, Tensor) and value.device == device and value.dtype == dt and id(value) not in seen

    if not all(bound(lead[key], torch.int64 if key in ("k", "skipped_steps") else dtype) for key in D_STATE_FIELDS):
        fresh = DState.of([lead[key] for key in D_FLOATS], lead["k"], lead["skipped_steps"]).on_device(device, dtype)
        lead.update({key: getattr(fresh, key).clone() for key in D_STATE_FIELDS})
    seen.update(id(lead[key]) for key in D_STATE_FIELDS)
    for group in groups:
        group.update({key: lead[key] for key in D_STATE_FIELDS})
        for key in STEP_KEYS:
            if not bound(group[key], dtype):
                group[key] = torch.tensor(float(group[key]), dtype=dtype, device=device)
            seen.add(id(group[key]))


def to_numbers(group: dict[str, Any]) -> None:
    """A group's D keys as Python numbers, in place (tensors are read on the host)."""
    for key in (*D_FLOATS, *STEP_KEYS):
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
