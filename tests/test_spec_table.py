"""One table of configurations, run against every backend, on trajectories where D grows.

Two references, both independent of the code under test:
- ``tests/reference.py``: a float64 re-statement of DESIGN.md (Python floats for D, one tensor
  at a time), fed the same gradients as the optimizer, for every backend (per-tensor, foreach,
  compiled, capturable, ``step_parameter``) with the non-finite skip on and off;
- ``prodigyopt`` 1.1.2 itself, for the configurations it supports, at its defaults and options.

Every run asserts that D grew at least 10x (so that D's arithmetic is exercised, not d0's), and
compares relative errors of params and D; NaN never passes.

Also: float32 rows (every backend against per_tensor and against prodigyopt, tolerances calibrated
on the paths that agree today: see the comment above ``F32_TOL``), and zero-gradient rows (steps
whose gradients are all exactly zero, where ``d_denom`` is 0) against the re-statement and
prodigyopt, on every backend.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import prodigyopt
import pytest
import torch
from reference import Reference
from torch import Tensor

from kprodigy import KProdigy

D_KEYS = ("d", "d_max", "d_numerator", "d_denom", "d_hat")

# name -> (param groups' hyperparameters, optimizer-wide kwargs, whether prodigyopt runs it).
# A single dict is one group with every param; a list of two splits weights / biases.
CONFIGS: dict[str, tuple[dict | list[dict], dict, bool]] = {
    "defaults": ({}, {}, True),
    "decoupled_wd": ({"weight_decay": 0.05}, {}, True),
    "coupled_wd": ({"weight_decay": 0.05, "decouple": False}, {}, True),
    "bias_correction": ({"use_bias_correction": True}, {}, True),
    "safeguard_warmup": ({"safeguard_warmup": True}, {}, True),
    "d_coef": ({"d_coef": 0.5}, {}, True),
    "growth_rate": ({"growth_rate": 1.2}, {}, True),
    "slice_p": ({"slice_p": 3}, {}, True),
    "beta1_zero": ({"betas": (0.0, 0.999)}, {}, True),
    "large_eps": ({"eps": 1e-3}, {}, True),
    "beta3": ({"betas": (0.95, 0.99), "beta3": 0.9}, {}, True),
    "decay_split": ([{"weight_decay": 0.1}, {"weight_decay": 0.0}], {}, True),
    # ours only: prodigyopt raises on lr multipliers and has none of these options
    "lr_multiplier": ([{"lr": 1.0}, {"lr": 0.25}], {}, False),
    "independent_d": ([{}, {"d0": 1e-5}], {"independent_d": True}, False),
    "d_update_freq": ({"d_update_freq": 3}, {}, False),
    "maximize": ({"maximize": True}, {}, False),
}

BACKENDS: dict[str, dict[str, bool]] = {
    "native": {},  # the defaults: torch's fused AdamW kernel where eligible (_native.py)
    "per_tensor": {"foreach": False, "fused": False},
    "foreach": {"foreach": True, "fused": False},
    "fused": {"fused": True},
    "capturable": {"capturable": True},
    "step_parameter": {"foreach": False, "fused": False},  # stepped by hooks, see run_ours
}

STEPS = 40


def make_model(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).double()


def data(seed: int = 1) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(64, 8, generator=gen, dtype=torch.float64)
    y = torch.sin(X @ torch.randn(8, 1, generator=gen, dtype=torch.float64))
    return X, y


def param_groups(model: torch.nn.Module, groups: dict | list[dict]) -> list[dict]:
    if isinstance(groups, dict):
        return [dict(params=list(model.parameters()), **groups)]
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [dict(params=weights, **groups[0]), dict(params=biases, **groups[1])]


def flat(model: torch.nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def rel_err(a: Tensor, b: Tensor) -> float:
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), "NaN/inf never passes"
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def rel(a: float, b: float) -> float:
    assert math.isfinite(a) and math.isfinite(b), "NaN/inf never passes"
    return abs(a - b) / max(abs(b), 1e-300)


def backward(model: torch.nn.Module, X: Tensor, y: Tensor) -> None:
    ((model(X) - y) ** 2).mean().backward()


def ours_and_reference(
    model: torch.nn.Module, pgs: list[dict], backend: str, kwargs: dict, **flags: Any
) -> tuple[KProdigy, Reference, list[list[int]]]:
    """KProdigy over ``pgs`` with ``backend``'s flags (its hooks on ``model`` for
    "step_parameter"), the float64 re-statement over the same D-groups, and those D-groups."""
    opt = KProdigy(pgs, **flags, **BACKENDS[backend], **kwargs)
    independent = kwargs.get("independent_d", False)
    d_groups = [[i] for i in range(len(pgs))] if independent else [list(range(len(pgs)))]
    ref = Reference([(g["params"], {k: v for k, v in g.items() if k != "params"}) for g in pgs], d_groups)
    if backend == "step_parameter":
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(opt.step_parameter)
    return opt, ref, d_groups


def run_ours(config: str, backend: str, *, skip: bool, nan_at: int | None) -> tuple[KProdigy, Reference, list[list[int]]]:
    """Train the MLP with KProdigy and, in lockstep on the same gradients, the float64 reference.

    ``nan_at``: a step whose gradients get a NaN (the skip is on): the reference skips it.
    Returns the optimizer, the reference and the D-groups (lists of param group indices).
    """
    groups, kwargs, _ = CONFIGS[config]
    model = make_model()
    X, y = data()
    pgs = param_groups(model, groups)
    opt, ref, d_groups = ours_and_reference(model, pgs, backend, kwargs, skip_nonfinite=skip)
    for k in range(STEPS):
        opt.zero_grad()
        backward(model, X, y)
        grads = [[p.grad.detach().clone() for p in g["params"]] for g in pgs]
        if nan_at == k and backend != "step_parameter":
            pgs[0]["params"][0].grad[0, 0] = float("nan")
        if backend == "step_parameter":
            opt.finalize_step()
        else:
            opt.step()
        if nan_at == k:  # the D-group holding the NaN (that of group 0) skips its step
            grads = [[None] * len(row) if i in d_groups[0] else row for i, row in enumerate(grads)]
        ref.step(grads)
    return opt, ref, d_groups


# (backend, skip_nonfinite): every backend with the skip on (and a NaN step that both skip), and
# off where the kernels take another branch without it
RUNS = [(b, True) for b in BACKENDS] + [(b, False) for b in ("native", "per_tensor", "foreach", "fused", "step_parameter")]


@pytest.mark.parametrize(("backend", "skip"), RUNS, ids=[f"{b}-{'skip' if s else 'noskip'}" for b, s in RUNS])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_backend_equals_float64_restatement(config: str, backend: str, skip: bool) -> None:
    nan_at = 7 if skip and backend != "step_parameter" else None  # a NaN step, skipped by both
    opt, ref, d_groups = run_ours(config, backend, skip=skip, nan_at=nan_at)
    for i, group in enumerate(opt.param_groups):
        for p, expected in zip(group["params"], ref.params(i)):
            assert rel_err(p.detach(), expected) < 1e-9, (i, rel_err(p.detach(), expected))
    for members, D in zip(d_groups, ref.ds):
        group = opt.param_groups[members[0]]
        assert group["d"] > 10 * group["d0"], "D must grow for the check to mean anything"
        assert group["k"] == D.k
        for key in D_KEYS:
            assert rel(float(group[key]), getattr(D, key)) < 1e-9, key
    if nan_at is not None:
        assert opt.param_groups[0]["skipped_steps"] == 1


@functools.cache
def run_prodigyopt(config: str, steps: int = 80) -> tuple[Tensor, list[float]]:
    groups, _, _ = CONFIGS[config]
    model = make_model()
    X, y = data()
    opt = prodigyopt.Prodigy(param_groups(model, groups))
    ds = []
    for _ in range(steps):
        opt.zero_grad()
        backward(model, X, y)
        opt.step()
        ds.append(float(opt.param_groups[0]["d"]))
    return flat(model), ds


PRODIGYOPT_CONFIGS = [name for name, (_, _, supported) in CONFIGS.items() if supported]


@pytest.mark.parametrize("backend", ["native", "per_tensor", "foreach", "fused", "capturable"])
@pytest.mark.parametrize("config", PRODIGYOPT_CONFIGS)
def test_prodigyopt_parity(config: str, backend: str) -> None:
    """At the defaults and with each of prodigyopt's options: prodigyopt's params and D, float64,
    80 steps in which D grows by orders of magnitude, to a relative 1e-6 (measured: ~1e-13)."""
    groups, _, _ = CONFIGS[config]
    ref_x, ref_d = run_prodigyopt(config)
    model = make_model()
    X, y = data()
    opt = KProdigy(param_groups(model, groups), **BACKENDS[backend])
    ds = []
    for _ in range(80):
        opt.zero_grad()
        backward(model, X, y)
        opt.step()
        ds.append(float(opt.param_groups[0]["d"]))
    assert ref_d[-1] > 100 * ref_d[0]
    assert rel_err(flat(model), ref_x) < 1e-6
    assert max(rel(a, b) for a, b in zip(ds, ref_d)) < 1e-6


def test_prodigyopt_parity_float32_defaults() -> None:
    """float32, every default: the trajectories agree to float32 rounding over 80 steps."""
    model = make_model().float()
    X, y = (t.float() for t in data())
    pmodel = make_model().float()
    opt, popt = KProdigy(model.parameters()), prodigyopt.Prodigy(pmodel.parameters())
    for _ in range(80):
        for m, o in ((model, opt), (pmodel, popt)):
            o.zero_grad()
            backward(m, X, y)
            o.step()
    assert rel_err(flat(model), flat(pmodel)) < 1e-3
    assert rel(opt.param_groups[0]["d"], popt.param_groups[0]["d"]) < 1e-3
    assert opt.param_groups[0]["d"] > 100 * 1e-6


# ---------------------------------------------------------------------------------------------
# float32 rows: every backend against per_tensor and against prodigyopt, 40 steps of the MLP
#
# Tolerances calibrated on the paths that agree today (one torch thread, 40 steps, D grows
# 1.6e3-7.6e4x in every row). Largest errors measured against per_tensor: params 1.3e-4 of their
# movement (slice_p, native; foreach 3.5e-5, step_parameter 9.4e-5), D 6.1e-6 relative (beta3,
# native); against prodigyopt: params 3.9e-5 (slice_p), D 2.4e-5 (beta3). Limits: 1e-3 and 1e-4.
# Rows where they do not agree today are left to fail (not widened): growth_rate on the native
# path (issue 21, finding 1: 2.3e-1).
#
# Decoupled weight decay is x - wd * dlr * x as prodigyopt's (x * (1 - wd * dlr) quantized the
# factor to float32's spacing, 6e-8, while D is near d0, and drifted 8.6e-3 from prodigyopt over
# these 40 steps); measured after that change: 2.3e-5 (decay_split), D 1.6e-6, under the limits.
# maximize is left out in float32: maximizing the MSE diverges (D grows 2e12x) and float32 paths
# part by O(1).

F32_STEPS = 40
F32_TOL = dict(params=1e-3, d=1e-4)
F32_CONFIGS = [name for name in CONFIGS if name != "maximize"]
F32_BACKENDS = ["native", "foreach", "capturable", "step_parameter"]  # against per_tensor


@functools.cache
def run_float32(config: str, backend: str) -> tuple[Tensor, Tensor, tuple[float, ...]]:
    """(final params, initial params, D after every step) of the float32 MLP; ``backend`` is one of
    BACKENDS or "prodigyopt"."""
    groups, kwargs, _ = CONFIGS[config]
    model = make_model().float()
    X, y = (t.float() for t in data())
    pgs = param_groups(model, groups)
    if backend == "prodigyopt":
        opt: torch.optim.Optimizer = prodigyopt.Prodigy(pgs)
    else:
        opt = KProdigy(pgs, **BACKENDS[backend], **kwargs)
        if backend == "step_parameter":
            for p in model.parameters():
                p.register_post_accumulate_grad_hook(opt.step_parameter)
    x0 = flat(model).clone()
    ds = []
    for _ in range(F32_STEPS):
        opt.zero_grad()
        backward(model, X, y)
        if backend == "step_parameter":
            opt.finalize_step()  # type: ignore[attr-defined]
        else:
            opt.step()
        ds.append(float(opt.param_groups[0]["d"]))
    return flat(model), x0, tuple(ds)


def _f32_errors(config: str, backend: str, against: str) -> tuple[float, float]:
    x, _, ds = run_float32(config, backend)
    ref_x, x0, ref_ds = run_float32(config, against)
    assert torch.isfinite(x).all() and all(math.isfinite(d) for d in ds), "NaN/inf never passes"
    assert ref_ds[-1] > 100 * ref_ds[0], "D must grow for the check to mean anything"
    params = float((x - ref_x).norm() / (ref_x - x0).norm())
    return params, max(rel(a, b) for a, b in zip(ds, ref_ds))


@pytest.mark.usefixtures("one_torch_thread")  # calibrated on one thread; two spin on a loaded machine
@pytest.mark.parametrize("backend", F32_BACKENDS)
@pytest.mark.parametrize("config", F32_CONFIGS)
def test_float32_backend_equals_per_tensor(config: str, backend: str) -> None:
    params, d = _f32_errors(config, backend, "per_tensor")
    assert params < F32_TOL["params"], f"params differ by {params:.3g} of their movement"
    assert d < F32_TOL["d"], f"D differs by {d:.3g} (largest over the steps)"


@pytest.mark.usefixtures("one_torch_thread")  # calibrated on one thread; two spin on a loaded machine
@pytest.mark.parametrize("backend", ["native", "per_tensor", "foreach", "capturable"])
@pytest.mark.parametrize("config", [c for c in PRODIGYOPT_CONFIGS if c in F32_CONFIGS])
def test_float32_backend_equals_prodigyopt(config: str, backend: str) -> None:
    params, d = _f32_errors(config, backend, "prodigyopt")
    assert params < F32_TOL["params"], f"params differ from prodigyopt's by {params:.3g} of their movement"
    assert d < F32_TOL["d"], f"D differs from prodigyopt's by {d:.3g} (largest over the steps)"


# ---------------------------------------------------------------------------------------------
# zero-gradient rows: steps whose gradients are all exactly zero
#
# On a step that updates D with d_denom == 0 (s all zero: the first steps, or beta3 = 0) prodigyopt
# decays m, v and s with the zero gradient and returns: no param update (no weight decay), D keys
# and k kept, state[p]["step"] kept. On a step that does not update D (d_update_freq) params move
# with the D they have and k advances. (Issue 21's rules; the current code does otherwise.)

# name -> (param groups' hyperparameters, optimizer-wide kwargs, the all-zero steps, prodigyopt runs it)
ZERO_ROWS: dict[str, tuple[dict | list[dict], dict, frozenset[int], bool]] = {
    "first_two": ({}, {}, frozenset({0, 1}), True),
    "first_two_bias_correction": ({"use_bias_correction": True}, {}, frozenset({0, 1}), True),
    "first_two_decoupled_wd": ({"weight_decay": 0.05}, {}, frozenset({0, 1}), True),
    "first_two_coupled_wd": ({"weight_decay": 0.05, "decouple": False}, {}, frozenset({0, 1}), True),  # g = wd x
    "beta3_zero_mid_run": ({"beta3": 0.0}, {}, frozenset({10}), True),
    "beta3_zero_mid_run_split_wd": ([{"beta3": 0.0, "weight_decay": 0.1}, {"beta3": 0.0}], {}, frozenset({10, 11}), True),
    # ours only
    "beta3_zero_d_update_freq": ({"beta3": 0.0, "d_update_freq": 2}, {}, frozenset({10, 11, 12}), False),
    "first_two_independent": ([{}, {"beta3": 0.0}], {"independent_d": True}, frozenset({0, 1, 15}), False),
}
ZERO_BACKENDS = ["native", "per_tensor", "foreach", "capturable", "step_parameter"]


def run_zero_row(row: str, backend: str) -> tuple[torch.optim.Optimizer, torch.nn.Module, Reference | None, list[list[int]]]:
    """Train the float64 MLP on ``row``'s script (``backend``: one of BACKENDS, or "prodigyopt")
    and, for ours, the float64 re-statement in lockstep on the same gradients."""
    groups, kwargs, zeros, _ = ZERO_ROWS[row]
    model = make_model()
    X, y = data()
    pgs = param_groups(model, groups)
    if backend == "prodigyopt":
        opt: torch.optim.Optimizer = prodigyopt.Prodigy(pgs)
        ref, d_groups = None, [list(range(len(pgs)))]
    else:
        opt, ref, d_groups = ours_and_reference(model, pgs, backend, kwargs)
    for k in range(STEPS):
        opt.zero_grad()
        loss = ((model(X) - y) ** 2).mean()
        (loss * 0.0 if k in zeros else loss).backward()  # exactly zero gradients on the zero steps
        grads = [[p.grad.detach().clone() if p.grad is not None else None for p in g["params"]] for g in pgs]
        if backend == "step_parameter":
            opt.finalize_step()  # type: ignore[attr-defined]
        else:
            opt.step()
        if ref is not None:
            ref.step(grads)
    return opt, model, ref, d_groups


@pytest.mark.usefixtures("one_torch_thread")  # calibrated on one thread; two spin on a loaded machine
@pytest.mark.parametrize("backend", ZERO_BACKENDS)
@pytest.mark.parametrize("row", list(ZERO_ROWS))
def test_zero_gradient_row_equals_float64_restatement(row: str, backend: str) -> None:
    opt, model, ref, d_groups = run_zero_row(row, backend)
    assert ref is not None
    for i, group in enumerate(opt.param_groups):
        for p, expected in zip(group["params"], ref.params(i)):
            assert rel_err(p.detach(), expected) < 1e-9, (i, rel_err(p.detach(), expected))
    for members, D in zip(d_groups, ref.ds):
        group = opt.param_groups[members[0]]
        assert float(group["d"]) > 10 * group["d0"], "D must grow for the check to mean anything"
        assert int(group["k"]) == D.k, f"k={int(group['k'])}, re-statement {D.k}"
        for key in D_KEYS:
            assert rel(float(group[key]), getattr(D, key)) < 1e-9, key
    for i, group in enumerate(opt.param_groups):
        for p, t in zip(group["params"], ref.groups[i].tensors):
            assert int(opt.state[p]["step"]) == t.step, "state[p]['step'] advanced on a d_denom == 0 step"


@functools.cache
def run_zero_row_prodigyopt(row: str) -> tuple[torch.optim.Optimizer, torch.nn.Module]:
    theirs, model, _, _ = run_zero_row(row, "prodigyopt")
    return theirs, model


@pytest.mark.usefixtures("one_torch_thread")  # calibrated on one thread; two spin on a loaded machine
@pytest.mark.parametrize("backend", ZERO_BACKENDS)
@pytest.mark.parametrize("row", [r for r, (*_, supported) in ZERO_ROWS.items() if supported])
def test_zero_gradient_row_equals_prodigyopt(row: str, backend: str) -> None:
    theirs, their_model = run_zero_row_prodigyopt(row)
    ours, our_model, _, _ = run_zero_row(row, backend)
    assert theirs.param_groups[0]["d"] > 100 * 1e-6
    assert rel_err(flat(our_model), flat(their_model)) < 1e-9
    assert rel(float(ours.param_groups[0]["d"]), theirs.param_groups[0]["d"]) < 1e-9
    assert int(ours.param_groups[0]["k"]) == theirs.param_groups[0]["k"]


@pytest.mark.usefixtures("one_torch_thread")  # calibrated on one thread; two spin on a loaded machine
@pytest.mark.parametrize("row", [r for r, (*_, supported) in ZERO_ROWS.items() if supported])
def test_zero_gradient_restatement_equals_prodigyopt(row: str) -> None:
    """The oracle of the rows above: the float64 re-statement, fed prodigyopt's gradients in
    lockstep, ends where prodigyopt does (params, D, k), zero steps included."""
    groups, _, zeros, _ = ZERO_ROWS[row]
    model = make_model()
    X, y = data()
    pgs = param_groups(model, groups)
    theirs = prodigyopt.Prodigy(pgs)
    ref = Reference([(g["params"], {k: v for k, v in g.items() if k != "params"}) for g in pgs], [list(range(len(pgs)))])
    for k in range(STEPS):
        theirs.zero_grad()
        loss = ((model(X) - y) ** 2).mean()
        (loss * 0.0 if k in zeros else loss).backward()
        grads = [[p.grad.detach().clone() for p in g["params"]] for g in pgs]
        theirs.step()
        ref.step(grads)
    assert theirs.param_groups[0]["d"] > 100 * 1e-6
    for i, group in enumerate(theirs.param_groups):
        for p, expected in zip(group["params"], ref.params(i)):
            assert rel_err(p.detach(), expected) < 1e-9
    assert rel(theirs.param_groups[0]["d"], ref.ds[0].d) < 1e-9
    assert theirs.param_groups[0]["k"] == ref.ds[0].k
