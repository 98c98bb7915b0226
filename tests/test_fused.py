"""Fused (compiled) and foreach paths against the per-tensor reference; no recompilation; fallback."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kprodigy.functional import Hyperparams, _engine, _fused, init_state, step
from kprodigy.optim import KProdigy

SHAPES = st.lists(
    st.sampled_from([(7, 9), (120,), (3,), (1,), (5, 4, 3), (64,), (2, 50)]),
    min_size=1,
    max_size=5,
)


def _tensors(shapes, seed, dtype, zero_first=False):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    if zero_first:
        xs[0].zero_()  # p0 becomes a 0-dim zero
    grads = [[torch.randn(s, generator=gen, dtype=dtype) for s in shapes] for _ in range(3)]
    return xs, grads


def _run(xs, grads, hp, **path):
    params, state = list(xs), init_state(xs, hp)
    for gs in grads:
        params, state = step(params, gs, state, hp, **path)
    return params, state


def _assert_close_updates(got, want, x0, rtol):
    for a, b, x in zip(got, want, x0):
        scale = (b - x).abs().max().clamp_min(1e-30)
        err = ((a - b).abs().max() / scale).item()
        assert err <= rtol, f"relative error {err:.3g} > {rtol}"  # NaN fails: comparison is False


CONFIGS = [
    dict(betas=(0.9, 0.999), weight_decay=0.1, decouple=True, slice_p=1),
    dict(betas=(0.0, 0.99), weight_decay=0.1, decouple=False, slice_p=2, safeguard_warmup=True),
]


@pytest.fixture
def small_flat_max(monkeypatch):
    """Exercise both fused layouts (packed flat buffers and direct views) on small tensors.

    Constant for every hypothesis example, so sharing it between examples is harmless.
    """
    monkeypatch.setattr(_fused, "FLAT_MAX", 100)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shapes=SHAPES, seed=st.integers(0, 2**16), zero_first=st.booleans())
def test_fused_and_foreach_match_reference_float64(small_flat_max, shapes, seed, zero_first):
    _check_paths(CONFIGS[0], shapes, seed, zero_first, (dict(fused=True), dict(foreach=True)))


@settings(max_examples=4, deadline=None)
@given(shapes=SHAPES, seed=st.integers(0, 2**16), zero_first=st.booleans())
def test_foreach_matches_reference_float64_b1_zero_coupled_sliced(shapes, seed, zero_first):
    _check_paths(CONFIGS[1], shapes, seed, zero_first, (dict(foreach=True),))


def test_fused_matches_reference_float64_b1_zero_coupled_sliced(monkeypatch):
    monkeypatch.setattr(_fused, "FLAT_MAX", 1)  # one compiled layout only: keeps compile time down
    _check_paths(CONFIGS[1], [(7, 9), (120,), (5, 4, 3)], 3, False, (dict(fused=True),))


def _check_paths(config, shapes, seed, zero_first, paths):
    hp = Hyperparams(d0=1e-2, **config)
    xs, grads = _tensors(shapes, seed, torch.float64, zero_first)
    ref, ref_state = _run(xs, grads, hp, foreach=False)
    for path in paths:
        got, got_state = _run(xs, grads, hp, **path)
        _assert_close_updates(got, ref, xs, 1e-9)
        for key in ("d", "d_max", "d_numerator", "d_denom", "d_hat"):
            a, b = getattr(got_state.d, key), getattr(ref_state.d, key)
            assert torch.allclose(a, b, rtol=1e-10, atol=0), (path, key, a, b)
        _assert_close_updates(got_state.exp_avg_sq, ref_state.exp_avg_sq, [0 * v for v in ref_state.exp_avg_sq], 1e-10)
        _assert_close_updates(got_state.s, ref_state.s, [0 * v for v in ref_state.s], 1e-10)


def test_fused_pure_step_does_not_write_inputs(small_flat_max):
    hp = Hyperparams(**CONFIGS[0])
    xs, grads = _tensors([(7, 9), (120,), (3,)], 0, torch.float64)
    state = init_state(xs, hp)
    versions = [t._version for t in [*xs, *grads[0], *state.exp_avg, *state.exp_avg_sq, *state.s]]
    step(xs, grads[0], state, hp, fused=True)
    assert versions == [t._version for t in [*xs, *grads[0], *state.exp_avg, *state.exp_avg_sq, *state.s]]


def _model_params(seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(16, 8), (8,), (300,)]]


def _set_grads(params, seed):
    """A pull towards 2.0 plus noise: D grows (with pure noise D stays at d0)."""
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = p.detach() - 2.0 + 0.1 * torch.randn(p.shape, generator=gen)


def test_shell_fused_matches_foreach_and_never_recompiles():
    a, b = _model_params(1), _model_params(1)
    opt_a, opt_b = KProdigy(a, fused=True, d0=1e-3), KProdigy(b, foreach=True, d0=1e-3)
    for k in range(2):  # warm-up: first compile, then D moves off d0
        _set_grads(a, k)
        _set_grads(b, k)
        opt_a.step()
        opt_b.step()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.compiler.set_stance("fail_on_recompile"):
        for k, (lr, betas) in enumerate([(0.5, (0.8, 0.99)), (2.0, (0.95, 0.9)), (1.0, (0.9, 0.999))]):
            for opt in (opt_a, opt_b):
                opt.param_groups[0].update(lr=lr, betas=betas)
            _set_grads(a, 10 + k)
            _set_grads(b, 10 + k)
            opt_a.step()
            opt_b.step()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert opt_a.param_groups[0]["d"] > 1e-3  # D changed between calls
    assert opt_a.param_groups[0]["d"] == pytest.approx(opt_b.param_groups[0]["d"], rel=1e-5)
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_no_compiler_falls_back_with_one_warning(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nsecond line")

    monkeypatch.setattr(_fused, "_STATUS", {})
    monkeypatch.setattr(_fused, "_WARNED", set())
    monkeypatch.setattr(torch, "compile", broken)
    hp = Hyperparams()
    xs, grads = _tensors([(7, 9), (3,)], 0, torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # automatic mode falls back silently
        auto, _ = step(xs, grads[0], init_state(xs, hp), hp)
    with pytest.warns(
        RuntimeWarning, match=r"fused step unavailable on cpu \(RuntimeError: no C\+\+ compiler found\); using foreach"
    ):
        got, _ = step(xs, grads[0], init_state(xs, hp), hp, fused=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once
        step(xs, grads[0], init_state(xs, hp), hp, fused=True)
    want, _ = step(xs, grads[0], init_state(xs, hp), hp, foreach=True)
    for a, b, c in zip(got, want, auto):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(c, b, rtol=0, atol=0)


def test_automatic_fused_never_compiles_on_cpu(monkeypatch):
    """fused=None: the eager kernels at every size (the optimizer's default is the native path);
    fused=True asks for the compiled ones. (tests/test_cuda_fake.py: None never compiles on CUDA.)"""
    calls = []
    real = _fused.statistics
    monkeypatch.setattr(_fused, "statistics", lambda *a, **k: calls.append(1) or real(*a, **k))
    small = [torch.zeros(10), torch.zeros(5)]
    assert not _engine.use_fused(small, None) and _engine.use_fused(small, True)
    assert not _engine.use_fused(small, False)
    assert not _engine.use_fused([torch.zeros(1 << 21)], None)  # at any size
    hp = Hyperparams()
    xs, grads = _tensors([(3, 5)], 0, torch.float32)
    step(xs, grads[0], init_state(xs, hp), hp)
    assert not calls  # fused=None did not reach the compiled kernels
    step(xs, grads[0], init_state(xs, hp), hp, fused=True)
    assert calls


def test_bad_fused_flag_is_rejected():
    with pytest.raises(ValueError, match="Invalid fused: 'yes'"):
        KProdigy([torch.nn.Parameter(torch.ones(2))], fused="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.0, 0.999)])
def test_fused_skips_a_nonfinite_step_exactly_and_matches_eager(betas):
    """The fused kernels zero non-finite gradient entries in their own loop (no copy beforehand):
    a step with a NaN/inf leaves params, state and D bit-identical; finite steps match eager."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(300, 300), (7, 3), (5,)]  # one tensor on the direct path, two packed
    xs = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(4)]
    grads[2][0][3, 4] = float("nan")
    grads[2][1][0, 0] = float("inf")
    runs = {}
    for fused in (False, True):
        ps = [x.clone().requires_grad_() for x in xs]
        opt = KProdigy(ps, betas=betas, fused=fused, foreach=False)
        trace = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the one-time skip warning
            for gs in grads:
                for p, g in zip(ps, gs):
                    p.grad = g.clone()
                before = [p.detach().clone() for p in ps] + [
                    opt.state[p]["exp_avg_sq"].clone() for p in ps if p in opt.state
                ]
                opt.step()
                trace.append((before, [p.detach().clone() for p in ps], opt.param_groups[0]["d"]))
        runs[fused] = (trace, opt.param_groups[0]["skipped_steps"])
    (eager, eager_skips), (fused_trace, fused_skips) = runs[False], runs[True]
    assert eager_skips == fused_skips == 1
    before, after, _ = fused_trace[2]
    assert all(torch.equal(a, b) for a, b in zip(before[: len(shapes)], after))  # the skipped step moved nothing
    for (_, a, da), (_, b, db) in zip(eager, fused_trace):
        assert all(torch.isfinite(t).all() for t in b)
        assert all(torch.allclose(x, y, rtol=1e-10, atol=1e-12) for x, y in zip(a, b))
        assert da == pytest.approx(db, rel=1e-10)


@pytest.mark.parametrize("fused", [None, True])
def test_inputs_that_require_grad_take_the_differentiable_eager_step(monkeypatch, fused):
    hp = Hyperparams(d0=1e-2)
    xs, grads = _tensors([(7, 9), (3,)], 0, torch.float64)
    leaves = [x.clone().requires_grad_() for x in xs]
    got, _ = step(leaves, grads[0], init_state(xs, hp), hp, fused=fused)
    want, _ = step(xs, grads[0], init_state(xs, hp), hp, fused=False)
    for a, b in zip(got, want):
        assert a.requires_grad  # the step stays differentiable, as the eager path is
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)


def test_fused_true_inside_torch_compile_runs_the_traced_per_tensor_step():
    hp = Hyperparams(d0=1e-2)
    xs, grads = _tensors([(7, 9), (3,)], 0, torch.float64)
    compiled = torch.compile(lambda p, g, s: step(p, g, s, hp, fused=True), fullgraph=True)
    got, _ = compiled(xs, grads[0], init_state(xs, hp))
    want, _ = step(xs, grads[0], init_state(xs, hp), hp, fused=False)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
