"""Optimizer state as frozen dataclasses registered as pytrees."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from ._hyperparams import Hyperparams

__all__ = ["DState", "SegmentResult", "State", "init_state", "init_d_state", "init_tensor_state", "stat_dtype", "state_dtype"]


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
    k: Tensor  # int64 step count (number of steps taken; a skipped step does not count)
    skipped_steps: Tensor  # int64 count of steps skipped for non-finite gradients or statistics

    def replace(self, **changes: Tensor) -> DState:
        return replace(self, **changes)


@dataclass(frozen=True)
class SegmentResult:
    """The params and per-tensor state of one segment, lists aligned (exp_avg None iff betas[0]
    == 0): what an update pass returns, and where it writes (``out``: the input lists themselves
    for the optimizer's in-place step; None means new tensors, the pure step)."""

    params: list[Tensor]
    exp_avg: list[Tensor] | None
    exp_avg_sq: list[Tensor]
    s: list[Tensor]


@dataclass(frozen=True)
class State:
    """State of a list of tensors sharing one D. Lists are aligned with the params list.

    (``kprodigy.functional.init_state`` given another pytree of params, e.g. a dict, puts that
    pytree's structure in place of each list: see ``_tree.py``.)

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


def state_dtype(param_dtype: torch.dtype, hparams: Hyperparams) -> torch.dtype:
    """Dtype of exp_avg, exp_avg_sq and s for a param: float32 for 16-bit params if
    ``hparams.fp32_state`` (the default), else the param's dtype. ``p0`` keeps the param's dtype."""
    if hparams.fp32_state and param_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return param_dtype


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
        skipped_steps=torch.zeros((), dtype=torch.int64, device=device),
    )


def init_tensor_state(x: Tensor, hparams: Hyperparams, *, compact_p0: bool = True) -> dict[str, Tensor]:
    """Per-tensor state for param ``x``, keyed as in prodigyopt (``exp_avg`` only if betas[0] > 0).

    Allocated detached, in the param's memory format and ``state_dtype`` (float32 for 16-bit
    params by default). With ``compact_p0``, ``p0`` is a 0-dim zero when x is all zeros (LoRA
    up-projections), to save memory; that check reads x once, at init only, and is skipped inside
    torch.func transforms (``vmap``), where it cannot run: there, and with ``compact_p0=False``,
    ``p0`` is always the full slice.
    """
    x = x.detach()
    sliced = x.flatten()[:: hparams.slice_p]
    dtype = state_dtype(x.dtype, hparams)
    state: dict[str, Tensor] = {}
    if hparams.betas[0] > 0:
        state["exp_avg"] = torch.zeros_like(x, dtype=dtype, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(x, dtype=dtype, memory_format=torch.preserve_format)
    state["s"] = torch.zeros_like(sliced, dtype=dtype)
    compact = compact_p0 and not torch._C._functorch.is_functorch_wrapped_tensor(x) and not bool(x.any())
    state["p0"] = torch.zeros((), dtype=x.dtype, device=x.device) if compact else sliced.clone()
    return state


def init_state(params: Sequence[Tensor], hparams: Hyperparams, *, compact_p0: bool = True) -> State:
    """Initial state for ``params`` (a list of tensors sharing one D); ``compact_p0``: see ``init_tensor_state``."""
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
    per_tensor = [init_tensor_state(x, hparams, compact_p0=compact_p0) for x in params]
    return State(
        exp_avg=[t["exp_avg"] for t in per_tensor] if hparams.betas[0] > 0 else None,
        exp_avg_sq=[t["exp_avg_sq"] for t in per_tensor],
        s=[t["s"] for t in per_tensor],
        p0=[t["p0"] for t in per_tensor],
        d=init_d_state(hparams, device, stat_dtype([x.dtype for x in params])),
    )


D_STATE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(DState))
