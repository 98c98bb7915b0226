"""Optimizer state as frozen dataclasses registered as pytrees."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from ._hyperparams import Hyperparams

__all__ = ["DState", "State", "init_state", "init_d_state", "init_tensor_state", "stat_dtype"]


@dataclass(frozen=True)
class DState:
    """State of one D estimate (one D-group). Every field is a 0-dim tensor on the params' device.

    Floating fields have the statistics dtype (float32, or float64 for float64 params).
    """

    d: Tensor  # current step-size scale D (>= d0, never decreases)
    d_max: Tensor  # largest D estimate seen so far
    d_numerator: Tensor  # beta3-EMA of sum (d/d0) * dlr * <g, p0 - x>
    d_denom: Tensor  # sum of ||s||_1 over the tensors, at the last D update
    d_hat: Tensor  # last raw estimate d_coef * d_numerator / d_denom
    k: Tensor  # int64 step count (number of steps taken)

    def replace(self, **changes: Tensor) -> DState:
        return replace(self, **changes)


@dataclass(frozen=True)
class State:
    """State of a list of tensors sharing one D. Lists are aligned with the params list.

    exp_avg:    like each param (stats dtype of the param), or None when betas[0] == 0
    exp_avg_sq: like each param
    s:          1-D, ``x.flatten()[::slice_p]`` sized
    p0:         the initial ``x.flatten()[::slice_p]``; a 0-dim zero when x started all zeros
    d:          the shared D state
    """

    exp_avg: list[Tensor] | None
    exp_avg_sq: list[Tensor]
    s: list[Tensor]
    p0: list[Tensor]
    d: DState


for _cls in (DState, State):
    pytree.register_dataclass(_cls)


def stat_dtype(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """Dtype of the D statistics for params of these dtypes: float64 if any is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def init_d_state(hparams: Hyperparams, device: torch.device | str, dtype: torch.dtype) -> DState:
    """A fresh D state: d = d_max = d0, statistics zero, k = 0."""

    def scalar(value: float) -> Tensor:
        return torch.tensor(value, dtype=dtype, device=device)

    d0 = hparams.d0
    return DState(
        d=scalar(d0),
        d_max=scalar(d0),
        d_numerator=scalar(0.0),
        d_denom=scalar(0.0),
        d_hat=scalar(0.0),
        k=torch.zeros((), dtype=torch.int64, device=device),
    )


def init_tensor_state(x: Tensor, hparams: Hyperparams) -> dict[str, Tensor]:
    """Per-tensor state for param ``x``, keyed as in prodigyopt (``exp_avg`` only if betas[0] > 0).

    Allocated detached, in the param's dtype and memory format. ``p0`` is a 0-dim zero when x is
    all zeros (LoRA up-projections), to save memory; that check reads x once, at init only.
    """
    x = x.detach()
    sliced = x.flatten()[:: hparams.slice_p]
    state: dict[str, Tensor] = {}
    if hparams.betas[0] > 0:
        state["exp_avg"] = torch.zeros_like(x, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(x, memory_format=torch.preserve_format)
    state["s"] = torch.zeros_like(sliced)
    state["p0"] = sliced.clone() if bool(x.any()) else torch.zeros((), dtype=x.dtype, device=x.device)
    return state


def init_state(params: Sequence[Tensor], hparams: Hyperparams) -> State:
    """Initial state for ``params`` (a list of tensors sharing one D)."""
    params = list(params)
    if not params:
        raise ValueError("init_state got an empty list of params; expected at least one tensor")
    device = params[0].device
    for i, x in enumerate(params):
        if x.device != device:
            raise ValueError(
                f"params[{i}] is on {x.device} but params[0] is on {device}; "
                "tensors sharing one D must be on one device"
            )
    per_tensor = [init_tensor_state(x, hparams) for x in params]
    return State(
        exp_avg=[t["exp_avg"] for t in per_tensor] if hparams.betas[0] > 0 else None,
        exp_avg_sq=[t["exp_avg_sq"] for t in per_tensor],
        s=[t["s"] for t in per_tensor],
        p0=[t["p0"] for t in per_tensor],
        d=init_d_state(hparams, device, stat_dtype([x.dtype for x in params])),
    )


D_STATE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(DState))
