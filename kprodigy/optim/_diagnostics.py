"""Run-time diagnostics of ``KProdigy``: ``diagnostics()``, ``log_dict()`` and ``KProdigyWarning``.

Nothing here runs unless asked, except the warning checks the shell calls after each step
(``after_step``). Those read only Python numbers: the D group keys that the default mode already
copies to the host once per D-group and step, and the ``lr`` values (Python floats). In
``capturable`` mode the D keys are device tensors: the D checks are skipped there (read
``diagnostics()`` instead, which reads the device when called).

Thresholds and the evidence behind them: ``benchmarks/NOTES.md``, "Diagnostics and warnings".
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = [
    "ADAM_LR",
    "DGroupDiagnostics",
    "Diagnostics",
    "KProdigyWarning",
    "LATE_GROWTH",
    "LATE_MIN_STEP",
    "STUCK_GROWTH",
    "STUCK_STEPS",
    "diagnostics",
    "log_dict",
]

ADAM_LR = 0.1  # every group's lr (> 0) below this looks like an Adam learning rate
STUCK_STEPS = 50  # steps with non-zero gradients after which D should have left d0 ...
STUCK_GROWTH = 10.0  # ... by at least this factor (29 normal runs: 2700x - 440000x at step 50)
LATE_MIN_STEP = 512  # the late-growth rule applies from this step on (k a power of 2) ...
LATE_GROWTH = 4.0  # ... and fires when D grew more than this factor over the last half of the steps
# (normal runs of the convergence suite: at most 2.13x at k >= 256; see benchmarks/NOTES.md)

_HALF = (torch.bfloat16, torch.float16)
_SIGNIFICAND_BITS = {torch.bfloat16: 8, torch.float16: 11}  # precision p: spacing at |x| is ~|x| * 2^(1-p)


class KProdigyWarning(UserWarning):
    """A K-Prodigy setting or D trajectory that is probably not what the user wants.

    Each warning names the cause and the fix and is shown once per optimizer. Filter them with
    ``warnings.filterwarnings("ignore", category=kprodigy.KProdigyWarning)``.
    """


@dataclass(frozen=True)
class DGroupDiagnostics:
    """The state of one D-group (the param groups sharing one D), read from the group keys.

    D values are step sizes in the units of the params (the L-inf scale of the distance D
    estimates); ``d_numerator`` and ``d_denom`` are the sums whose ratio (times ``d_coef``) is
    ``d_hat``. All are Python numbers (read from the device in ``capturable`` mode).

    ``status`` (one word; the first that applies, in this order):

    - ``frozen``: D no longer adapts (``d_steps`` reached).
    - ``capped``: ``d_ratio_cap`` bound this D at the last step (``d < d_max`` and
      ``d == d_ratio_cap * min(d of the D-groups with lr > 0)``).
    - ``starting``: fewer than ``STUCK_STEPS`` (50) steps taken and D within ``STUCK_GROWTH``
      (10x) of d0: too early to tell.
    - ``stuck_at_d0``: at least 50 steps taken and D still below 10 * d0 (normal runs are at
      2700 - 440000 x d0 by step 50 in the convergence suite; see ``KProdigyWarning`` for the causes).
    - ``growing``: the last D update raised D's running maximum (``d_hat >= d_max``): the current
      estimate is D itself, and the next one may be larger.
    - ``settled``: the current estimate is below D (``d_hat < d_max``): D stays where it is
      (D never decreases) until the estimate catches up.
    """

    index: int  # position in optimizer.d_groups()
    param_groups: tuple[int, ...]  # indices of the param groups sharing this D
    status: str
    d: float  # the D the next step uses
    d0: float  # initial D
    d_max: float  # running maximum of the estimates
    d_hat: float  # the last estimate, d_coef * d_numerator / d_denom (0.0 before the first update)
    d_numerator: float
    d_denom: float
    growth: float  # d / d0
    k: int  # steps taken (skipped steps not counted)
    skipped_steps: int  # steps skipped for non-finite gradients
    frozen: bool
    capped: bool
    lrs: tuple[float, ...]  # each param group's lr (the multiplier of D), in param_groups order
    effective_lrs: tuple[float, ...]  # each group's lr * bias_correction at the last step (D's multiplier)
    step_sizes: tuple[float, ...]  # each group's d * lr * bias_correction: the step the last step applied

    def as_dict(self) -> dict[str, float]:
        """A flat dict of floats (``status`` and ``index`` left out; lists as ``lr/<group>``)."""
        out: dict[str, float] = {}
        for key, value in asdict(self).items():
            if key in ("index", "status", "param_groups", "lrs", "effective_lrs", "step_sizes"):
                continue
            out[key] = float(value)
        for i, lr, eff, size in zip(self.param_groups, self.lrs, self.effective_lrs, self.step_sizes):
            out[f"lr/group{i}"] = float(lr)
            out[f"effective_lr/group{i}"] = float(eff)
            out[f"step_size/group{i}"] = float(size)
        return out

    def __str__(self) -> str:
        flags = "".join((" frozen" if self.frozen else "", " capped" if self.capped else ""))
        lrs = ", ".join(
            f"{i}: lr={lr:g} effective_lr={eff:.3g} step_size={size:.3e}"
            for i, lr, eff, size in zip(self.param_groups, self.lrs, self.effective_lrs, self.step_sizes)
        )
        return (
            f"D-group {self.index} (param groups {list(self.param_groups)}): {self.status}{flags}\n"
            f"  d={self.d:.4e} ({self.growth:.4g} x d0={self.d0:.1e})  d_max={self.d_max:.4e}  d_hat={self.d_hat:.4e}\n"
            f"  d_numerator={self.d_numerator:.4e}  d_denom={self.d_denom:.4e}  k={self.k}  skipped={self.skipped_steps}\n"
            f"  {lrs}"
        )


class Diagnostics(tuple):  # type: ignore[type-arg]
    """``optimizer.diagnostics()``: one ``DGroupDiagnostics`` per D-group, in ``d_groups()`` order."""

    def __str__(self) -> str:
        return "\n".join(str(record) for record in self)

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """All records flat: ``{prefix}dgroup{j}/{field}`` (see ``log_dict`` for the scheme)."""
        return {f"{prefix}dgroup{r.index}/{key}": value for r in self for key, value in r.as_dict().items()}


_WRAPPED = ("optimizer", "_optimizer", "base_optimizer", "_base_optimizer")


def _unwrap(optimizer: Any) -> Any:
    """The KProdigy inside wrappers: accelerate's AcceleratedOptimizer and Lightning's
    LightningOptimizer (``.optimizer``), timm's Lookahead (``._base_optimizer``), ..."""
    from ._kprodigy import KProdigy

    for _ in range(8):
        if isinstance(optimizer, KProdigy):
            return optimizer
        inner = next((getattr(optimizer, a) for a in _WRAPPED if getattr(optimizer, a, None) is not None), None)
        if inner is None:
            break
        optimizer = inner
    raise TypeError(f"expected a KProdigy (or a wrapper holding one as .optimizer), got {type(optimizer).__name__}")


def diagnostics(optimizer: Any) -> Diagnostics:
    """One record per D-group of a KProdigy (or a wrapper of one); see ``DGroupDiagnostics``.

    Reads the group keys only (device tensors are read on the host in ``capturable`` mode); nothing
    is computed during ``step()`` for it.
    """
    opt = _unwrap(optimizer)
    partition = opt.d_groups()
    live_ds = [float(opt.param_groups[m[0]]["d"]) for m in partition if any(opt.param_groups[i]["lr"] > 0 for i in m)]
    records = []
    for j, members in enumerate(partition):
        groups = [opt.param_groups[i] for i in members]
        lead = groups[0]
        d, d0, d_max = float(lead["d"]), float(lead["d0"]), float(lead["d_max"])
        d_hat, k = float(lead["d_hat"]), int(lead["k"])
        frozen = bool(lead.get("d_frozen")) or (lead.get("d_steps") is not None and k >= lead["d_steps"])
        cap = opt.d_ratio_cap
        capped = (
            cap is not None and len(live_ds) > 1 and d < d_max * (1 - 1e-6) and d <= cap * min(live_ds) * (1 + 1e-6)
        )
        growth = d / d0 if d0 > 0 else math.inf
        if frozen:
            status = "frozen"
        elif capped:
            status = "capped"
        elif growth < STUCK_GROWTH:
            status = "starting" if k < STUCK_STEPS else "stuck_at_d0"
        elif d_hat >= d_max:
            status = "growing"
        else:
            status = "settled"
        records.append(
            DGroupDiagnostics(
                index=j,
                param_groups=tuple(members),
                status=status,
                d=d,
                d0=d0,
                d_max=d_max,
                d_hat=d_hat,
                d_numerator=float(lead["d_numerator"]),
                d_denom=float(lead["d_denom"]),
                growth=growth,
                k=k,
                skipped_steps=int(lead["skipped_steps"]),
                frozen=frozen,
                capped=capped,
                lrs=tuple(float(g["lr"]) for g in groups),
                effective_lrs=tuple(float(g["effective_lr"]) for g in groups),
                step_sizes=tuple(float(g["step_size"]) for g in groups),
            )
        )
    return Diagnostics(records)


def log_dict(optimizer: Any, prefix: str = "kprodigy") -> dict[str, float]:
    """The flat scalar dict trainers log (TensorBoard ``add_scalars``, W&B ``log``, Lightning
    ``log_dict``, accelerate ``log``) for a KProdigy or a wrapper holding one as ``.optimizer``.

    Keys (``prefix`` and a ``/`` first; ``prefix=""`` leaves both out), all values floats:

    - per D-group j (``optimizer.d_groups()`` order): ``dgroup{j}/d``, ``dgroup{j}/d0``,
      ``dgroup{j}/d_max``, ``dgroup{j}/d_hat``, ``dgroup{j}/d_numerator``, ``dgroup{j}/d_denom``,
      ``dgroup{j}/growth`` (d / d0), ``dgroup{j}/k``, ``dgroup{j}/skipped_steps``,
      ``dgroup{j}/frozen`` and ``dgroup{j}/capped`` (0.0 or 1.0);
    - per param group i: ``group{i}/lr`` (the multiplier a scheduler sets),
      ``group{i}/effective_lr`` (``lr * bias_correction`` of the last step, the multiplier of D)
      and ``group{i}/step_size`` (``d * lr * bias_correction`` with the D of the last step: the
      step it applied).

    Costs one read of the group keys (with ``capturable=True``, host reads of device tensors).
    """
    head = f"{prefix}/" if prefix else ""
    out: dict[str, float] = {}
    for record in diagnostics(optimizer):
        for key, value in record.as_dict().items():
            if "/" not in key:
                out[f"{head}dgroup{record.index}/{key}"] = value
        for i, lr, eff, size in zip(record.param_groups, record.lrs, record.effective_lrs, record.step_sizes):
            out[f"{head}group{i}/lr"] = lr
            out[f"{head}group{i}/effective_lr"] = eff
            out[f"{head}group{i}/step_size"] = size
    return dict(sorted(out.items(), key=lambda item: _natural(item[0])))


def _natural(key: str) -> tuple[Any, ...]:
    """Sort ``group10`` after ``group9``."""
    import re

    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key))


# --------------------------------------------------------------------------- warnings
class _Monitor:
    """Per-optimizer memory of the warning checks (not saved in checkpoints: it restarts after a load)."""

    def __init__(self) -> None:
        self.warned: set[str] = set()
        self.nonzero_steps: dict[int, int] = {}  # id(lead group) -> steps with d_denom > 0 and lr > 0
        self.marks: dict[int, tuple[int, float, float]] = {}  # id(lead group) -> (k, d, max lr) at the last power of 2


def _monitor(opt: Any) -> _Monitor:
    monitor = opt.__dict__.get("_diag_monitor")
    if monitor is None:
        monitor = opt.__dict__["_diag_monitor"] = _Monitor()
    return monitor


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _reference_lr(group: dict[str, Any]) -> float | None:
    """The lr a group is configured with: the largest of ``lr`` and the bases torch and timm
    schedulers write into the group (``initial_lr``; OneCycleLR's ``max_lr``), so that a warm-up
    from 0 or an annealed tail does not look like an Adam lr. None if a value is not a Python number."""
    lr = _number(group["lr"])
    if lr is None:
        return None
    for key in ("initial_lr", "max_lr"):
        if key in group:
            base = _number(group[key])
            if base is None:
                return None
            lr = max(lr, base)
    return lr


def check_lr(opt: Any, when: str, use_schedule: bool) -> None:
    """Warn once if every param group with lr > 0 has an lr below ``ADAM_LR`` (0.1).

    use_schedule: judge by the schedule's base (``_reference_lr``) instead of the current lr alone.
    """
    monitor = _monitor(opt)
    if "adam_lr" in monitor.warned:
        return
    lrs = []
    for group in opt.param_groups:
        lr = _reference_lr(group) if use_schedule else _number(group["lr"])
        if lr is None:
            return  # a tensor lr: not read on the host
        if lr > 0:
            lrs.append(lr)
    if not lrs or max(lrs) >= ADAM_LR:
        return
    if use_schedule and all("initial_lr" not in g and "max_lr" not in g for g in opt.param_groups):
        return  # no scheduler base to judge by: a hand-written warm-up or decay would look alike
    monitor.warned.add("adam_lr")
    _warn(
        f"KProdigy: every param group's lr is below {ADAM_LR:g} ({when}: lr={_fmt(lrs)}). KProdigy's lr multiplies "
        "the step size D it estimates, so an Adam-style lr (1e-4, 1e-3) shrinks every step by that factor and slows "
        "the estimate of D by the same factor. Leave lr=1.0 (per-group multipliers such as 0.1 for one group beside "
        "1.0 are fine) and keep the schedule's shape (warm-up, cosine) relative to 1.0; tune d_coef instead of lr."
    )


def after_step(opt: Any, stepped: list[list[dict[str, Any]]]) -> None:
    """The checks run after each step (``_record``): host values only, nothing read from a device.

    stepped: the param groups of each D-group that stepped (the lead group first).
    """
    check_lr(opt, "at step time, from the schedule", use_schedule=True)
    monitor = _monitor(opt)
    for groups in stepped:
        lead = groups[0]
        if lead["capturable"] or isinstance(lead["d"], torch.Tensor):
            continue  # device tensors: no host read per step (diagnostics() reports the status)
        key = id(lead)
        if lead["d_denom"] > 0 and any(_number(g["lr"]) and g["lr"] > 0 for g in groups):
            monitor.nonzero_steps[key] = monitor.nonzero_steps.get(key, 0) + 1
        if (
            "stuck" not in monitor.warned
            and monitor.nonzero_steps.get(key, 0) >= STUCK_STEPS
            and lead["d"] < STUCK_GROWTH * lead["d0"]
        ):
            monitor.warned.add("stuck")
            _warn(_stuck_message(opt, groups))
        k = int(lead["k"])
        if k >= 1 and k & (k - 1) == 0:  # k a power of two: compare with D at k / 2
            lr = max((_number(g["lr"]) or 0.0 for g in groups), default=0.0)
            previous = monitor.marks.get(key)
            monitor.marks[key] = (k, float(lead["d"]), lr)
            if (
                previous is not None
                and "late" not in monitor.warned
                and k >= LATE_MIN_STEP
                and previous[0] * 2 == k
                and lr >= previous[2]  # not in a decaying tail, where D grows while d * lr falls
                and lead["d"] > LATE_GROWTH * previous[1]
                and not lead.get("d_frozen")
            ):
                monitor.warned.add("late")
                _warn(_late_message(opt, groups, previous, k))


def _members(opt: Any, groups: list[dict[str, Any]]) -> list[int]:
    return [i for i, g in enumerate(opt.param_groups) if any(g is h for h in groups)]


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:g}" for v in values)


def _stuck_message(opt: Any, groups: list[dict[str, Any]]) -> str:
    """Name the causes that apply, from host metadata and the D keys (no tensor is read)."""
    lead = groups[0]
    d, d0, k = float(lead["d"]), float(lead["d0"]), int(lead["k"])
    causes = []
    lrs = [float(g["lr"]) for g in groups if _number(g["lr"]) is not None]
    dlr = d * max(lrs, default=1.0)
    params = [p for g in groups for p in g["params"]]
    for dtype in _HALF:
        if any(p.dtype == dtype for p in params) and not (dtype == torch.bfloat16 and lead["stochastic_rounding"]):
            bits = _SIGNIFICAND_BITS[dtype]
            causes.append(
                f"{str(dtype).replace('torch.', '')} params: round-to-nearest loses an update of d*lr = {dlr:.1e} on "
                f"every weight larger than about {dlr * 2.0**bits:.1e} in magnitude, so p0 - p stays 0 and so does "
                "the D estimate. Fix: "
                + ("stochastic_rounding=True, " if dtype == torch.bfloat16 else "")
                + "float32 master weights (train float32 params under autocast), or a larger d0 (e.g. d0=1e-4)"
            )
    if lrs and max(lrs) < ADAM_LR:
        causes.append(
            f"a tiny lr ({_fmt(lrs)}): the D estimate scales with lr, so D grows {1 / max(lrs):g}x slower. Fix: lr=1.0"
        )
    if lead["safeguard_warmup"] and lead["use_bias_correction"]:
        causes.append(
            "safeguard_warmup=True together with use_bias_correction=True: the bias-correction factor (about 0.2 "
            "over the first ~100 steps at the default betas) scales the D estimate down early on, so D starts slowly. "
            "Measured both ways: an HF Trainer run stayed at D 8.8e-6 after 60 steps (8.5e-3 without "
            "safeguard_warmup), while on the byte-level LMs of benchmarks/results/presets this combination caught "
            "up and ended best. If the loss falls, let it run; if D stays near d0 for hundreds of steps: "
            "safeguard_warmup=False (or use_bias_correction=False)"
        )
    grad = _mean_abs_grad(lead, params, lrs)
    if grad is not None and grad < 10 * float(lead["eps"]):
        causes.append(
            f"gradients near zero (about {grad:.1e} per element, estimated from d_denom), against the Adam "
            f"denominator floor d*eps (eps={float(lead['eps']):g}): the updates vanish. Typical sources: gradients "
            "clipped to near zero (a tiny max_grad_norm), a loss scaled down (divided by a large accumulation "
            "count, an unscaled GradScaler), or a detached graph. Fix the gradient scale, or lower eps"
        )
    if not causes:
        causes.append(
            "none of the usual causes applies (16-bit params, a tiny lr, safeguard_warmup with bias correction, "
            "near-zero gradients). Check that the loss decreases; try a larger d0 or d_coef. If you chose d0 near "
            "the D you expect, this warning does not apply"
        )
    return (
        f"KProdigy: D of param groups {_members(opt, groups)} is still {d:.2e} ({d / d0:.3g} x d0={d0:g}) after {k} steps "
        f"with non-zero gradients (convergence-suite runs grow D 2700x or more by step {STUCK_STEPS}). Likely cause"
        + ("s" if len(causes) > 1 else "")
        + ": "
        + "; ".join(f"({i + 1}) {c}" for i, c in enumerate(causes))
        + "."
    )


def _mean_abs_grad(lead: dict[str, Any], params: list[torch.Tensor], lrs: list[float]) -> float | None:
    """Mean |gradient| per element from ``d_denom`` while D sits at d0 (metadata and host floats).

    With d = d0, ``s = sum_j beta3^(k-j) * w * g_j`` and w = d0 * lr (``d0`` with
    safeguard_warmup; times Adam's bias correction when on, about 1 here), so
    ``d_denom = ||s||_1 <= w * (1 - beta3^k) / (1 - beta3) * sum |g|``: this inverts it (a lower
    bound on the mean |g| when the gradient signs vary between steps).
    """
    k = int(lead["k"])
    denom, d0 = float(lead["d_denom"]), float(lead["d0"])
    beta3 = lead["beta3"] if lead["beta3"] is not None else math.sqrt(lead["betas"][1])
    n = sum((p.numel() + lead["slice_p"] - 1) // lead["slice_p"] for p in params)
    w = d0 if lead["safeguard_warmup"] else d0 * max(lrs, default=1.0)
    if lead["use_bias_correction"] and not lead["safeguard_warmup"]:
        b1, b2 = lead["betas"]
        w *= math.sqrt(1 - b2**k) / (1 - b1**k)
    weight = (1 - beta3**k) / (1 - beta3) if beta3 < 1 else float(k)
    if n == 0 or w <= 0 or weight <= 0:
        return None
    return denom / (w * weight * n)


def _late_message(opt: Any, groups: list[dict[str, Any]], previous: tuple[int, float, float], k: int) -> str:
    lead = groups[0]
    d = float(lead["d"])
    return (
        f"KProdigy: D of param groups {_members(opt, groups)} grew {d / previous[1]:.3g}x between step {previous[0]} "
        f"and step {k} ({previous[1]:.2e} -> {d:.2e}) at a constant or rising lr; in the convergence suite D grows "
        f"at most 2.1x over the second half of any run past step 256. D never decreases, so a late jump stays in "
        "every later step: usually the problem changed scale (unfrozen layers, a new data mix, a loss term switched "
        "on). Check the loss; if it is unstable, bound D: growth_rate (e.g. 1.02 per step), d_steps (freeze D once it settled), "
        "d_ratio_cap (across D-groups) or weight_decay."
    )


def _warn(message: str) -> None:
    warnings.warn(message, KProdigyWarning, stacklevel=user_stacklevel())


_OWN = (
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),  # kprodigy/
    os.path.join("torch", "optim"),  # the step wrappers of torch.optim.Optimizer
    os.path.join("torch", "utils", "_contextlib.py"),  # torch.no_grad on step()
    os.path.join("torch", "_dynamo", "eval_frame.py"),  # torch.compiler.disable on step()
)


def user_stacklevel() -> int:
    """The stacklevel of the first frame outside kprodigy and the torch wrappers around step()
    (the user's call)."""
    frame: Any = sys._getframe(1)
    level = 1
    while frame is not None and any(part in frame.f_code.co_filename for part in _OWN):
        frame, level = frame.f_back, level + 1
    return level
