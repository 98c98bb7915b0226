"""``KProdigy``: the ``torch.optim.Optimizer`` shell around ``kprodigy.functional``.

The shell does bookkeeping only: it maps param groups to D-groups, creates per-tensor state
lazily, keeps the D state as Python floats in the param groups (the keys prodigyopt trainers
read), and calls ``step_d_group`` in place. All arithmetic lives in the functional core.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..functional import DState, Hyperparams, Segment, init_tensor_state, step_d_group
from ..functional._state import stat_dtype

__all__ = ["KProdigy"]

_FLOAT_D_KEYS = ("d", "d_max", "d_numerator", "d_denom", "d_hat")


class KProdigy(torch.optim.Optimizer):
    r"""Prodigy (Adam with an adapted step size D), with per-component D and fast paths.

    Leave ``lr=1.0``: D is estimated while training. For each D-group (the whole optimizer, or
    one param group with ``independent_d``), with step count k and per-group lr and betas::

        bc   = sqrt(1 - b2^(k+1)) / (1 - b1^(k+1))   if use_bias_correction else 1
        dlr  = d * lr * bc
        g    = g + wd * x                             if weight_decay and not decouple
        if k % d_update_freq == 0:
            d_numerator = beta3 * d_numerator + sum (d/d0) * dlr * <g[::p], p0 - x[::p]>
            s           = beta3 * s + (d/d0) * (d if safeguard_warmup else dlr) * g[::p]
            d_denom     = sum ||s||_1
        m = b1 * m + d * (1 - b1) * g
        v = b2 * v + d^2 * (1 - b2) * g^2
        if k % d_update_freq == 0 and d_denom > 0:
            d_hat = d_coef * d_numerator / d_denom
            d     = max(d, d_hat) if d == d0 else d
            d_max = max(d_max, d_hat)
            d     = min(d_max, d * growth_rate)          # d never decreases
        x = x * (1 - wd * dlr)                        if weight_decay and decouple
        x = x - dlr * m / max(sqrt(v), d * eps)        (b1 = 0: x - dlr * d_old * g / max(...))
        k = k + 1

    ``p`` is ``slice_p``, ``p0`` the params at their first step. A group with ``lr=0`` is frozen.

    Args:
        params: iterable of tensors or of dicts defining param groups.
        lr: multiplier of D (default 1.0); per group; 0 freezes a group.
        betas: EMA rates of the gradient and its square (default (0.9, 0.999)).
        beta3: EMA rate of the D statistics (default None: sqrt(betas[1])).
        eps: denominator floor, relative to D (default 1e-8).
        weight_decay: weight decay (default 0).
        decouple: AdamW-style decay if True (default), else L2 added to the gradient.
        use_bias_correction: Adam's bias correction (default False).
        safeguard_warmup: leave lr out of the D denominator, for warm-up schedules (default False).
        d0: initial D (default 1e-6).
        d_coef: multiplier of the D estimate (default 1.0); the preferred knob to tune.
        growth_rate: largest factor D may grow by per step (default inf).
        d_update_freq: update the D statistics every this many steps (default 1).
        slice_p: D statistics use every slice_p-th element of each tensor (default 1).
        foreach: multi-tensor ops (True), per-tensor loop (False) or automatic (None, default).
        independent_d: one D per param group (True), one D for all (False), or automatic
            (None, default: one D per group when there is more than one group).
        maximize: maximize the objective (default False).
        fsdp_in_use: all-reduce the D statistics over the default process group, for sharded
            params (default False).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decouple: bool = True,
        use_bias_correction: bool = False,
        safeguard_warmup: bool = False,
        d0: float = 1e-6,
        d_coef: float = 1.0,
        growth_rate: float = math.inf,
        d_update_freq: int = 1,
        slice_p: int = 1,
        foreach: bool | None = None,
        independent_d: bool | None = None,
        maximize: bool = False,
        fsdp_in_use: bool = False,
    ) -> None:
        for name, value in (("foreach", foreach), ("independent_d", independent_d)):
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"Invalid {name}: {value!r}; expected None, True or False")
        if not isinstance(fsdp_in_use, bool):
            raise ValueError(f"Invalid fsdp_in_use: {fsdp_in_use!r}; expected True or False")
        hp = Hyperparams(
            lr=lr,
            betas=betas,
            beta3=beta3,
            eps=eps,
            weight_decay=weight_decay,
            decouple=decouple,
            use_bias_correction=use_bias_correction,
            safeguard_warmup=safeguard_warmup,
            d0=d0,
            d_coef=d_coef,
            growth_rate=growth_rate,
            d_update_freq=d_update_freq,
            slice_p=slice_p,
            maximize=maximize,
        )
        defaults: dict[str, Any] = {name: getattr(hp, name) for name in Hyperparams.field_names()}
        defaults.update(foreach=foreach, fsdp_in_use=fsdp_in_use, **_fresh_d_keys(hp.d0))
        self.independent_d = independent_d
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its hyperparameters are validated first (a bad group changes nothing)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        Hyperparams.from_mapping({**self.defaults, **param_group})
        if "d0" in param_group:  # a group-specific d0 starts its own D there
            for key, value in _fresh_d_keys(float(param_group["d0"])).items():
                param_group.setdefault(key, value)
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Fill keys missing from older or prodigyopt checkpoints; D values become Python floats."""
        super().__setstate__(state)
        self.__dict__.setdefault("independent_d", None)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            for key in _FLOAT_D_KEYS:
                group[key] = float(group[key])
            group["k"] = int(group["k"])

    def d_groups(self) -> list[list[int]]:
        """Indices of the param groups sharing each D estimate."""
        n = len(self.param_groups)
        independent = self.independent_d if self.independent_d is not None else n > 1
        return [[i] for i in range(n)] if independent else [list(range(n))]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for members in self.d_groups():
            groups = [self.param_groups[i] for i in members]
            segments = [self._segment(group) for group in groups]
            params = [p for seg in segments for p in seg.params]
            if not params:  # no gradients in this D-group this step: nothing happens
                continue
            lead = groups[0]
            device = _one_device(params, members)
            packed = torch.tensor(
                [lead[key] for key in _FLOAT_D_KEYS], dtype=stat_dtype([p.dtype for p in params]), device=device
            )  # one host-to-device copy for the D state
            d_state = DState(
                **dict(zip(_FLOAT_D_KEYS, packed.unbind())),
                k=torch.tensor(lead["k"], dtype=torch.int64, device=device),
            )
            k = lead["k"]
            _, new = step_d_group(
                segments,
                d_state,
                update_d=k % lead["d_update_freq"] == 0,
                foreach=lead["foreach"],
                inplace=True,
                reduce_stats=self._reduce_stats(lead, params),
            )
            values = torch.stack([getattr(new, key).double() for key in _FLOAT_D_KEYS]).tolist()
            for group in groups:
                group.update(zip(_FLOAT_D_KEYS, values))
                group["k"] = k + 1
            for p in params:
                self.state[p]["step"] += 1
        return loss

    def _segment(self, group: dict[str, Any]) -> Segment:
        """Gather one group's tensors with gradients, creating their state on first use."""
        hp = Hyperparams.from_mapping(group)
        params, grads, exp_avgs, exp_avg_sqs, ss, p0s = [], [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            if g.is_sparse:
                raise RuntimeError(
                    "KProdigy does not support sparse gradients; use dense gradients (e.g. sparse=False in nn.Embedding)"
                )
            if torch.is_complex(p):
                raise RuntimeError(
                    "KProdigy does not support complex parameters; view them as real with torch.view_as_real"
                )
            if g.shape != p.shape:
                raise RuntimeError(
                    f"a gradient of shape {tuple(g.shape)} belongs to a parameter of shape {tuple(p.shape)}"
                )
            state = self.state[p]
            if "exp_avg_sq" not in state:
                state.update(init_tensor_state(p, hp))
                state["step"] = 0
            if hp.betas[0] > 0 and "exp_avg" not in state:  # beta1 raised from 0 mid-training
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            expected = (p.numel() + hp.slice_p - 1) // hp.slice_p
            if state["s"].numel() != expected:
                raise ValueError(
                    f"slice_p={hp.slice_p} does not match the state of a parameter of {p.numel()} elements "
                    f"(s has {state['s'].numel()}); slice_p cannot change after the first step"
                )
            params.append(p)
            grads.append(g)
            exp_avgs.append(state.get("exp_avg"))
            exp_avg_sqs.append(state["exp_avg_sq"])
            ss.append(state["s"])
            p0s.append(state["p0"])
        return Segment(params, grads, exp_avgs if hp.betas[0] > 0 else None, exp_avg_sqs, ss, p0s, hp)

    def _reduce_stats(self, lead: dict[str, Any], params: list[Tensor]) -> Callable[[Tensor], Tensor] | None:
        """All-reduce of the D statistics for sharded params (fsdp_in_use or FSDP flat params)."""
        sharded = lead["fsdp_in_use"] or any(hasattr(p, "_fsdp_flattened") for p in params)
        if not sharded or not (dist.is_available() and dist.is_initialized()):
            return None

        def all_reduce(stats: Tensor) -> Tensor:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
            return stats

        return all_reduce


def _fresh_d_keys(d0: float) -> dict[str, Any]:
    return {"d": d0, "d0": d0, "d_max": d0, "d_numerator": 0.0, "d_denom": 0.0, "d_hat": 0.0, "k": 0}


def _one_device(params: list[Tensor], members: list[int]) -> torch.device:
    device = params[0].device
    for p in params:
        if p.device != device:
            raise RuntimeError(
                f"param groups {members} share one D but hold params on {device} and {p.device}; "
                "put them on one device or use independent_d=True with one device per group"
            )
    return device
