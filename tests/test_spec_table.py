"""One table of configurations, run against every backend, on trajectories where D grows.

Two references, both independent of the code under test:
- ``tests/reference.py``: a float64 re-statement of DESIGN.md (Python floats for D, one tensor
  at a time), fed the same gradients as the optimizer, for every backend (per-tensor, foreach,
  compiled, capturable, ``step_parameter``) with the non-finite skip on and off;
- ``prodigyopt`` 1.1.2 itself, for the configurations it supports, at its defaults and options.

Every run asserts that D grew at least 10x (so that D's arithmetic is exercised, not d0's), and
compares relative errors of params and D; NaN never passes.
"""

from __future__ import annotations

import functools
import math

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


def run_ours(config: str, backend: str, *, skip: bool, nan_at: int | None) -> tuple[KProdigy, Reference, list[list[int]]]:
    """Train the MLP with KProdigy and, in lockstep on the same gradients, the float64 reference.

    ``nan_at``: a step whose gradients get a NaN (the skip is on): the reference skips it.
    Returns the optimizer, the reference and the D-groups (lists of param group indices).
    """
    groups, kwargs, _ = CONFIGS[config]
    model = make_model()
    X, y = data()
    pgs = param_groups(model, groups)
    opt = KProdigy(pgs, skip_nonfinite=skip, **BACKENDS[backend], **kwargs)
    independent = kwargs.get("independent_d", False)
    d_groups = [[i] for i in range(len(pgs))] if independent else [list(range(len(pgs)))]
    ref = Reference([(g["params"], {k: v for k, v in g.items() if k != "params"}) for g in pgs], d_groups)
    if backend == "step_parameter":
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(opt.step_parameter)
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
