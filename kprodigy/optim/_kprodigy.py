"""``KProdigy``: the ``torch.optim.Optimizer`` shell around ``kprodigy.functional``.

The shell does bookkeeping only: it maps param groups to D-groups, creates per-tensor state
lazily, keeps the D state in the param groups (the keys prodigyopt trainers read: Python floats,
or with ``capturable=True`` persistent 0-dim device tensors updated in place), and calls
``step_d_groups`` in place. All arithmetic lives in the functional core.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _compat
from ..functional import DState, Hyperparams, _fused, _layout, _native, _schedule, _scratch
from ..functional._factored import init_factored_v
from ..functional._partial import accumulate_segment, apply_segments, effective_lrs
from ..functional._state import D_STATE_FIELDS, stat_dtype, state_dtype
from ..functional._step import Segment, step_d_groups, use_fused
from . import _diagnostics, _distributed, _group_keys, _plan
from ._checks import (
    check_capturable,
    check_d_group_agrees,
    check_d_steps,
    check_fused_foreach,
    check_grads,
    check_lr_type,
    check_param_group,
    check_same_d_steps,
    check_state_dict,
    hparams,
    one_device,
)

__all__ = ["KProdigy"]


# Why dynamo does not trace the step. It handles every torch.optim.Optimizer as its own
# OptimizerVariable, which reads ``capturable=True`` in every group inside the trace (and writes
# it back into groups the step mutates, so that later eager steps change mode); the D keys are
# Python floats (read once per step on the host), so a trace would also recompile whenever D or
# lr changes. The step's math is compiled where it pays, by ``fused`` (``_fused.py``).
_NOT_TRACED = "KProdigy.step keeps D on the host and is not traced; its fused path compiles its own kernels"


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
        x = x - dlr * m / (sqrt(v) + d * eps)          (b1 = 0: x - dlr * d * g / (sqrt(v) + d * eps))
        k = k + 1

    This is prodigyopt 1.1.2's step; at the defaults KProdigy gives its numbers (float rounding
    apart). ``dlr`` uses D before this step's update, ``eps`` and the b1 = 0 step the D after it.
    ``p`` is ``slice_p``, ``p0`` the params at their first step. A group with ``lr=0`` is frozen.

    Args:
        params: iterable of tensors or of dicts defining param groups.
        lr: multiplier of D (default 1.0); per group; 0 freezes a group.
        betas: EMA rates of the gradient and its square (default (0.9, 0.999)).
        beta3: EMA rate of the D statistics (default None: sqrt(betas[1])).
        eps: added to the Adam denominator, relative to D: sqrt(v) + d * eps (default 1e-8).
        weight_decay: weight decay (default 0).
        decouple: AdamW-style decay if True (default), else L2 added to the gradient.
        use_bias_correction: Adam's bias correction of the step size (default False, as prodigyopt).
        safeguard_warmup: leave lr out of the D denominator, for warm-up schedules (default False).
        d0: initial D (default 1e-6).
        d_coef: multiplier of the D estimate (default 1.0); the preferred knob to tune.
        growth_rate: largest factor D may grow by per step (default inf).
        d_update_freq: update the D statistics every this many steps (default 1).
        slice_p: D statistics use every slice_p-th element of each tensor (default 1).
        foreach: multi-tensor ops (True), per-tensor loop (False) or automatic (None, default).
        independent_d: one D per param group (True) or one D for all param groups (False,
            default, as prodigyopt); None is 0.5.0's automatic rule (one D per group when there
            is more than one group), kept for old configurations.
        maximize: maximize the objective (default False).
        fsdp_in_use: force the all-reduce of the D statistics (prodigyopt's flag; default False).
        reduce_d_stats: sum the D statistics over ranks so that every rank has the same D:
            None (default) detects when this is needed (DTensor params from FSDP2 ``fully_shard``,
            FSDP1 flat params, or construction inside ``ZeroRedundancyOptimizer``); True forces
            it, False forbids it. Plain DDP (replicated params, averaged grads) needs none.
        process_group: the group to sum over (default: the sharding mesh's group for DTensor
            params, ZeRO's group under ZeroRedundancyOptimizer, else the default group).
        skip_nonfinite: skip a D-group's step when any of its gradients holds NaN or inf, or its
            D statistics overflow (default True): params, moments and D stay as they were, ``k``
            does not advance and the group key ``skipped_steps`` counts it; a warning the first
            time. Decided on the device (no host sync); False saves one read of the gradients.
        fp32_state: keep exp_avg, exp_avg_sq and s of bfloat16/float16 params in float32
            (default True); False keeps them in the param dtype to save memory.
        stochastic_rounding: round the updates of bfloat16 params stochastically (unbiased), so
            that updates smaller than the bfloat16 spacing are not lost (default False).
        d_steps: freeze D after this many steps (default None: never); per group, equal within
            a D-group. From then on D stays fixed, the D statistics are skipped and the ``s`` and
            ``p0`` buffers are freed; the group key ``d_frozen`` records it.
        factored: keep the second moment of each param with 2+ dims as row and column means
            (Adafactor-style; about 1 word per param less), per group (default False; fixed at
            a param's first step).
        d_ratio_cap: keep the D values of the D-groups within this factor (>= 1) of the smallest
            one after every step (default None: no cap), for a component whose D "grows forever".
        fused: compiled kernels (torch.compile: one kernel per pass and tensor, no parameter-sized
            temporaries) if True; None (default) takes the native path (torch's fused AdamW kernel
            and a read-only statistics pass, nothing compiled) where it computes the step exactly,
            on CPU at every size and on CUDA below 2**20 elements per group, and the compiled
            kernels for larger CUDA groups where torch.compile works; False uses ``foreach``. The
            first compiled step compiles for seconds; where compiling fails the step uses foreach
            (with a one-line warning if ``fused=True`` was asked for).
        capturable: keep each D-group's D state as 0-dim tensors on its params' device, updated in
            place (fixed addresses), so that ``step()`` reads nothing on the host and can be
            captured in a CUDA graph (default False; per group, equal within a D-group). The group
            keys ``d``, ``d_max``, ``d_numerator``, ``d_denom``, ``d_hat``, ``k``, ``skipped_steps``
            (int64) and ``effective_lr`` are then those tensors (the same objects in the groups of
            a D-group; ``float(group["d"])`` reads one), ``state[p]["step"]`` is an int64 tensor,
            and whether a step updates D (``d_update_freq``) is decided on the device.
            ``state_dict()`` returns Python numbers as in the default mode. ``lr`` and the other
            hyperparameters stay Python numbers: a captured graph keeps the values it was
            captured with (capture again after changing them). Not supported: ``d_steps``. No
            warning on a skipped step (read ``skipped_steps``). A param's first step creates its
            state and reads the param once on the host (whether it is all zeros, for ``p0``):
            take warm-up steps before capturing, as CUDA graphs need anyway.

    Param groups may carry ``d_group`` (any hashable; use a str or int to keep checkpoints
    loadable with ``weights_only=True``): groups with equal ``d_group`` share one D, whatever
    ``independent_d`` says about the groups without one.

    Group keys for logging (Python floats, or 0-dim tensors with ``capturable=True``, updated by
    every step): ``d``, ``d_max``, ``d_numerator``, ``d_denom``, ``d_hat``, ``k`` (int), ``lr``
    and ``effective_lr`` (the step size ``d * lr * bias_correction`` the last step applied; 0.0
    before the first step). ``get_learning_rates()`` lists ``effective_lr`` per group.

    ``torch.compile(opt.step)`` (PyTorch's recipe for compiling an optimizer step) is accepted and
    equals the eager step: the step is excluded from tracing (``torch.compiler.disable``), so
    changing ``lr`` or D never recompiles and the groups keep their flags. The elementwise math
    is compiled by the fused path (``fused``), with or without ``torch.compile`` around the step.

    Fused backward: ``step_parameter(p)`` (from ``p.register_post_accumulate_grad_hook``) steps
    one param as soon as its gradient is ready and ``finalize_step()`` updates D once all are in.

    Distributed training: when reduced, the D statistics of all D-groups are packed into one
    tensor and summed with ONE ``all_reduce`` per step (per device), with no host sync; steps that
    do not update D (``d_update_freq``) communicate nothing.
    """

    _flat: _plan.Plan | None  # the native path's kept plan (``_native_step``), not pickled

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
        independent_d: bool | None = False,
        maximize: bool = False,
        fsdp_in_use: bool = False,
        reduce_d_stats: bool | None = None,
        process_group: Any = None,
        d_steps: int | None = None,
        d_ratio_cap: float | None = None,
        factored: bool = False,
        skip_nonfinite: bool = True,
        fp32_state: bool = True,
        stochastic_rounding: bool = False,
        fused: bool | None = None,
        capturable: bool = False,
    ) -> None:
        for name, value in (("foreach", foreach), ("independent_d", independent_d), ("fused", fused)):
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"Invalid {name}: {value!r}; expected None, True or False")
        check_lr_type(lr)
        check_fused_foreach({"fused": fused, "foreach": foreach})
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
            skip_nonfinite=skip_nonfinite,
            fp32_state=fp32_state,
            stochastic_rounding=stochastic_rounding,
        )
        defaults: dict[str, Any] = {name: getattr(hp, name) for name in Hyperparams.field_names()}
        defaults.update(foreach=foreach, fsdp_in_use=fsdp_in_use, fused=fused, **_group_keys.fresh_d_keys(hp.d0))
        check_d_steps(d_steps)
        check_capturable({"capturable": capturable, "d_steps": d_steps})
        if not isinstance(factored, bool):
            raise ValueError(f"Invalid factored: {factored!r}; expected True or False")
        defaults.update(d_steps=d_steps, d_group=None, d_frozen=False, effective_lr=0.0, factored=factored)
        defaults.update(capturable=capturable)
        if d_ratio_cap is not None and (
            isinstance(d_ratio_cap, bool) or not isinstance(d_ratio_cap, (int, float)) or not d_ratio_cap >= 1
        ):
            raise ValueError(f"Invalid d_ratio_cap: {d_ratio_cap!r}; expected None or a number >= 1")
        self.d_ratio_cap = None if d_ratio_cap is None else float(d_ratio_cap)
        self._pending: dict[tuple[int, ...], _Pending] = {}  # per-param steps not yet finalized
        self.independent_d = independent_d
        self.reduce_d_stats = reduce_d_stats
        self.process_group = process_group if process_group is not None else _distributed.enclosing_zero_group()
        super().__init__(params, defaults)
        _diagnostics.check_lr(self, "at construction", use_schedule=False)  # KProdigyWarning

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its hyperparameters are validated first (a bad group changes nothing)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        check_param_group(param_group, self.param_groups)
        check_lr_type(param_group.get("lr"))
        check_fused_foreach({**self.defaults, **param_group})
        Hyperparams.from_mapping({**self.defaults, **param_group})
        check_d_steps(param_group.get("d_steps"))
        check_capturable({**self.defaults, **param_group})
        if not isinstance(param_group.get("factored", False), bool):
            raise ValueError(f"Invalid factored: {param_group['factored']!r}; expected True or False")
        try:
            hash(param_group.get("d_group"))
        except TypeError:
            raise ValueError(
                f"Invalid d_group: {param_group['d_group']!r}; expected a hashable label such as a str"
            ) from None
        if "d0" in param_group:  # a group-specific d0 starts its own D there
            for key, value in _group_keys.fresh_d_keys(float(param_group["d0"])).items():
                param_group.setdefault(key, value)
        super().add_param_group(param_group)
        try:
            self._bind_d_tensors()  # capturable: the new group's D keys become device tensors
        except Exception:
            self.param_groups.pop()
            raise

    def __getstate__(self) -> dict[str, Any]:
        """torch's state (defaults, state, param_groups) plus the optimizer-wide settings, so that
        ``copy.deepcopy`` and pickling keep them (``process_group`` is not picklable: it is left out)."""
        state = super().__getstate__()
        state.update(independent_d=self.independent_d, reduce_d_stats=self.reduce_d_stats, d_ratio_cap=self.d_ratio_cap)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Fill keys missing from older or prodigyopt checkpoints; D values and steps become Python
        numbers, or persistent device tensors in capturable groups (see ``_bind_d_tensors``).

        torch's ``__setstate__`` adds ``differentiable`` to ``defaults``; KProdigy has no such
        flag, so it is taken out again (else every group would get it: load -> save unstable)."""
        defaults = state.get("defaults", self.__dict__.get("defaults", {}))
        had_differentiable = "differentiable" in defaults
        super().__setstate__(state)
        if not had_differentiable:
            self.defaults.pop("differentiable", None)
        self.__dict__.setdefault("independent_d", None)
        self.__dict__.setdefault("reduce_d_stats", None)
        self.__dict__.setdefault("process_group", None)
        self.__dict__.setdefault("d_ratio_cap", None)
        self.__dict__.setdefault("_pending", {})
        self._flat = None  # a native plan is rebuilt from the state as it is now
        self.defaults.setdefault("capturable", False)  # optimizers pickled before capturable existed
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            if not group["capturable"]:
                _group_keys.to_numbers(group)
            for p in group["params"]:
                param_state = self.state.get(p)
                if param_state and "step" in param_state:
                    param_state["step"] = _group_keys.step_count(param_state["step"], p, group["capturable"])
        self._bind_d_tensors()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint (ours, an older version's, or prodigyopt's) atomically.

        The whole checkpoint is validated first (layout, keys, shapes, dtypes, finite values,
        hyperparameters); a bad one raises ValueError and leaves the optimizer as it was. The
        moments and ``s`` of 16-bit params are kept in float32 when ``fp32_state`` (torch's loader
        would cast them to the param dtype). ``capturable`` is kept from this optimizer's groups
        (it says how the D state is held, not what it is): a checkpoint of either mode loads into
        either mode. Per-param steps (``step_parameter``) not yet finalized are dropped: the
        checkpoint is authoritative.
        """
        id_map = check_state_dict(state_dict, self.param_groups, self.defaults)
        saved_groups = [
            {**saved, "capturable": group["capturable"]}
            for saved, group in zip(state_dict["param_groups"], self.param_groups)
        ]
        for i, saved in enumerate(saved_groups):
            try:
                check_capturable({**self.defaults, **saved})
            except ValueError as e:
                raise ValueError(f"checkpoint param group {i}: {e}") from None
        state_dict = {**state_dict, "param_groups": saved_groups}
        before = {"state": self.state, "param_groups": self.param_groups}
        before["_pending"] = self._pending
        try:
            super().load_state_dict(state_dict)
            # per-param steps taken since the last finalization are dropped: the checkpoint's D
            # state and moments replace what they changed (finalizing them would advance k past it)
            self._pending = {}
            self._flat = None  # the native plan holds the replaced state tensors
            self._repack = {id(g) for g in self.param_groups}  # the fused path re-packs small params' state
            for pid, saved in state_dict["state"].items():
                if pid not in id_map:
                    continue  # an entry that is not a param's (kept as it is)
                p, hp = id_map[pid]
                for key in ("exp_avg", "exp_avg_sq", "s"):
                    if key in saved and key in self.state[p]:
                        dtype = state_dtype(p.dtype, hp) if saved[key].is_floating_point() else saved[key].dtype
                        if self.state[p][key].dtype != dtype:  # torch cast it to the param dtype: redo from the source
                            self.state[p][key] = saved[key].to(device=self.state[p][key].device, dtype=dtype)
        except Exception:
            self.__dict__.update(before)
            raise

    def _check_before_step(self) -> None:
        """Hyperparameters (a scheduler may have set them), gradients and D-group agreement."""
        for i, group in enumerate(self.param_groups):
            self._check_group(i, group)
            check_grads(group, i, self.state)
        for members in self.d_groups():
            groups = [self.param_groups[i] for i in members]
            check_d_group_agrees(groups, members)
            params = [p for g in groups for p in g["params"] if p.grad is not None]
            if params and not any(_distributed.is_dtensor(p) for p in params):
                one_device(params, members)

    def d_groups(self) -> list[list[int]]:
        """Indices of the param groups sharing each D estimate, ordered by their first group.

        Groups with the same ``d_group`` label share one D; groups without one follow
        ``independent_d`` (False: one D for all; True: one per group; None: one per group when
        there is more than one group).
        """
        n = len(self.param_groups)
        independent = self.independent_d if self.independent_d is not None else n > 1
        where: dict[Any, int] = {}
        out: list[list[int]] = []
        for i, group in enumerate(self.param_groups):
            label = group.get("d_group")
            key = ("label", label) if label is not None else ("auto", i if independent else -1)
            if key not in where:
                where[key] = len(out)
                out.append([])
            out[where[key]].append(i)
        return out

    def diagnostics(self) -> _diagnostics.Diagnostics:
        """One record per D-group (its D values, growth, step count, status, each group's lr and
        effective_lr); prints readably, ``.as_dict()`` is flat. See ``kprodigy.DGroupDiagnostics``."""
        return _diagnostics.diagnostics(self)

    def get_learning_rates(self) -> list[float]:
        """The step size ``d * lr * bias_correction`` applied by the last step, per param group
        (with ``capturable=True`` this reads the ``effective_lr`` tensors on the host)."""
        return [float(group["effective_lr"]) for group in self.param_groups]

    @_compat.compiler_disable(reason=_NOT_TRACED)
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss.

        Not traced by ``torch.compile`` (see the class docstring): ``torch.compile(opt.step)``
        runs this eager step (the native path, or the compiled kernels of ``fused``).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.finalize_step()  # per-parameter steps taken since the last step, if any
        if self._flat_step():  # the kept native plan, where it still holds
            return loss
        self._flat = None
        self._check_before_step()  # bad hyperparameters or gradients: raise before any change
        jobs = []  # (members, groups, segments, the optimizer's params of those segments)
        for members in self.d_groups():
            groups = [self.param_groups[i] for i in members]
            check_same_d_steps(groups, members)
            built = [self._segment(group, frozen=_is_frozen(groups[0])) for group in groups]
            jobs.append((members, groups, [seg for seg, _ in built], [p for _, ps in built for p in ps]))
        reduce_stats = self._reduce_stats([p for job in jobs for p in job[3]])
        if reduce_stats is None:  # no gradients in a D-group this step: nothing happens there
            jobs = [job for job in jobs if job[3]]
        if self._native_step(jobs, reduce_stats):
            return loss
        # under a reduction every rank steps every D-group (zero local statistics if it holds none)
        fallback = self._fallback_device()
        self._bind_d_tensors()
        d_states = []
        for members, groups, _, params in jobs:
            d_states.append(self._d_state(groups, members, params, fallback))
        with _scratch.owned_by(self._scratch()):
            outs = step_d_groups(
                [job[2] for job in jobs],
                d_states,
                update_d=[_updates_d(job[1][0]) for job in jobs],
                foreach=[job[1][0]["foreach"] for job in jobs],
                fused=[job[1][0]["fused"] for job in jobs],
                inplace=True,
                reduce_stats=reduce_stats,
            )
        self._record(
            [(groups, params, old, new) for (_, groups, _, params), old, (_, new) in zip(jobs, d_states, outs)]
        )
        return loss

    def _d_state(
        self, groups: list[dict[str, Any]], members: list[int], params: list[Tensor], fallback: torch.device
    ) -> DState:
        """The D state of a D-group as 0-dim device tensors: a capturable D-group's own group keys
        (bound by ``_bind_d_tensors``), else built from its first group's Python floats."""
        lead = groups[0]
        if lead["capturable"]:
            return DState(**{key: lead[key] for key in D_STATE_FIELDS})
        return _group_keys.new_d_state(lead, *self._placement(params, members, fallback))

    def _placement(
        self, params: list[Tensor], members: list[int], fallback: torch.device
    ) -> tuple[torch.device, torch.dtype]:
        """Device and statistics dtype of a D-group's D state: those of ``params``.

        A rank holding none of a D-group's params (ZeRO) takes ``fallback`` and the optimizer's
        dtypes, so that every rank computes D in the same dtype.
        """
        device = one_device(params, members) if params else fallback
        dtypes = [p.dtype for p in params] or [p.dtype for g in self.param_groups for p in g["params"]]
        return device, stat_dtype(dtypes)

    def _fallback_device(self) -> torch.device:
        return next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))

    def _bind_d_tensors(self) -> None:
        """Capturable D-groups: hold the D state in the group keys as persistent 0-dim tensors.

        Per D-group whose groups are all capturable: on the device of all its params, in their
        statistics dtype, the same tensor objects in every group (the first group's values win),
        never shared with another D-group; and one ``effective_lr`` tensor per group. Once bound
        this compares metadata only (no host read); binding (a new group, a loaded checkpoint,
        a moved model) copies the values once and reads tensors held elsewhere on the host.
        """
        if not any(g["capturable"] for g in self.param_groups):
            return  # the default mode: nothing to bind
        fallback = self._fallback_device()
        seen: set[int] = set()  # ids of the tensors already bound
        for members in self.d_groups():
            groups = [self.param_groups[i] for i in members]
            if not all(g["capturable"] for g in groups):
                continue
            lead = groups[0]
            device, dtype = self._placement([p for g in groups for p in g["params"]], members, fallback)
            if not all(_group_keys.bound(lead[key], device, _group_keys.d_dtype(key, dtype), seen) for key in D_STATE_FIELDS):
                fresh = _group_keys.new_d_state(lead, device, dtype)
                lead.update({key: getattr(fresh, key).clone() for key in D_STATE_FIELDS})
            seen.update(id(lead[key]) for key in D_STATE_FIELDS)
            for group in groups:
                group.update({key: lead[key] for key in D_STATE_FIELDS})
                if not _group_keys.bound(group["effective_lr"], device, dtype, seen):
                    group["effective_lr"] = torch.tensor(float(group["effective_lr"]), dtype=dtype, device=device)
                seen.add(id(group["effective_lr"]))

    def _record(self, done: list[tuple[list[dict[str, Any]], list[Tensor], DState, DState]]) -> None:
        """Write back the new D state and effective_lr of each stepped D-group; freeze D if due.

        done: (groups, stepped params, D state before the step, D state after it) per D-group.
        The D cap (``d_ratio_cap``) acts here, over the D-groups that stepped with some lr > 0.
        """
        news = [new for _, _, _, new in done]
        live = self._capped_d_groups([groups for groups, *_ in done])
        if live:
            capped = _schedule.cap_d_ratio([news[j].d for j in live], cast(float, self.d_ratio_cap))
            for j, d in zip(live, capped):
                news[j] = news[j].replace(d=d)
        rows: dict[torch.device, list[Tensor]] = {}  # per device, the values of its D-groups: one read each
        where = []  # per default-mode D-group: (device, start, end) of its values
        for (groups, params, old, _), new in zip(done, news):
            if groups[0]["capturable"]:
                _group_keys.record_in_place(groups, [self.state[p] for p in params], old, new)
                continue
            lrs = effective_lrs([hparams(g) for g in groups], old)
            values = [getattr(new, key) for key in _group_keys.FLOAT_D_KEYS] + [new.k, new.skipped_steps] + lrs
            row = rows.setdefault(new.d.device, [])
            where.append((new.d.device, len(row), len(row) + len(values)))
            row += [v.double() for v in values]
        read = {device: torch.stack(ts).tolist() for device, ts in rows.items()}  # the host reads of the step
        n = len(_group_keys.FLOAT_D_KEYS)
        default = [item for item in done if not item[0][0]["capturable"]]
        for (groups, params, _, _), (device, start, end) in zip(default, where):
            values = read[device][start:end]
            k, skipped = groups[0]["k"], groups[0]["skipped_steps"]
            for group, lr in zip(groups, values[n + 2 :]):
                group.update(zip(_group_keys.FLOAT_D_KEYS, values[:n]))
                group["k"], group["skipped_steps"] = int(values[n]), int(values[n + 1])  # a skip keeps k
                group["effective_lr"] = lr
            self._recorded(groups, params, k, skipped)
        _diagnostics.after_step(self, [groups for groups, *_ in done])  # KProdigyWarning checks: host values only

    def _recorded(self, groups: list[dict[str, Any]], params: list[Tensor], k: int, skipped: int) -> None:
        """After a D-group's new keys are written (default mode): advance the stepped params'
        ``step``, warn on a first skip, freeze D if due. ``k``, ``skipped``: the counts before."""
        for p in params:
            self.state[p]["step"] += groups[0]["k"] - k  # 0 on a skipped step
        if groups[0]["skipped_steps"] > skipped:
            self._warn_skip([i for i, g in enumerate(self.param_groups) if any(g is h for h in groups)])
        # k as it stands now: a skipped step did not advance it, so D still adapts next step
        if _is_frozen(groups[0]) and not all(g["d_frozen"] for g in groups):
            for group in groups:
                group["d_frozen"] = True
                for p in group["params"]:  # D is fixed from now on: its statistics are not needed
                    self.state.get(p, {}).pop("s", None)
                    self.state.get(p, {}).pop("p0", None)

    def _native_step(self, jobs: list[Any], reduce_stats: Callable[[Tensor], Tensor] | None) -> bool:
        """The step on torch's fused AdamW kernel (``functional._native``) where every D-group
        qualifies; False (nothing done) where one does not. Lays the state of each group flat
        (values unchanged) and keeps the plan, which later steps reuse (``_flat_step``) while the
        layout, gradients and settings still match it.

        Qualifies: the default flags (``foreach`` and ``fused`` None), not capturable, and every
        segment that steps (lr > 0) ``_native.eligible``; steps that do not update D
        (``d_update_freq``, D frozen after ``d_steps``) and ``d_ratio_cap`` included.
        """
        if not jobs:
            return False
        for _, groups, segments, params in jobs:
            lead = groups[0]
            if lead["capturable"] or any(_distributed.is_dtensor(p) for p in params):
                return False  # (DTensor: the segments hold local shards, the plan the optimizer's params)
            if any(g["foreach"] is not None or g["fused"] is not None for g in groups):
                return False
            frozen = _is_frozen(lead)
            if any(seg.params and not _native.eligible(seg, frozen) for seg in segments):
                return False  # (lr=0 groups too: a kept plan may see their lr raised)
        entries: dict[int, _plan.PlanEntry] = {}
        for _, groups, segments, _ in jobs:
            frozen = _is_frozen(groups[0])
            for group, seg in zip(groups, segments):
                stepped = [p for p in group["params"] if p.grad is not None]
                flat = None
                if seg.params:
                    flat = _native.flat_group(seg, frozen)
                    if flat is None:  # lay the small params' state flat once, then gather it again
                        _layout.pack_states([self.state[p] for p in stepped if p.numel() < _native.SMALL])
                        seg, _ = self._segment(group, frozen=frozen)
                        flat = _native.flat_group(seg, frozen)
                    assert flat is not None
                entries[id(group)] = _plan.PlanEntry(group, seg.hparams, list(group["params"]), stepped, self.state, flat)
        for group in self.param_groups:  # a D-group without gradients this step: nothing to lay flat
            if id(group) not in entries:
                entries[id(group)] = _plan.PlanEntry(group, hparams(group), list(group["params"]), [], self.state, None)
        plan = _plan.Plan(self._d_group_key(), self.d_groups(), [entries[id(g)] for g in self.param_groups])
        if not self._run_flat(plan, reduce_stats):
            return False
        self._flat = plan
        return True

    def _flat_step(self) -> bool:
        """The step of the kept native plan (``_native_step``), if it still holds: the same
        groups, params, state tensors, gradient layout and eligible settings; False (nothing
        done) otherwise, and the full step runs (checks, gathering, maybe a new plan)."""
        plan: _plan.Plan | None = self.__dict__.get("_flat")
        if plan is None:
            return False
        if len(plan.entries) != len(self.param_groups):
            return False
        if plan.d_key != self._d_group_key():
            return False
        changed = set()  # the groups whose settings changed since the last step (a schedule)
        try:
            for i, (group, entry) in enumerate(zip(self.param_groups, plan.entries)):
                if group is not entry.group or group["capturable"]:
                    return False
                if group["foreach"] is not None or group["fused"] is not None:
                    return False
                hp = hparams(group)  # (validates: a bad value raises, and the full step says where)
                if hp is not entry.hp:  # new values: the rest of a full step's checks
                    check_lr_type(group["lr"])
                    check_capturable(group)
                    entry.hp = hp
                    changed.add(i)
                if entry.stepped and hp.lr > 0 and (entry.flat is None or not _native.eligible_hparams(hp)):
                    return False
                frozen = _is_frozen(self.param_groups[plan.lead_of[i]])
                if entry.flat is not None and not _native.fits(entry.flat, hp, frozen):
                    return False  # (the full step lays the group out again, or raises: slice_p, d_steps)
                if not entry.holds(self.state):
                    return False
            for members in plan.members:
                groups = [self.param_groups[i] for i in members]
                check_same_d_steps(groups, members)
                if len(members) > 1 and changed.intersection(members):
                    check_d_group_agrees(groups, members)
        except (ValueError, RuntimeError, TypeError):
            return False  # the full step raises it, with its context
        return self._run_flat(plan, self._reduce_stats(plan.stepped))

    def _run_flat(self, plan: _plan.Plan, reduce_stats: Callable[[Tensor], Tensor] | None) -> bool:
        """One step of a native plan (``_native.step_host``: ONE host read for all D-groups), then
        the group keys; False (nothing done) when a reduction across ranks has no local
        statistics to reduce (the general path steps that)."""
        jobs = []  # per D-group with stepped params: (its index in the plan, its entries)
        for j, members in enumerate(plan.members):
            entries = [plan.entries[i] for i in members]
            if not plan.params[j]:
                if reduce_stats is None:
                    continue  # no gradients in this D-group: nothing happens there
                return False
            if reduce_stats is not None and not any(e.hp.lr > 0 and e.stepped for e in entries):
                if any(e.hp.lr > 0 for e in entries):
                    return False
            jobs.append((j, entries))
        leads = [entries[0].group for _, entries in jobs]
        results = _native.step_host(
            [[_native.Member(e.hp, e.flat, [cast(Tensor, p.grad) for p in e.stepped]) for e in entries] for _, entries in jobs],
            [_native.HostD(*(lead[key] for key in _group_keys.FLOAT_D_KEYS)) for lead in leads],
            [lead["k"] for lead in leads],
            [plan.dtypes[j] for j, _ in jobs],
            [bool(_updates_d(lead)) for lead in leads],
            reduce_stats,
        )
        results = self._capped(results, leads, [[e.group for e in entries] for _, entries in jobs], [plan.dtypes[j] for j, _ in jobs])
        for (j, entries), lead, result in zip(jobs, leads, results):
            groups = [e.group for e in entries]
            k, skipped = lead["k"], lead["skipped_steps"]
            if result.d_state is None:  # skipped: nothing written, k stays
                for group in groups:
                    group["skipped_steps"] = skipped + 1
            else:
                for group, lr in zip(groups, result.dlrs):
                    group.update(_group_keys.host_d_keys(result.d_state), k=k + 1, effective_lr=lr)
            self._recorded(groups, plan.params[j], k, skipped)
        _diagnostics.after_step(self, [[e.group for e in entries] for _, entries in jobs])
        return True

    def _capped_d_groups(self, stepped: list[list[dict[str, Any]]]) -> list[int]:
        """The D-groups (indices into ``stepped``, each a D-group's param groups) that
        ``d_ratio_cap`` binds together: those that stepped with some lr > 0; none unless two."""
        if self.d_ratio_cap is None:
            return []
        live = [j for j, groups in enumerate(stepped) if any(g["lr"] > 0 for g in groups)]
        return live if len(live) > 1 else []

    def _capped(
        self,
        results: list[_native.HostResult],
        leads: list[dict[str, Any]],
        groups: list[list[dict[str, Any]]],
        dtypes: list[torch.dtype],
    ) -> list[_native.HostResult]:
        """``d_ratio_cap`` on the native path's results (``_schedule.cap_d_ratio_host``), over the
        D-groups ``_record`` caps on the general path; a skipped one with its D as it was."""
        live = self._capped_d_groups(groups)
        if not live:
            return results
        states = [results[j].d_state for j in live]
        ds = [leads[j]["d"] if state is None else state.d for j, state in zip(live, states)]
        capped = _schedule.cap_d_ratio_host(ds, cast(float, self.d_ratio_cap), [dtypes[j] for j in live])
        out = list(results)
        for j, state, d, new_d in zip(live, states, ds, capped):
            if new_d == d:
                continue
            if state is None:  # a skipped D-group: only its D is capped, as _record writes it
                for group in groups[j]:
                    group["d"] = new_d
            else:
                out[j] = replace(results[j], d_state=replace(state, d=new_d))
        return out

    def _scratch(self) -> dict[Any, Tensor]:
        """The reused CPU buffers of this optimizer's eager kernels (``functional._scratch``):
        held here, so that they go with the optimizer (not pickled or copied)."""
        return self.__dict__.setdefault("_scratch_store", {})

    def _d_group_key(self) -> tuple[Any, ...]:
        """What ``d_groups()`` depends on: a kept plan holds while this does not change."""
        return (self.independent_d, tuple(g.get("d_group") for g in self.param_groups))

    def _check_group(self, i: int, group: dict[str, Any]) -> None:
        """The settings of param group ``i`` (a scheduler may have set them): ValueError naming it."""
        try:
            check_lr_type(group["lr"])
            hparams(group)
            check_capturable(group)
        except ValueError as e:
            raise ValueError(f"param group {i}: {e}") from None

    def _warn_skip(self, members: list[int]) -> None:
        """Warn the first time a step is skipped for non-finite gradients (host side, after the step)."""
        if self.__dict__.get("_warned_skip"):
            return
        self._warned_skip = True
        warnings.warn(
            f"KProdigy skipped a step of param groups {members}: a gradient (or the D statistics) held NaN "
            "or inf; params, moments and D are unchanged. The group key 'skipped_steps' counts such "
            "steps (this warning is shown once).",
            UserWarning,
            stacklevel=_diagnostics.user_stacklevel(),
        )

    @torch.no_grad()
    def step_parameter(self, p: Tensor) -> None:
        """Step one param now, with the D of this step; D is updated by ``finalize_step()``.

        For fused backward passes: call it from ``p.register_post_accumulate_grad_hook`` (then
        ``p.grad`` may be freed at once), and call ``finalize_step()`` (or ``step()``) after each
        ``backward()``; ``state_dict()`` finalizes too. Called outside a backward pass for a ``p``
        already stepped since the last finalization, it finalizes that step first; inside one it
        raises (params needed by that backward must not move). A param without a gradient is
        skipped.

        The moments and ``s`` of ``p`` are updated now (so its gradient may be freed at once; with
        ``betas[0] == 0`` it is kept until ``finalize_step()``, whose param update reads it); the
        param itself moves in ``finalize_step()``, with the D of this step's update, so the result
        equals ``step()``'s up to float rounding (the D statistics are summed in another order).
        These use the eager kernels whatever ``fused`` says (the compiled update pass writes the
        moments and the param together, which would keep every gradient alive). A NaN/inf
        gradient skips the param and D updates of the whole D-group; the moments of the params
        stepped before it in that step have moved.
        """
        index = self._group_index(p)
        members = next(m for m in self.d_groups() if index in m)
        key = tuple(members)
        pending = self._pending.get(key)
        if pending is not None and any(q is p for q in pending.params):
            if torch._C._current_graph_task_id() != -1:  # inside backward(): params must not move now
                raise RuntimeError(
                    "step_parameter got a param already stepped since the last finalize_step(), during a "
                    "backward pass: the params of the previous step move in finalize_step() (with the D of "
                    "that step), so call optimizer.finalize_step() (or optimizer.step()) after each backward()"
                )
            self.finalize_step()
            pending = None
        if p.grad is None:
            return
        group = self.param_groups[index]
        check_grads({**group, "params": [p]}, index, self.state)  # before any change
        if pending is None:
            groups = [self.param_groups[i] for i in members]
            check_same_d_steps(groups, members)
            check_d_group_agrees(groups, members)
            self._bind_d_tensors()
            d_state = self._d_state(groups, members, [q for g in groups for q in g["params"]], p.device)
            pending = self._pending[key] = _Pending(
                groups, d_state, torch.zeros(2, dtype=d_state.d.dtype, device=p.device)
            )
        segment, _ = self._segment({**group, "params": [p]}, frozen=_is_frozen(pending.groups[0]))
        if pending.d_state.d.device != p.device:
            raise RuntimeError(
                f"param groups {members} share one D but hold params on {pending.d_state.d.device} and {p.device}; "
                "put them on one device or give the groups different d_group labels"
            )
        with _scratch.owned_by(self._scratch()):
            acc, stats = accumulate_segment(
                segment, pending.d_state, update_d=_updates_d(pending.groups[0]), foreach=group["foreach"], inplace=True
            )
        pending.stats += stats.to(pending.stats.dtype)
        pending.params.append(p)
        if acc is not None:
            pending.accumulated.append(acc)

    @torch.no_grad()
    def finalize_step(self) -> None:
        """Update D from the statistics of the params stepped by ``step_parameter``, then move those
        params with the new D (no-op if none)."""
        if not self._pending:
            return
        pending, self._pending = list(self._pending.values()), {}
        self._opt_called = True  # what LR schedulers check to know the optimizer stepped (as step() does)
        done = []
        for item in pending:
            lead = item.groups[0]
            upd = _updates_d(lead)
            reduce_stats = self._reduce_stats(item.params) if upd is not False else None
            with _scratch.owned_by(self._scratch()):
                new = apply_segments(
                    item.accumulated,
                    item.d_state,
                    item.stats,
                    hparams(lead),
                    update_d=upd,
                    reduce_stats=reduce_stats,
                )
            done.append((item.groups, item.params, item.d_state, new))
        self._record(done)

    def state_dict(self) -> dict[str, Any]:
        """As ``torch.optim.Optimizer.state_dict``, after finalizing pending per-parameter steps.

        The same format in both modes (prodigyopt's): Python numbers in the D group keys and in
        ``step``; with ``capturable=True`` their tensors are read on the host here.
        """
        self.finalize_step()
        state_dict = super().state_dict()
        for group in state_dict["param_groups"]:
            _group_keys.to_numbers(group)  # torch packed new group dicts: the optimizer's keep their tensors
        state_dict["state"] = {  # entries that are not per-param dicts pass through, as in torch
            pid: {**st, "step": int(st["step"])} if isinstance(st, dict) and isinstance(st.get("step"), Tensor) else st
            for pid, st in state_dict["state"].items()
        }
        return state_dict

    def _group_index(self, p: Tensor) -> int:
        for i, group in enumerate(self.param_groups):
            if any(q is p for q in group["params"]):
                return i
        raise ValueError("step_parameter got a tensor that is not a param of this optimizer")

    def _segment(self, group: dict[str, Any], frozen: bool = False) -> tuple[Segment, list[Tensor]]:
        """Gather one group's tensors with gradients, creating their state on first use.

        frozen: D no longer adapts (``d_steps``): ``s`` and ``p0`` are not kept; the kernels,
        which do not read them then, get empty placeholders.

        Returns the segment (local shards of DTensor params and state: the math is per rank) and
        the optimizer's params it holds, in the same order.
        """
        hp = hparams(group)
        params, grads, exp_avg_sqs, ss, p0s = [], [], [], [], []
        exp_avgs: list[Any] = []  # None entries only when betas[0] == 0 (then unused)
        originals: list[Tensor] = []
        created = False  # whether state was created: the small params' state is then re-packed
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad  # dense, real, shaped like p: checked by check_grads before any change
            state = self.state[p]
            if "exp_avg_sq" not in state:
                if group.get("factored") and _distributed.is_dtensor(p):
                    raise RuntimeError("factored=True does not support DTensor (FSDP2) params yet; use factored=False")
                state.update(_distributed.init_state(p, hp))
                state["step"] = _group_keys.step_count(0, p, group["capturable"])
                created = True
                if frozen:
                    del state["s"], state["p0"]
                if group.get("factored") and p.dim() >= 2:
                    state["exp_avg_sq"] = init_factored_v(p).to(state_dtype(p.dtype, hp))
            if hp.betas[0] > 0 and "exp_avg" not in state:  # beta1 raised from 0 mid-training
                state["exp_avg"] = torch.zeros_like(
                    p, dtype=state_dtype(p.dtype, hp), memory_format=torch.preserve_format
                )
                created = True
            originals.append(p)
            p, g = _distributed.local(p), _distributed.local(g)
            expected = (p.numel() + hp.slice_p - 1) // hp.slice_p
            if "s" in state and _distributed.local(state["s"]).numel() != expected:
                raise ValueError(
                    f"slice_p={hp.slice_p} does not match the state of a parameter of {p.numel()} elements "
                    f"(s has {_distributed.local(state['s']).numel()}); slice_p cannot change after the first step"
                )
            params.append(p)
            grads.append(g)
            exp_avgs.append(_distributed.local(state["exp_avg"]) if "exp_avg" in state else None)
            exp_avg_sqs.append(_distributed.local(state["exp_avg_sq"]))
            if "s" in state:
                ss.append(_distributed.flat_local(state["s"]))
                p0s.append(_distributed.flat_local(state["p0"]))
            else:
                if not frozen:
                    raise RuntimeError(
                        "the state of a parameter has no s/p0 (freed when D froze after d_steps), but its "
                        "D-group adapts D again: d_steps cannot be raised or removed after D froze"
                    )
                ss.append(p.new_empty(0))
                p0s.append(p.new_empty(0))
        repack = self.__dict__.setdefault("_repack", set())
        if created or id(group) in repack:
            repack.discard(id(group))
            self._pack_small_state(group, hp)
            return self._segment(group, frozen)  # the state tensors changed: gather them again
        segment = Segment(params, grads, exp_avgs if hp.betas[0] > 0 else None, exp_avg_sqs, ss, p0s, hp)
        return segment, originals

    def _pack_small_state(self, group: dict[str, Any], hp: Hyperparams) -> None:
        """With the fused path, lay the state of the group's small params back to back in one
        buffer per key and dtype (values unchanged), so that the compiled kernels step them in
        one call on the buffer itself (``_layout.flat_span``) instead of gathering copies. A
        bucket with a compact (0-dim) ``p0`` keeps its ``p0`` unpacked (it is gathered instead)."""
        params = [p for p in group["params"] if self.state.get(p)]
        if not use_fused(params, group["fused"]):
            return
        buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for p in params:
            st = self.state[p]
            plain = not _distributed.is_dtensor(p) and p.is_contiguous() and p.numel() < _fused.FLAT_MAX
            if plain and hp.slice_p == 1 and st["exp_avg_sq"].shape == p.shape:  # not factored
                buckets.setdefault((p.device, p.dtype), []).append(p)
        for ps in buckets.values():
            _layout.pack_states([self.state[p] for p in ps])

    def _reduce_stats(self, params: list[Tensor]) -> Callable[[Tensor], Tensor] | None:
        """The all-reduce of the D statistics if this step needs one (``_distributed.stats_reduction``)."""
        forced = any(g["fsdp_in_use"] for g in self.param_groups)
        return _distributed.stats_reduction(
            params, reduce_d_stats=self.reduce_d_stats, process_group=self.process_group, forced=forced
        )


class _Pending:
    """A D-group between ``step_parameter`` calls and ``finalize_step``."""

    def __init__(self, groups: list[dict[str, Any]], d_state: DState, stats: Tensor) -> None:
        self.groups = groups
        self.d_state = d_state  # the D state at the start of this step
        self.stats = stats  # running sum of the params' [numerator_delta, denom]
        self.params: list[Tensor] = []  # the params stepped so far
        self.accumulated: list[Any] = []  # their hooked halves (m, v, s written), whose param updates wait for the new D


def _is_frozen(lead: dict[str, Any]) -> bool:
    """Whether a D-group's D no longer adapts (``d_steps`` reached), from its first group."""
    return _schedule.frozen(lead["d_steps"], lead["k"])


def _updates_d(lead: dict[str, Any]) -> bool | None:
    """Whether this step updates the D statistics (``_schedule.updates_d``); None for a
    capturable D-group: the core decides it on the device, from k there."""
    if lead["capturable"]:
        return None
    return cast(bool, _schedule.updates_d(lead["d_update_freq"], lead["k"], lead["d_steps"]))
