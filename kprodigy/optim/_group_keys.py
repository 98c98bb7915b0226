"""The D keys of the param groups, which trainers and loggers read (prodigyopt's: ``d``,
``d_max``, ``d_numerator``, ``d_denom``, ``d_hat``, ``k``; ours: ``skipped_steps``; the step
keys ``effective_lr``, the lr multiplier without D as prodigy-plus-schedule-free defines it,
and ``step_size``, the step the last step applied), and their one reader and one writer.

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

__all__ = ["FLOAT_D_KEYS", "STEP_KEYS", "bind", "fresh_d_keys", "read", "step_count", "to_numbers", "write"]

FLOAT_D_KEYS = D_STATE_FIELDS[:5]  # ("d", "d_max", "d_numerator", "d_denom", "d_hat")


def fresh_d_keys(d0: float) -> dict[str, Any]:
    """The D keys of a group that has not stepped, starting from ``d0``."""
    return {"d": d0, "d0": d0, "d_max": d0, "d_numerator": 0.0, "d_denom": 0.0, "d_hat": 0.0, "k": 0, "skipped_steps": 0}


def read(lead: dict[str, Any]) -> DState:
    """A D-group's D state from its first group's keys: Python numbers, or the bound tensors."""
    return DState(lead["d"], lead["d_max"], lead["d_numerator"], lead["d_denom"], lead["d_hat"], lead["k"], lead["skipped_steps"])


STEP_KEYS = ("effective_lr", "step_size")


def write(groups: list[dict[str, Any]], hps: list[Hyperparams], old: DState, new: DState, stepped: bool) -> None:
    """The new D state into every group of a D-group (in place for capturable tensors) and, when
    the D-group ``stepped``, each group's ``effective_lr = lr * bias_correction`` (the multiplier
    of D) and ``step_size = d * effective_lr`` (the step applied, with D before the step)."""
    effs = [hp.lr * bias_correction(hp, old.k) for hp in hps] if stepped else []
    steps = [(eff, old.d * eff) for eff in effs]
    if isinstance(groups[0]["d"], Tensor):
        for key in D_STATE_FIELDS:
            groups[0][key].copy_(getattr(new, key))
        for group, values in zip(groups, steps):
            for key, value in zip(STEP_KEYS, values):
                group[key].copy_(value)
        return
    new_values = {key: getattr(new, key) for key in D_STATE_FIELDS}
    for group in groups:
        group.update(new_values)
    for group, values in zip(groups, steps):
        group.update(zip(STEP_KEYS, values))


def bind(groups: list[dict[str, Any]], device: torch.device, seen: set[int]) -> None:
    """Capturable: hold a D-group's D state in its groups' keys as persistent 0-dim tensors on
    ``device`` (``d_dtype``; counts int64), the same objects in every group (the first group's
    values win), never shared with another D-group (``seen``: ids already bound); and one
    tensor per group for each step key. Tensors already bound there are kept (no host read)."""
    lead, dtype = groups[0], d_dtype(device)

    def bound(value: Any, dt: torch.dtype) -> bool:
        return isinstance(value, Tensor) and value.device == device and value.dtype == dt and id(value) not in seen

    if not all(bound(lead[key], torch.int64 if key in ("k", "skipped_steps") else dtype) for key in D_STATE_FIELDS):
        fresh = DState.of([lead[key] for key in FLOAT_D_KEYS], lead["k"], lead["skipped_steps"])
        lead.update({key: t.clone() for key, t in zip(D_STATE_FIELDS, _fields(fresh.on_device(device, dtype)))})
    seen.update(id(lead[key]) for key in D_STATE_FIELDS)
    for group in groups:
        group.update({key: lead[key] for key in D_STATE_FIELDS})
        for key in STEP_KEYS:
            if not bound(group[key], dtype):
                group[key] = torch.tensor(float(group[key]), dtype=dtype, device=device)
            seen.add(id(group[key]))


def _fields(ds: DState) -> list[Any]:
    return [getattr(ds, key) for key in D_STATE_FIELDS]


def to_numbers(group: dict[str, Any]) -> None:
    """A group's D keys as Python numbers, in place (tensors are read on the host)."""
    for key in (*FLOAT_D_KEYS, *STEP_KEYS):
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
