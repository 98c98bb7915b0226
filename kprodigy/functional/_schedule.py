"""When D adapts: the D schedule, stated once for the core and the optimizer shell.

- ``d_update_freq``: the D statistics (and D) are updated on the steps whose count ``k`` (before
  the step) is a multiple of it; other steps move the params with the D they have.
- ``d_steps``: D is frozen once ``k >= d_steps`` (no statistics; the shell frees ``s`` and ``p0``).
- ``d_ratio_cap``: after a step, each D-group's D is kept within this factor of the smallest.

The step count is a Python int where the host knows it (the default mode) or a 0-dim int64
tensor (``capturable``, the pure step), where the rule is decided on the device, branch-free.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._scalars import in_dtype

__all__ = ["cap_d_ratio", "cap_d_ratio_host", "frozen", "updates_d"]


def frozen(d_steps: int | None, k: int) -> bool:
    """Whether D no longer adapts at step count ``k`` (``d_steps`` reached)."""
    return d_steps is not None and k >= d_steps


def updates_d(d_update_freq: int, k: int | Tensor, d_steps: int | None = None) -> bool | Tensor:
    """Whether the step from step count ``k`` updates D: ``k % d_update_freq == 0`` and D not
    frozen. A bool for an int ``k``; for a tensor ``k`` a 0-dim bool tensor on its device, or True
    when ``d_update_freq == 1`` (``d_steps`` needs the host: not with a tensor ``k``)."""
    if isinstance(k, Tensor):
        if d_steps is not None:
            raise ValueError("d_steps needs the step count on the host; got a tensor k")
        return True if d_update_freq == 1 else (k % d_update_freq) == 0
    return not frozen(d_steps, k) and k % d_update_freq == 0


def cap_d_ratio(ds: Sequence[Tensor], ratio: float) -> list[Tensor]:
    """Keep D values within ``ratio`` of the smallest: ``d_i <- min(d_i, ratio * min_j d_j)``.

    ds: 0-dim tensors (any devices; the result of each stays on its own device). ratio >= 1.
    Since every d_j never decreases, a capped d never decreases either.
    """
    if not ds:
        return []
    device = ds[0].device
    floor = torch.stack([d.to(device, torch.float64) for d in ds]).min() * ratio
    return [torch.minimum(d, floor.to(d.device, d.dtype)) for d in ds]


def cap_d_ratio_host(ds: Sequence[float], ratio: float, dtypes: Sequence[torch.dtype]) -> list[float]:
    """``cap_d_ratio`` on D values held on the host: the floor in float64, rounded to each
    D-group's statistics dtype (``dtypes``, aligned with ``ds``) as the tensor version's ``.to``."""
    floor = min(ds) * ratio
    return [min(d, in_dtype([floor], dtype)[0]) for d, dtype in zip(ds, dtypes)]
