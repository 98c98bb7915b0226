"""Property tests of the invariants: monotone D, independence, merging, order, purity, paths."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from kprodigy import KProdigy
from kprodigy.functional import Hyperparams, State, init_state, step

shapes_st = st.lists(st.lists(st.integers(1, 6), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4)
hparams_st = st.builds(
    Hyperparams,
    lr=st.sampled_from([1.0, 0.3]),
    betas=st.sampled_from([(0.9, 0.999), (0.0, 0.99), (0.5, 0.9)]),
    weight_decay=st.sampled_from([0.0, 0.1]),
    decouple=st.booleans(),
    use_bias_correction=st.booleans(),
    safeguard_warmup=st.booleans(),
    growth_rate=st.sampled_from([float("inf"), 1.02]),
    d_update_freq=st.sampled_from([1, 2]),
    slice_p=st.sampled_from([1, 2]),
)
dtype_st = st.sampled_from([torch.float32, torch.float64])


def randn(shapes: list[tuple[int, ...]], gen: torch.Generator, dtype: torch.dtype) -> list[torch.Tensor]:
    return [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]


def tol(dtype: torch.dtype) -> dict[str, float]:
    return dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)


def state_tensors(state: State) -> list[torch.Tensor]:
    d = state.d
    lists = (state.exp_avg or []) + state.exp_avg_sq + state.s + state.p0
    return lists + [d.d, d.d_max, d.d_numerator, d.d_denom, d.d_hat, d.k]


@given(shapes=shapes_st, hp=hparams_st, seed=st.integers(0, 10_000), dtype=dtype_st)
def test_d_never_decreases(shapes, hp, seed, dtype) -> None:
    gen = torch.Generator().manual_seed(seed)
    params = randn(shapes, gen, dtype)
    state = init_state(params, hp)
    previous = float(state.d.d)
    for _ in range(8):
        grads = [g * float(torch.rand((), generator=gen)) * 10 for g in randn(shapes, gen, dtype)]
        params, state = step(params, grads, state, hp)
        d = float(state.d.d)
        assert d >= previous and d >= float(torch.tensor(hp.d0, dtype=state.d.d.dtype))
        assert float(state.d.d_max) >= d
        previous = d
    assert all(torch.isfinite(p).all() for p in params)


@given(shapes=shapes_st, hp=hparams_st, seed=st.integers(0, 10_000), dtype=dtype_st, foreach=st.booleans())
def test_step_is_pure(shapes, hp, seed, dtype, foreach) -> None:
    gen = torch.Generator().manual_seed(seed)
    params = randn(shapes, gen, dtype)
    state = init_state(params, hp)
    for _ in range(2):  # a non-trivial state first
        params, state = step(params, randn(shapes, gen, dtype), state, hp, foreach=foreach)
    grads = randn(shapes, gen, dtype)
    inputs = params + grads + state_tensors(state)
    versions = [t._version for t in inputs]
    copies = [t.clone() for t in inputs]
    new_params, new_state = step(params, grads, state, hp, foreach=foreach)
    assert [t._version for t in inputs] == versions
    assert all(torch.equal(a, b) for a, b in zip(inputs, copies))
    assert all(n is not p for n, p in zip(new_params, params))
    assert int(new_state.d.k) == int(state.d.k) + 1


@given(shapes=shapes_st, hp=hparams_st, seed=st.integers(0, 10_000), dtype=dtype_st)
def test_foreach_equals_per_tensor(shapes, hp, seed, dtype) -> None:
    gen = torch.Generator().manual_seed(seed)
    params = randn(shapes, gen, dtype)
    a_params, a_state = params, init_state(params, hp)
    b_params, b_state = params, init_state(params, hp)
    for _ in range(5):
        grads = randn(shapes, gen, dtype)
        a_params, a_state = step(a_params, grads, a_state, hp, foreach=False)
        b_params, b_state = step(b_params, grads, b_state, hp, foreach=True)
    for a, b in zip(a_params + state_tensors(a_state), b_params + state_tensors(b_state)):
        assert torch.allclose(a.double(), b.double(), **tol(dtype))


@given(shapes=shapes_st, hp=hparams_st, seed=st.integers(0, 10_000), perm_seed=st.integers(0, 100))
def test_parameter_order_does_not_matter(shapes, hp, seed, perm_seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float64
    params = randn(shapes, gen, dtype)
    perm = torch.randperm(len(shapes), generator=torch.Generator().manual_seed(perm_seed)).tolist()
    a_params, a_state = params, init_state(params, hp)
    b_params = [params[i] for i in perm]
    b_state = init_state(b_params, hp)
    for _ in range(4):
        grads = randn(shapes, gen, dtype)
        a_params, a_state = step(a_params, grads, a_state, hp)
        b_params, b_state = step(b_params, [grads[i] for i in perm], b_state, hp)
    for j, i in enumerate(perm):
        assert torch.allclose(a_params[i], b_params[j], **tol(dtype))
    assert torch.allclose(a_state.d.d, b_state.d.d, **tol(dtype))


def _leaves(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone().requires_grad_() for t in ts]


def _set_grads(leaves: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    for leaf, g in zip(leaves, grads):
        leaf.grad = g.clone()


@given(
    shapes_a=shapes_st,
    shapes_b=shapes_st,
    seed=st.integers(0, 10_000),
    scale=st.sampled_from([1e-3, 1e3]),
    foreach=st.booleans(),
)
def test_groups_are_independent_under_independent_d(shapes_a, shapes_b, seed, scale, foreach) -> None:
    """Changing group B's gradients changes nothing in group A, bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    xa, xb = randn(shapes_a, gen, torch.float32), randn(shapes_b, gen, torch.float32)
    runs = []
    for b_scale in (1.0, scale):
        g = torch.Generator().manual_seed(seed + 1)
        a, b = _leaves(xa), _leaves(xb)
        opt = KProdigy([dict(params=a), dict(params=b, lr=0.5)], independent_d=True, foreach=foreach)
        for _ in range(4):
            _set_grads(a, randn(shapes_a, g, torch.float32))
            _set_grads(b, [t * b_scale for t in randn(shapes_b, g, torch.float32)])
            opt.step()
        b_v = [opt.state[p]["exp_avg_sq"] for p in b]
        runs.append((a, opt.param_groups[0]["d"], b_v, [opt.state[p] for p in a]))
    (a1, d1, v1, s1), (a2, d2, v2, s2) = runs
    assert all(torch.equal(p, q) for p, q in zip(a1, a2))
    assert d1 == d2
    for x, y in zip(s1, s2):
        assert all(torch.equal(x[k], y[k]) for k in ("exp_avg", "exp_avg_sq", "s", "p0"))
    assert not all(torch.equal(x, y) for x, y in zip(v1, v2))  # group B itself did see the change


@given(shapes_a=shapes_st, shapes_b=shapes_st, seed=st.integers(0, 10_000), foreach=st.booleans())
def test_shared_d_over_two_groups_equals_one_merged_group(shapes_a, shapes_b, seed, foreach) -> None:
    gen = torch.Generator().manual_seed(seed)
    xa, xb = randn(shapes_a, gen, torch.float64), randn(shapes_b, gen, torch.float64)
    a, b = _leaves(xa), _leaves(xb)
    merged = _leaves(xa + xb)
    two = KProdigy([dict(params=a), dict(params=b)], independent_d=False, weight_decay=0.01, foreach=foreach)
    one = KProdigy(merged, weight_decay=0.01, foreach=foreach)
    for _ in range(5):
        ga, gb = randn(shapes_a, gen, torch.float64), randn(shapes_b, gen, torch.float64)
        _set_grads(a, ga)
        _set_grads(b, gb)
        _set_grads(merged, ga + gb)
        two.step()
        one.step()
    for p, q in zip(a + b, merged):
        assert torch.allclose(p, q, rtol=1e-10, atol=1e-12)
    for key in ("d", "d_max", "d_numerator", "d_hat", "k"):
        assert two.param_groups[0][key] == two.param_groups[1][key]
        assert abs(two.param_groups[0][key] - one.param_groups[0][key]) <= 1e-10 * abs(one.param_groups[0][key])


def test_bias_correction_is_accurate_in_float32() -> None:
    """bc = sqrt(1 - b2^(k+1)) / (1 - b1^(k+1)) to float32 round-off, also at k = 0 and for b1 = 0."""
    import math

    from kprodigy.functional._scalars import bias_correction

    for betas in [(0.9, 0.999), (0.0, 0.99), (0.95, 0.9999)]:
        hp = Hyperparams(betas=betas, use_bias_correction=True)
        for k in [0, 1, 10, 1000]:
            got = float(bias_correction(hp, torch.tensor(k)).float())
            b1, b2 = betas
            expected = math.sqrt(1 - b2 ** (k + 1)) / (1 - b1 ** (k + 1))
            assert abs(got - expected) <= 2e-7 * expected, (betas, k, got, expected)
