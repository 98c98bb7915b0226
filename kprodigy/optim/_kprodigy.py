"""``KProdigy``: the ``torch.optim.Optimizer`` shell around ``kprodigy.functional``.

The shell does bookkeeping only: it maps param groups to D-groups, creates per-tensor state
lazily, keeps the D state as Python floats in the param groups (the keys prodigyopt trainers
read), and calls ``step_d_group`` in place. All arithmetic lives in the functional core.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..functional import DState, Hyperparams, Segment, all_reduce_stats, init_tensor_state, step_d_groups
from ..functional._state import stat_dtype

try:  # DTensor: FSDP2 (fully_shard) and tensor-parallel params
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = None  # type: ignore[assignment,misc]

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
        fsdp_in_use: force the all-reduce of the D statistics (prodigyopt's flag; default False).
        reduce_d_stats: sum the D statistics over ranks so that every rank has the same D:
            None (default) detects when this is needed (DTensor params from FSDP2 ``fully_shard``,
            FSDP1 flat params, or construction inside ``ZeroRedundancyOptimizer``); True forces
            it, False forbids it. Plain DDP (replicated params, averaged grads) needs none.
        process_group: the group to sum over (default: the sharding mesh's group for DTensor
            params, ZeRO's group under ZeroRedundancyOptimizer, else the default group).
        fused: compiled kernels (torch.compile: one fused loop per pass, no parameter-sized
            temporaries) if True; None (default) and False use ``foreach``. The first fused step
            compiles for seconds; where compiling fails the step warns once and uses foreach.

    Distributed training: when reduced, the D statistics of all D-groups are packed into one
    tensor and summed with ONE ``all_reduce`` per step (per device), with no host sync; steps that
    do not update D (``d_update_freq``) communicate nothing.
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
        reduce_d_stats: bool | None = None,
        process_group: Any = None,
        fused: bool | None = None,
    ) -> None:
        for name, value in (("foreach", foreach), ("independent_d", independent_d), ("fused", fused)):
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"Invalid {name}: {value!r}; expected None, True or False")
        if not isinstance(fsdp_in_use, bool):
            raise ValueError(f"Invalid fsdp_in_use: {fsdp_in_use!r}; expected True or False")
        if reduce_d_stats is not None and not isinstance(reduce_d_stats, bool):
            raise ValueError(f"Invalid reduce_d_stats: {reduce_d_stats!r}; expected None, True or False")
        if reduce_d_stats is False and fsdp_in_use:
            raise ValueError("fsdp_in_use=True forces the D all-reduce but reduce_d_stats=False forbids it; set one")
        if process_group is not None and not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
            raise ValueError(f"Invalid process_group: {process_group!r}; expected a torch.distributed ProcessGroup")
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
        defaults.update(foreach=foreach, fsdp_in_use=fsdp_in_use, fused=fused, **_fresh_d_keys(hp.d0))
        self.independent_d = independent_d
        self.reduce_d_stats = reduce_d_stats
        self.process_group = process_group if process_group is not None else _enclosing_zero_group()
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
        self.__dict__.setdefault("reduce_d_stats", None)
        self.__dict__.setdefault("process_group", None)
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
        jobs = []  # (members, groups, segments, the optimizer's params of those segments)
        for members in self.d_groups():
            groups = [self.param_groups[i] for i in members]
            built = [self._segment(group) for group in groups]
            jobs.append((members, groups, [seg for seg, _ in built], [p for _, ps in built for p in ps]))
        reduce_stats = self._reduce_stats([p for job in jobs for p in job[3]])
        if reduce_stats is None:  # no gradients in a D-group this step: nothing happens there
            jobs = [job for job in jobs if job[3]]
        # under a reduction every rank steps every D-group (zero local statistics if it holds none)
        fallback = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
        d_states = []
        for members, groups, _, params in jobs:
            lead = groups[0]
            device = _one_device(params, members) if params else fallback
            # a rank holding none of a D-group's params (ZeRO) takes the optimizer's dtypes, so
            # that every rank computes D in the same dtype
            dtypes = [p.dtype for p in params] or [p.dtype for g in self.param_groups for p in g["params"]]
            packed = torch.tensor(
                [lead[key] for key in _FLOAT_D_KEYS], dtype=stat_dtype(dtypes), device=device
            )  # one host-to-device copy for the D state
            d_states.append(
                DState(
                    **dict(zip(_FLOAT_D_KEYS, packed.unbind())),
                    k=torch.tensor(lead["k"], dtype=torch.int64, device=device),
                )
            )
        outs = step_d_groups(
            [job[2] for job in jobs],
            d_states,
            update_d=[job[1][0]["k"] % job[1][0]["d_update_freq"] == 0 for job in jobs],
            foreach=[job[1][0]["foreach"] for job in jobs],
            fused=[job[1][0]["fused"] for job in jobs],
            inplace=True,
            reduce_stats=reduce_stats,
        )
        for (_, groups, _, params), (_, new) in zip(jobs, outs):
            k = groups[0]["k"]
            values = torch.stack([getattr(new, key).double() for key in _FLOAT_D_KEYS]).tolist()
            for group in groups:
                group.update(zip(_FLOAT_D_KEYS, values))
                group["k"] = k + 1
            for p in params:
                self.state[p]["step"] += 1
        return loss

    def _segment(self, group: dict[str, Any]) -> tuple[Segment, list[Tensor]]:
        """Gather one group's tensors with gradients, creating their state on first use.

        Returns the segment (local shards of DTensor params and state: the math is per rank) and
        the optimizer's params it holds, in the same order.
        """
        hp = Hyperparams.from_mapping(group)
        params, grads, exp_avg_sqs, ss, p0s = [], [], [], [], []
        exp_avgs: list[Any] = []  # None entries only when betas[0] == 0 (then unused)
        originals: list[Tensor] = []
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
                state.update(_init_state(p, hp))
                state["step"] = 0
            if hp.betas[0] > 0 and "exp_avg" not in state:  # beta1 raised from 0 mid-training
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            originals.append(p)
            p, g = _local(p), _local(g)
            expected = (p.numel() + hp.slice_p - 1) // hp.slice_p
            if _local(state["s"]).numel() != expected:
                raise ValueError(
                    f"slice_p={hp.slice_p} does not match the state of a parameter of {p.numel()} elements "
                    f"(s has {_local(state['s']).numel()}); slice_p cannot change after the first step"
                )
            params.append(p)
            grads.append(g)
            exp_avgs.append(_local(state["exp_avg"]) if "exp_avg" in state else None)
            exp_avg_sqs.append(_local(state["exp_avg_sq"]))
            ss.append(_flat_local(state["s"]))
            p0s.append(_flat_local(state["p0"]))
        segment = Segment(params, grads, exp_avgs if hp.betas[0] > 0 else None, exp_avg_sqs, ss, p0s, hp)
        return segment, originals

    def _reduce_stats(self, params: list[Tensor]) -> Callable[[Tensor], Tensor] | None:
        """The all-reduce of the D statistics if this step needs one, else None (no collective).

        Needed when each rank holds part of the sums: DTensor params (FSDP2), FSDP1 flat params,
        an optimizer built by ZeroRedundancyOptimizer (its group is taken at construction), an
        explicit ``process_group``, ``fsdp_in_use=True`` or ``reduce_d_stats=True``. Replicated
        params (plain DDP) need none. Without an initialized default group nothing is reduced.
        """
        if self.reduce_d_stats is False or not (dist.is_available() and dist.is_initialized()):
            return None
        forced = self.reduce_d_stats is True or any(g["fsdp_in_use"] for g in self.param_groups)
        if self.process_group is not None:
            return all_reduce_stats(self.process_group)
        mesh_group = _sharding_group([p for p in params if DTensor is not None and isinstance(p, DTensor)])
        if mesh_group is not None:
            return all_reduce_stats(mesh_group)
        if forced or any(hasattr(p, "_fsdp_flattened") for p in params):
            return all_reduce_stats(None)
        return None


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


def _local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view: in-place updates reach the DTensor), else ``t``."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def _flat_local(t: Tensor) -> Tensor:
    """``s``/``p0`` as the kernels take them: a DTensor's local shard viewed 1-D (never a copy)."""
    return t.to_local().view(-1) if DTensor is not None and isinstance(t, DTensor) else t


def _init_state(p: Tensor, hp: Hyperparams) -> dict[str, Tensor]:
    """Per-tensor state; for a DTensor param, from its local shard (the math is per rank).

    For a DTensor param, exp_avg and exp_avg_sq are DTensors laid out like it, and so are ``s``
    and ``p0`` when slice_p == 1 (param-shaped, viewed 1-D by the kernels; ``p0`` is always
    stored, even for an all-zero param): distributed checkpoints save and reshard them like the
    param. With slice_p > 1, ``s`` and ``p0`` are this rank's plain tensors (every slice_p-th
    element of the local shard), which reload only into the same sharding and not through
    torch.distributed.checkpoint (which treats plain tensors as replicated).
    """
    if DTensor is None or not isinstance(p, DTensor):
        return init_tensor_state(p, hp)
    local = p.to_local()
    state = init_tensor_state(local, hp)
    if hp.slice_p == 1:
        state["s"], state["p0"] = torch.zeros_like(local), local.clone()
    for key in ("exp_avg", "exp_avg_sq") + (("s", "p0") if hp.slice_p == 1 else ()):
        if key in state:
            state[key] = DTensor.from_local(
                state[key], p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
            )
    return state


def _sharding_group(dtensors: list[Tensor]) -> Any:
    """The process group over which these DTensor params are sharded; None if none is sharded."""
    found: Any = None
    seen: set[tuple[int, tuple[Any, ...]]] = set()
    for p in dtensors:
        mesh, placements = p.device_mesh, p.placements  # type: ignore[attr-defined]
        if (id(mesh), placements) in seen:
            continue
        seen.add((id(mesh), placements))
        dims = [i for i, pl in enumerate(placements) if pl.is_shard()]
        if not dims:
            continue
        if len(dims) > 1:
            raise ValueError(
                f"a DTensor param is sharded over {len(dims)} mesh dimensions {placements}; KProdigy cannot "
                "choose one group for its D statistics: pass process_group= (the ranks holding disjoint shards)"
            )
        group = mesh.get_group(dims[0]) if mesh.ndim > 1 else mesh.get_group()
        if found is not None and group is not found:
            raise ValueError(
                "DTensor params are sharded over different process groups; one KProdigy sums its D "
                "statistics over one group: pass process_group= or use one optimizer per mesh"
            )
        found = group
    return found


def _enclosing_zero_group() -> Any:
    """ZeroRedundancyOptimizer's process group if it is constructing this optimizer, else None.

    ZeRO builds one local optimizer per rank over a subset of the params from inside its own
    methods; the caller frames are searched for that ``self`` (at construction only).
    """
    if not dist.is_available():
        return None
    try:
        from torch.distributed.optim import ZeroRedundancyOptimizer
    except ImportError:  # pragma: no cover
        return None
    frame: Any = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, ZeroRedundancyOptimizer):
            return owner.process_group
        frame = frame.f_back
    return None
