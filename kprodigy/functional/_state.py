"""Optimizer state as frozen dataclasses registered as pytrees."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from ._hyperparams import Hyperparams

__all__ = ["DState", "Segment", "SegmentResult", "State", "d_dtype", "init_d_state", "init_state", "init_tensor_state"]
__all__ += ["STATE_KEYS", "check_state", "compute_dtype", "is_wrapped", "state_dtype"]

Scalar = Any  # a Python number (D held on the host) or a 0-dim tensor (D on the device)
STATE_KEYS = ("exp_avg", "exp_avg_sq", "s", "p0")  # the per-tensor state (``step`` apart)
is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor  # a tensor inside a torch.func transform


@dataclass(frozen=True)
class DState:
    """State of one D estimate (one D-group): Python numbers where D is held on the host (the
    optimizer's default mode), else 0-dim tensors on the params' device (``init_state``,
    ``capturable``), floats in ``d_dtype`` (float64, as prodigyopt's Python floats)."""

    d: Scalar  # current step-size scale D (>= d0, never decreases)
    d_max: Scalar  # largest D estimate seen so far
    d_numerator: Scalar  # beta3-EMA of sum (d/d0) * dlr * <g, p0 - x>
    d_denom: Scalar  # sum of ||s||_1 over the tensors, at the last D update
    d_hat: Scalar  # last raw estimate d_coef * d_numerator / d_denom
    k: Scalar  # int step count (steps taken; a skipped or an all-zero-gradient step does not count)
    skipped_steps: Scalar  # int count of steps skipped for non-finite gradients or statistics

    def replace(self, **changes: Scalar) -> DState:
        return replace(self, **changes)

    def on_host(self) -> DState:
        """This state as Python numbers (one read of the tensors)."""
        if not isinstance(self.d, Tensor):
            return self
        return DState.of(torch.stack([getattr(self, f) for f in D_FLOATS]).tolist(), self.k, self.skipped_steps)

    def assign(self, src: DState) -> None:
        """Write ``src``'s values into this state's tensors, in place (one host-to-device copy
        where ``src`` holds host numbers)."""
        values = src.on_device(self.d.device, self.d.dtype)
        torch._foreach_copy_([getattr(self, f) for f in D_STATE_FIELDS], [getattr(values, f) for f in D_STATE_FIELDS])

    @staticmethod
    def of(floats: Sequence[Any], k: Any, skipped_steps: Any) -> DState:
        """A host D state from the five float fields (``D_FLOATS`` order) and the counts."""
        return DState(**dict(zip(D_FLOATS, map(float, floats))), k=int(k), skipped_steps=int(skipped_steps))

    def on_device(self, device: torch.device, dtype: torch.dtype) -> DState:
        """This state as 0-dim tensors (one host-to-device copy), floats in ``dtype``."""
        if isinstance(self.d, Tensor):
            return self
        floats = torch.tensor([getattr(self, f) for f in D_FLOATS], dtype=dtype, device=device).unbind()
        return DState(*floats, *torch.tensor([self.k, self.skipped_steps], dtype=torch.int64, device=device).unbind())


D_STATE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(DState))
D_FLOATS = D_STATE_FIELDS[:5]  # ("d", "d_max", "d_numerator", "d_denom", "d_hat"); then k, skipped_steps


@dataclass(frozen=True)
class Segment:
    """The tensors (aligned lists) of one param group in a D-group, or of its part of one dtype, and
    its hyperparameters; ``exp_avg`` None iff betas[0] == 0; ``s``, ``p0`` empty once D froze."""

    params: Sequence[Tensor]
    grads: Sequence[Tensor]
    exp_avg: Sequence[Tensor] | None
    exp_avg_sq: Sequence[Tensor]
    s: Sequence[Tensor]
    p0: Sequence[Tensor]
    hparams: Hyperparams


@dataclass(frozen=True)
class SegmentResult:
    """A segment's params and per-tensor state: what an update returns, and where it writes."""

    params: list[Tensor]
    exp_avg: list[Tensor] | None
    exp_avg_sq: list[Tensor]
    s: list[Tensor]


@dataclass(frozen=True)
class State:
    """State of tensors sharing one D: per-tensor fields aligned with the params (lists, or the
    params' pytree structure, e.g. a dict, from ``kprodigy.functional.init_state``).

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


def check_state(state: Any) -> None:
    if not isinstance(state, State):
        raise TypeError(f"state must be a kprodigy.functional.State, got {type(state).__name__}")


def d_dtype(device: torch.device | str) -> torch.dtype:
    """Dtype of a D state held on ``device``: float64 (prodigyopt keeps D in Python floats), or
    float32 where the device has no float64 (MPS)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16-bit floats, else ``dtype``: reductions and scalars compute in at least fp32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def state_dtype(param_dtype: torch.dtype, hparams: Hyperparams, key: str = "s", numel: int = 0) -> torch.dtype:
    """Storage dtype of state ``key`` (exp_avg, exp_avg_sq, s) of a param of ``numel`` elements
    under ``hparams.state_precision`` (``_formats.storage_dtype``; uint8 for int8 blocks). ``p0``
    keeps the param's dtype."""
    from . import _formats

    return _formats.storage_dtype(param_dtype, hparams.state_precision, key, numel)


def init_d_state(hparams: Hyperparams, device: torch.device | str | None = None) -> DState:
    """A fresh D state: d = d_max = d0, statistics zero, k = 0; Python numbers if ``device`` is
    None, else 0-dim tensors there (floats in ``d_dtype``)."""
    fresh = DState(hparams.d0, hparams.d0, 0.0, 0.0, 0.0, 0, 0)
    return fresh if device is None else fresh.on_device(torch.device(device), d_dtype(device))


def init_tensor_state(
    x: Tensor, hparams: Hyperparams, *, compact_p0: bool = True, factored: bool = False
) -> dict[str, Tensor]:
    """Per-tensor state for param ``x``, keyed as in prodigyopt (``exp_avg`` only if betas[0] > 0),
    detached, in x's memory format and the storage of ``hparams.state_precision`` (``_formats``).
    ``compact_p0``: ``p0`` a 0-dim zero for an all-zero x (LoRA up-projections; one read of x,
    skipped inside torch.func transforms, where it cannot run). ``factored`` (2+ dims):
    ``exp_avg_sq`` the packed means ``[r, c]`` (``_factored``)."""
    from . import _formats

    x = x.detach()
    sliced = x.flatten()[:: hparams.slice_p]
    precision = hparams.state_precision
    state: dict[str, Tensor] = {}
    if hparams.betas[0] > 0:
        state["exp_avg"] = _formats.zeros(x, "exp_avg", precision)
    if factored and x.dim() >= 2:  # row and column means: kept as ``s`` is (never int8)
        state["exp_avg_sq"] = x.new_zeros(x.numel() // x.shape[-1] + x.shape[-1], dtype=state_dtype(x.dtype, hparams))
    else:
        state["exp_avg_sq"] = _formats.zeros(x, "exp_avg_sq", precision)
    state["s"] = torch.zeros_like(sliced, dtype=state_dtype(x.dtype, hparams))
    compact = compact_p0 and not is_wrapped(x) and not bool(x.any())
    state["p0"] = torch.zeros((), dtype=x.dtype, device=x.device) if compact else sliced.clone()
    return state


def init_state(params: Sequence[Tensor], hparams: Hyperparams, *, compact_p0: bool = True) -> State:
    """Initial state for ``params``, a list of tensors sharing one D (``init_tensor_state``)."""
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
    lists = {key: [t[key] for t in per_tensor] if key in per_tensor[0] else None for key in STATE_KEYS}
    return State(**lists, d=init_d_state(hparams, device))  # type: ignore[arg-type]
