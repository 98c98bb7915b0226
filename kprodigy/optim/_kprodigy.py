"""``KProdigy``: the ``torch.optim.Optimizer`` shell around the engine (``functional._engine``).

Bookkeeping only: it validates, maps param groups to D-groups, creates state lazily, keeps the
step's plan while it holds (``_plan.Kept``), holds the D state in the group keys prodigyopt
trainers read (``_group_keys``) and calls the engine, which holds all the arithmetic.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _compat
from ..functional import DState, Hyperparams, _distributed, _engine, _formats, _scratch
from ..functional._checkpoint import check_optimizer_state_dict
from ..functional._hyperparams import _from_fp32_state
from ..functional._scalars import frozen
from ..functional._state import d_dtype
from . import _diagnostics, _group_keys, _per_param, _plan
from ._checks import check_group, check_param_group, check_settings, one_device

__all__ = ["KProdigy"]


# Not traced: dynamo's OptimizerVariable reads ``capturable=True`` in every group inside the trace
# (and writes it back into the groups the step mutates: later eager steps change mode), and the D
# keys are host floats, so a trace would recompile whenever D or lr changes. ``fused`` compiles.
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
        if k % d_update_freq == 0 and d_denom == 0:  # all gradients zero: prodigyopt's early return
            stop here: x, the D keys and k stay
        if k % d_update_freq == 0:
            d_hat = d_coef * d_numerator / d_denom
            d     = max(d, d_hat) if d == d0 else d
            d_max = max(d_max, d_hat)
            d     = min(d_max, d * growth_rate)          # d never decreases
        x = x * (1 - wd * dlr)                        if weight_decay and decouple
        x = x - dlr * m / (sqrt(v) + d * eps)          (b1 = 0: x - dlr * d * g / (sqrt(v) + d * eps))
        k = k + 1

    This is prodigyopt 1.1.2's step (D in float64, as its Python floats): at the defaults KProdigy
    gives its numbers, float rounding apart. ``dlr`` uses D before this step's update, ``eps`` and
    the b1 = 0 step the D after it. ``p`` is ``slice_p``, ``p0`` the params at their first step.

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
        independent_d: one D per param group (True) or one for all (False, default, as prodigyopt);
            None: one per group when there is more than one (0.5.0's rule).
        maximize: maximize the objective (default False).
        fsdp_in_use: force the all-reduce of the D statistics (prodigyopt's flag; default False).
        reduce_d_stats: sum the D statistics over ranks (one D on every rank): None (default) where
            needed (DTensor params of FSDP2, FSDP1 flat params, inside ``ZeroRedundancyOptimizer``;
            not plain DDP); True forces it, False forbids it.
        process_group: the group to sum over (default: the sharding mesh's group for DTensor
            params, ZeRO's group under ZeroRedundancyOptimizer, else the default group).
        skip_nonfinite: skip a D-group's step (params, moments, D and ``k`` stay; the group key
            ``skipped_steps`` counts it, a warning the first time) when a gradient holds NaN or inf
            or its D statistics overflow (default True); decided on the device, no host sync (False
            saves a read of the gradients).
        state_precision: how exp_avg, exp_avg_sq and s are stored: "auto" (default: float32 for
            float32/float64 params; for 16-bit params bfloat16 written with unbiased stochastic
            rounding, no more state than prodigyopt keeps), "float32", "bfloat16" or "int8" (m and
            v as int8 codes with a float32 scale per 256 elements, s bfloat16; params under 4096
            elements keep bfloat16). ``p0`` keeps the param's dtype. Compact state is stepped by its
            own chunked kernels (``foreach`` and ``fused`` do not apply to it). A loaded
            checkpoint's state is converted to this optimizer's precision (docs/memory.md).
        fp32_state: deprecated alias: True is ``state_precision="float32"`` (the default before
            0.7), False ``"auto"``; DeprecationWarning.
        stochastic_rounding: round bfloat16 param updates stochastically (unbiased), so that updates
            below the bfloat16 spacing are not lost (default False).
        d_steps: freeze D once k reaches this (default None: never), equal within a D-group and
            fixed once D froze: the D statistics are skipped, ``s`` and ``p0`` freed (``d_frozen``).
        factored: keep the second moment of each param with 2+ dims as row and column means
            (Adafactor-style; about 1 word per param less), fixed at its first step (default False).
        d_ratio_cap: keep the D of every D-group within this factor (>= 1) of the smallest one
            after every step (default None: no cap), for a component whose D "grows forever".
        fused: compiled kernels (torch.compile: one kernel per pass, no param-sized temporaries; the
            first step compiles for seconds; foreach where compiling fails) if True; None (default)
            torch's fused AdamW kernel where that is the step exactly (float32/float64 params, D on
            the host; it compiles nothing, on any device); False: foreach.
        capturable: keep each D-group's D state as 0-dim tensors on its params' device, updated in
            place, so that ``step()`` reads nothing on the host and can be captured in a CUDA graph
            (default False; equal within a D-group). The D and step group keys are then those
            tensors (``float(group["d"])`` reads one; ``k``, ``skipped_steps`` int64), as is
            ``state[p]["step"]``; ``state_dict()`` holds numbers as in the default mode. A graph
            keeps the ``lr`` it was captured with. Not with ``d_steps``; no warning on a skip. A
            param's first step reads it on the host (``p0``): warm up before capturing.

    Param groups may carry ``d_group`` (any hashable; a str or int keeps checkpoints loadable with
    ``weights_only=True``): groups with equal ``d_group`` share one D, whatever ``independent_d``.

    Group keys for logging: ``d``, ``d_max``, ``d_numerator``, ``d_denom``, ``d_hat``, ``k``, ``lr``,
    ``effective_lr`` (``lr * bias_correction`` of the last step: the multiplier of D, as
    prodigy-plus-schedule-free defines it; OneTrainer and musubi-tuner log ``d * effective_lr``) and
    ``step_size`` (``d * effective_lr``: the step applied, also ``get_learning_rates()``).

    ``torch.compile(opt.step)`` runs the eager step (excluded from tracing), so changing ``lr`` or
    D never recompiles and the groups keep their flags; ``fused`` compiles the elementwise math.
    Fused backward: ``step_parameter(p)`` from ``p.register_post_accumulate_grad_hook`` (or
    OneTrainer's ``step_parameter(p, group, i)``) steps a param once its gradient is ready;
    ``finalize_step()`` (or ``step()``) updates D once all are in. Distributed: the D statistics
    of all D-groups are summed with ONE ``all_reduce`` per step, no host sync; steps that do not
    update D communicate nothing.
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
        independent_d: bool | None = False,
        maximize: bool = False,
        fsdp_in_use: bool = False,
        reduce_d_stats: bool | None = None,
        process_group: Any = None,
        d_steps: int | None = None,
        d_ratio_cap: float | None = None,
        factored: bool = False,
        skip_nonfinite: bool = True,
        stochastic_rounding: bool = False,
        fused: bool | None = None,
        capturable: bool = False,
        state_precision: str = "auto",
        fp32_state: bool | None = None,
    ) -> None:
        if fp32_state is not None:  # the deprecated alias (ValueError for a bad value, or a conflict)
            state_precision = _from_fp32_state(fp32_state, state_precision, stacklevel=3)
        for name, value in (("independent_d", independent_d), ("reduce_d_stats", reduce_d_stats)):
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"Invalid {name}: {value!r}; expected None, True or False")
        if reduce_d_stats is False and fsdp_in_use is True:
            raise ValueError("fsdp_in_use=True forces the D all-reduce but reduce_d_stats=False forbids it; set one")
        if process_group is not None and not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
            raise ValueError(f"Invalid process_group: {process_group!r}; expected a torch.distributed ProcessGroup")
        if d_ratio_cap is not None and (
            isinstance(d_ratio_cap, bool) or not isinstance(d_ratio_cap, (int, float)) or not d_ratio_cap >= 1
        ):
            raise ValueError(f"Invalid d_ratio_cap: {d_ratio_cap!r}; expected None or a number >= 1")
        hp = dict(lr=lr, betas=betas, beta3=beta3, eps=eps, weight_decay=weight_decay, decouple=decouple)
        hp.update(use_bias_correction=use_bias_correction, safeguard_warmup=safeguard_warmup, d0=d0, d_coef=d_coef)
        hp.update(growth_rate=growth_rate, d_update_freq=d_update_freq, slice_p=slice_p, maximize=maximize)
        hp.update(skip_nonfinite=skip_nonfinite, stochastic_rounding=stochastic_rounding)
        hp.update(state_precision=state_precision)
        defaults: dict[str, Any] = {**hp, "d_steps": d_steps, "foreach": foreach, "fused": fused, "factored": factored}
        defaults.update(fsdp_in_use=fsdp_in_use, capturable=capturable, d_group=None, d_frozen=False)
        defaults.update(effective_lr=0.0, step_size=0.0)
        defaults.update(_group_keys.fresh_d_keys(d0) if isinstance(d0, (int, float)) else {})
        checked = check_settings(defaults)  # ValueError naming the setting
        defaults.update({name: getattr(checked, name) for name in Hyperparams.field_names() if name != "fp32_state"})
        self.d_ratio_cap = None if d_ratio_cap is None else float(d_ratio_cap)
        self.independent_d, self.reduce_d_stats = independent_d, reduce_d_stats
        self.process_group = process_group if process_group is not None else _distributed.enclosing_zero_group()
        self._pending: dict[tuple[int, ...], _per_param.Pending] = {}  # per-param steps not yet finalized
        self._kept: _plan.Kept | None = None  # the plan of the last step, reused while it holds
        super().__init__(params, defaults)
        _diagnostics.check_lr(self, "at construction", use_schedule=False)  # KProdigyWarning

    @property  # type: ignore[override]
    def state(self) -> defaultdict[Tensor, Any]:
        """torch's per-param state (``exp_avg``, ``exp_avg_sq``, ``s``, ``p0``, ``step``), with
        prodigyopt's values: the default step keeps the moments and ``s`` scaled between steps
        (``functional/_adamw.py``), and reading ``state`` multiplies the scales back in first."""
        _plan.normalize(self)
        return self.__dict__["state"]  # type: ignore[no-any-return]

    @state.setter
    def state(self, value: defaultdict[Tensor, Any]) -> None:
        self.__dict__["state"] = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its settings are validated first (a bad group changes nothing)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        check_param_group(param_group, self.param_groups)
        check_settings({**self.defaults, **param_group})
        if "d0" in param_group:  # a group-specific d0 starts its own D there
            for key, value in _group_keys.fresh_d_keys(float(param_group["d0"])).items():
                param_group.setdefault(key, value)
        super().add_param_group(param_group)
        try:
            self._bind()  # capturable: the new group's D keys become device tensors
        except Exception:
            self.param_groups.pop()
            raise

    def __getstate__(self) -> dict[str, Any]:
        """torch's state plus the optimizer-wide settings, which ``copy.deepcopy`` and pickling keep
        (``process_group``, not picklable, is left out)."""
        _plan.normalize(self)
        state = {k: v for k, v in super().__getstate__().items() if k not in ("_kept", "_pending", "_scratch_store")}
        state.update(independent_d=self.independent_d, reduce_d_stats=self.reduce_d_stats, d_ratio_cap=self.d_ratio_cap)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Fill keys missing from older or prodigyopt checkpoints; D values and steps become Python
        numbers, or persistent device tensors in capturable groups (``_bind``). torch's
        ``__setstate__`` adds ``differentiable`` to ``defaults``, which KProdigy has not: taken out
        again (else every group would get it: load -> save unstable)."""
        had_differentiable = "differentiable" in state.get("defaults", self.__dict__.get("defaults", {}))
        super().__setstate__(state)
        if not had_differentiable:
            self.defaults.pop("differentiable", None)
        for key in ("independent_d", "reduce_d_stats", "process_group", "d_ratio_cap"):
            self.__dict__.setdefault(key, None)
        self._pending, self._kept = {}, None
        self.defaults.setdefault("capturable", False)  # optimizers pickled before capturable existed
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            if not group["capturable"]:
                _group_keys.to_numbers(group)
            for p in (p for p in group["params"] if "step" in self.state.get(p, {})):
                self.state[p]["step"] = _group_keys.step_count(self.state[p]["step"], p, group["capturable"])
        self._bind()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint (ours, an older version's, or prodigyopt's) atomically: validated first
        (layout, keys, shapes, dtypes, finite values, hyperparameters), a bad one raises ValueError
        and changes nothing. ``state_precision`` and ``capturable`` stay this optimizer's: the
        moments and ``s`` are converted to its state format (``_formats.convert``, chunk by chunk;
        torch's loader would cast them to the param dtype), D is held as it holds it. Per-param
        steps not yet finalized are dropped."""
        _plan.release(self)
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if isinstance(groups, (list, tuple)):  # this optimizer's state_precision and capturable
            mine = [{"capturable": g["capturable"], "state_precision": g["state_precision"]} for g in self.param_groups]
            groups = [_own_keys(saved, m) if isinstance(saved, dict) else saved for saved, m in zip(groups, mine)]
            state_dict = {**state_dict, "param_groups": groups + list(state_dict["param_groups"][len(groups) :])}
        id_map = check_optimizer_state_dict(state_dict, self.param_groups, self.defaults)
        for i, saved in enumerate(state_dict["param_groups"]):
            check_group({**self.defaults, **saved}, i, "checkpoint param group")
        before = {"state": self.state, "param_groups": self.param_groups, "_pending": self._pending}
        try:
            super().load_state_dict(state_dict)
            self._pending, self._kept = {}, None  # the checkpoint replaces what they changed
            precisions = {id(q): g["state_precision"] for g in self.param_groups for q in g["params"]}
            for pid, saved in state_dict["state"].items():
                if pid not in id_map:
                    continue  # an entry that is not a param's (kept as it is)
                p = id_map[pid][0]
                precision = precisions[id(p)]
                for key in ("exp_avg", "exp_avg_sq", "s"):
                    if key in saved and key in self.state[p]:  # from the source: torch cast it to the param dtype
                        source = saved[key].to(device=self.state[p][key].device)
                        self.state[p][key] = _formats.convert(source, key, p, precision)
        except Exception:
            self.__dict__.update(before)
            raise

    def state_dict(self) -> dict[str, Any]:
        """As ``torch.optim.Optimizer.state_dict``, after finalizing pending per-parameter steps;
        prodigyopt's format in both modes (Python numbers in the D keys and ``step``)."""
        self.finalize_step()
        state_dict = super().state_dict()
        for group in state_dict["param_groups"]:
            _group_keys.to_numbers(group)  # torch packed new group dicts: the optimizer's keep their tensors
        state_dict["state"] = {  # entries that are not per-param dicts pass through, as in torch
            pid: {**st, "step": int(st["step"])} if isinstance(st, dict) and isinstance(st.get("step"), Tensor) else st
            for pid, st in state_dict["state"].items()
        }
        return state_dict

    def d_groups(self) -> list[list[int]]:
        """Indices of the param groups sharing each D, ordered by their first group: equal
        ``d_group`` labels share one; groups without a label follow ``independent_d``."""
        independent = self.independent_d if self.independent_d is not None else len(self.param_groups) > 1
        out: dict[Any, list[int]] = {}  # (ordered by first group)
        for i, group in enumerate(self.param_groups):
            label = group.get("d_group")
            out.setdefault(("label", label) if label is not None else ("auto", i if independent else -1), []).append(i)
        return list(out.values())

    def diagnostics(self) -> _diagnostics.Diagnostics:
        """One record per D-group (its D values, growth, step count, status, each group's lr and
        effective_lr); prints readably, ``.as_dict()`` is flat. See ``kprodigy.DGroupDiagnostics``."""
        return _diagnostics.diagnostics(self)

    def get_learning_rates(self) -> list[float]:
        """The step size ``d * lr * bias_correction`` applied by the last step, per param group:
        the group key ``step_size`` (with ``capturable=True`` its tensors are read on the host)."""
        return [float(group["step_size"]) for group in self.param_groups]

    def supports_fused_back_pass(self) -> bool:
        """True: ``step_parameter(p, group, i)`` from the gradient hooks, then ``step()`` (the
        convention of OneTrainer's fused back pass, prodigy-plus-schedule-free and adv_optm)."""
        return True

    @_compat.compiler_disable(reason=_NOT_TRACED)
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss.
        After ``step_parameter`` calls it finishes their step (``finalize_step()``) and steps nothing
        else, whatever gradients are left in ``.grad``. ``torch.compile(opt.step)`` runs it eagerly."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._pending:  # per-parameter steps taken since the last step: this step finishes them
            self.finalize_step()
            return loss
        kept = self._kept if self._kept is not None and self._kept.holds(self) else _plan.build(self)
        groups, stepped = kept.by_d_group, kept.stepped
        old = [self._d_state(g, kept.plan.on_host) for g in groups]
        if kept.dtensor:
            grads = [[[_distributed.local(p.grad) for p in ps] for ps in d] for d in stepped]  # type: ignore[arg-type]
        else:
            grads = [[[p.grad for p in ps] for ps in d] for d in stepped]  # type: ignore[misc]
        distributed = dist.is_available() and dist.is_initialized()
        reduce_stats = self._reduce_stats([p for d in kept.stepped for ps in d for p in ps]) if distributed else None
        with _scratch.owned_by(self._scratch()):
            _, new = _engine.step(kept.plan, grads, old, reduce_stats=reduce_stats, d_ratio_cap=self.d_ratio_cap)
        for g, hps, params, o, n in zip(groups, kept.hps_by_d_group(), stepped, old, new):
            self._record(g, [p for group, ps in zip(g, params) if group["lr"] > 0 for p in ps], o, n, hps)
        _diagnostics.after_step(self, [g for g, ps in zip(groups, stepped) if any(ps)])
        return loss

    def _d_state(self, groups: list[dict[str, Any]], on_host: bool) -> DState:
        """A D-group's D state in the plan's form: host numbers or tensors."""
        ds = _group_keys.read(groups[0])
        if on_host or isinstance(ds.d, Tensor):
            return ds
        device = self._device([p for g in groups for p in g["params"]])
        return ds.on_device(device, d_dtype(device))

    def _record(
        self, groups: list[dict[str, Any]], params: list[Tensor], old: DState, new: DState, hps: list[Hyperparams]
    ) -> None:
        """After a D-group's step: its group keys, the ``step`` of the params it moved (with gradients,
        in groups with lr > 0), a warning on the first skip, and D frozen (``d_steps``) where due;
        ``hps`` the groups' hyperparameters."""
        if new is old:
            return  # nothing changed (no gradients, or every lr 0)
        lead = groups[0]
        if not lead["capturable"] and isinstance(new.d, Tensor):
            new = new.on_host()  # (a plan with D on the device, for another D-group)
        advanced = new.k - old.k  # (before the write: capturable keys are old's tensors)
        state = _plan.raw_state(self)
        _group_keys.write(groups, hps, old, new, stepped=bool(params) and any(hp.lr > 0 for hp in hps))
        if lead["capturable"]:
            if params:
                # alpha: the Tensor overload (without it, the Scalar one reads ``advanced`` on the host)
                torch._foreach_add_([state[p]["step"] for p in params], advanced, alpha=1)
            return
        for p in params:
            state[p]["step"] += advanced
        if new.skipped_steps > old.skipped_steps:
            self._warn_skip([i for i, g in enumerate(self.param_groups) if any(g is h for h in groups)])
        if frozen(hps[0], new.k) and not lead["d_frozen"]:
            _plan.release(self)
            for group in groups:
                group["d_frozen"] = True
                for p in group["params"]:  # D is fixed from now on: its statistics are not needed
                    self.state.get(p, {}).pop("s", None)
                    self.state.get(p, {}).pop("p0", None)

    def _bind(self) -> None:
        """The D keys of capturable D-groups as persistent 0-dim device tensors."""
        if not any(g["capturable"] for g in self.param_groups):
            return
        seen: set[int] = set()
        for m in self.d_groups():
            groups = [self.param_groups[i] for i in m]
            if all(g["capturable"] for g in groups):
                _group_keys.bind(groups, self._device([p for g in groups for p in g["params"]], m), seen)

    def _device(self, params: list[Tensor], members: list[int] | None = None) -> torch.device:
        """Where a D-group's D lives: its params' device (or the optimizer's first param's)."""
        if params:
            return one_device(params, members or [])
        return next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))

    def _scratch(self) -> dict[Any, Tensor]:
        """The eager kernels' reused CPU buffers (``functional._scratch``), which go with the optimizer."""
        return self.__dict__.setdefault("_scratch_store", {})

    def _reduce_stats(self, params: list[Tensor]) -> Callable[[Tensor], Tensor] | None:
        forced = any(g["fsdp_in_use"] for g in self.param_groups)
        rds, group = self.reduce_d_stats, self.process_group
        return _distributed.stats_reduction(params, reduce_d_stats=rds, process_group=group, forced=forced)

    def _warn_skip(self, members: list[int]) -> None:
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
    def step_parameter(self, p: Tensor, group: dict[str, Any] | None = None, i: int | None = None) -> None:
        """Step one param now, with the D of this step; D is updated by ``finalize_step()``.

        For fused backward passes: call it from ``p.register_post_accumulate_grad_hook`` (then
        ``p.grad`` may be freed at once) or as OneTrainer does, ``step_parameter(p, group, i)`` (p's
        group and index in it), then ``finalize_step()`` (or ``step()``) after each ``backward()``;
        ``state_dict()`` finalizes too. For a ``p`` already stepped since the last finalization it
        finalizes first, or raises inside a backward pass. A param without a gradient is skipped.
        The moments and ``s`` move now (with ``betas[0] == 0`` the gradient is kept), the param in
        ``finalize_step()`` with the new D: ``step()``'s result up to float rounding (the statistics
        summed in another order), on the eager kernels. A NaN/inf gradient skips the param and D
        updates of its D-group (the moments of the params stepped before it have moved).
        """
        _per_param.step_parameter(self, p, group, i)

    @torch.no_grad()
    def finalize_step(self) -> None:
        """Update D from the statistics of the params stepped by ``step_parameter``, then move them."""
        _per_param.finalize(self)


def _own_keys(saved: dict[str, Any], mine: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's param group with this optimizer's ``mine`` keys, without the deprecated
    ``fp32_state`` (older checkpoints: the state is converted to ``state_precision`` instead)."""
    return {**{k: v for k, v in saved.items() if k != "fp32_state"}, **mine}
