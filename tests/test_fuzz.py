"""Fuzz suite (hypothesis, bounded by the CI profile): non-finite gradients, extreme scales, frozen
and gradient-less groups, bad hyperparameters and corrupted checkpoints, thrown at both the
functional step and the KProdigy class. Invariants: D and params stay finite; a skipped step
changes nothing but the counter; a rejected input raises the named error and changes nothing."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_robustness import _corruptions, same, snapshot, state_tensors

from kprodigy import KProdigy
from kprodigy.functional import Hyperparams, init_state, step

D_KEYS = ("d", "d_max", "d_numerator", "d_denom", "d_hat")

shapes_st = st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=2).map(tuple), min_size=1, max_size=3)  # (0: no elements)
hparams_st = st.builds(
    Hyperparams,
    lr=st.sampled_from([1.0, 0.5, 0.0]),
    betas=st.sampled_from([(0.9, 0.999), (0.0, 0.99)]),
    weight_decay=st.sampled_from([0.0, 0.1]),
    decouple=st.booleans(),
    use_bias_correction=st.booleans(),
    safeguard_warmup=st.booleans(),
    d0=st.sampled_from([1e-6, 1e-30, 1e3]),
    growth_rate=st.sampled_from([math.inf, 1.02]),
    d_update_freq=st.sampled_from([1, 3]),
    slice_p=st.sampled_from([1, 2]),
    maximize=st.booleans(),
    stochastic_rounding=st.booleans(),
)
dtype_st = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])
# per step: None (clean), "zero" (all-zero grads) or the non-finite value put at a random element
event_st = st.sampled_from([None, None, None, "zero", float("nan"), float("inf"), -float("inf")])
BAD_VALUES = [float("nan"), float("inf"), -float("inf")]


def draw_tensors(shapes, gen, dtype, exponent: int) -> list[torch.Tensor]:
    """Random tensors of magnitude about 10**exponent (a random sign and mantissa per element)."""
    return [(torch.randn(s, generator=gen, dtype=torch.float64) * 10.0**exponent).to(dtype) for s in shapes]


def finite(state) -> bool:
    return all(math.isfinite(float(getattr(state.d, k))) for k in D_KEYS)


@settings(max_examples=50)
@given(
    shapes=shapes_st,
    hp=hparams_st,
    seed=st.integers(0, 2**16),
    dtype=dtype_st,
    g_exp=st.integers(-30, 30),
    x_exp=st.integers(-30, 30),
    events=st.lists(event_st, min_size=5, max_size=5),
    foreach=st.booleans(),
)
def test_fuzz_functional_step(shapes, hp, seed, dtype, g_exp, x_exp, events, foreach) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # stochastic rounding draws from the global RNG
    params = draw_tensors(shapes, gen, dtype, x_exp)
    state = init_state(params, hp)
    for event in events:
        grads = draw_tensors(shapes, gen, dtype, g_exp)
        if event == "zero":
            grads = [torch.zeros_like(g) for g in grads]
        elif event is not None:
            filled = [g for g in grads if g.numel()]
            if not filled:
                event = None  # (no element to hold it)
            else:
                flat = filled[int(torch.randint(len(filled), (), generator=gen))].view(-1)
                flat[int(torch.randint(flat.numel(), (), generator=gen))] = event
        new_params, new_state = step(params, grads, state, hp, foreach=foreach)
        assert all(p.dtype == dtype and p.shape == q.shape for p, q in zip(new_params, params))
        if event in BAD_VALUES or hp.lr == 0:  # skipped or frozen: nothing but counters changes
            assert all(torch.equal(a, b) for a, b in zip(new_params, params))
            assert all(torch.equal(a, b) for a, b in zip(state_tensors(new_state), state_tensors(state)))
        if event in BAD_VALUES and hp.lr > 0:
            assert int(new_state.d.skipped_steps) == int(state.d.skipped_steps) + 1
            assert int(new_state.d.k) == int(state.d.k)
        assert finite(new_state), new_state.d
        assert float(new_state.d.d) >= float(state.d.d)
        assert all(torch.isfinite(p).all() for p in new_params)
        params, state = new_params, new_state


@settings(max_examples=50)
@given(
    n_groups=st.integers(1, 3),
    lrs=st.lists(st.sampled_from([1.0, 0.3, 0.0]), min_size=3, max_size=3),
    independent_d=st.booleans(),
    no_grad=st.lists(st.booleans(), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
    g_exp=st.integers(-30, 30),
    events=st.lists(st.tuples(event_st, st.integers(0, 2)), min_size=4, max_size=4),
    dtype=dtype_st,
    foreach=st.booleans(),
)
def test_fuzz_class(n_groups, lrs, independent_d, no_grad, seed, g_exp, events, dtype, foreach) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    groups = [
        [torch.nn.Parameter(torch.randn(3, 2, generator=gen).to(dtype)) for _ in range(2)] for _ in range(n_groups)
    ]
    opt = KProdigy(
        [dict(params=ps, lr=lr) for ps, lr in zip(groups, lrs)],
        independent_d=independent_d,
        foreach=foreach,
        d0=1e-3,
    )
    expected_skips = [0] * n_groups
    for event, target in events:
        target %= n_groups
        for j, ps in enumerate(groups):
            for p in ps:
                p.grad = None if no_grad[j] else draw_tensors([p.shape], gen, dtype, g_exp)[0]
        if event == "zero":
            for p in groups[target]:
                if p.grad is not None:
                    p.grad.zero_()
        elif event is not None and groups[target][0].grad is not None:
            groups[target][0].grad[0, 0] = event
            members = [target] if opt.d_groups() != [list(range(n_groups))] else list(range(n_groups))
            stepping = [j for j in members if lrs[j] > 0 and not no_grad[j]]
            if stepping:  # a D-group that steps skips; a frozen or gradient-less one does nothing
                for j in members:
                    expected_skips[j] += 1
        with torch.no_grad():
            before = [[p.clone() for p in ps] for ps in groups]
        opt.step()
        for j, g in enumerate(opt.param_groups):
            assert all(math.isfinite(g[k]) for k in D_KEYS), g
            assert g["skipped_steps"] == expected_skips[j], (j, expected_skips)
            if lrs[j] == 0 or no_grad[j]:
                assert all(torch.equal(p, b) for p, b in zip(groups[j], before[j]))
        assert all(torch.isfinite(p).all() for ps in groups for p in ps)


INVALID = [
    ("lr", -1.0),
    ("lr", float("nan")),
    ("lr", "1"),
    ("betas", (0.9, 1.0)),
    ("betas", (-0.1, 0.9)),
    ("betas", (0.9,)),
    ("betas", (float("nan"), 0.9)),
    ("beta3", 1.0),
    ("eps", 0.0),
    ("eps", float("inf")),
    ("weight_decay", -1e-3),
    ("weight_decay", float("nan")),
    ("decouple", 1),
    ("use_bias_correction", None),
    ("safeguard_warmup", "no"),
    ("d0", -1e-6),
    ("d0", float("inf")),
    ("d_coef", 0.0),
    ("growth_rate", 0.99),
    ("growth_rate", float("nan")),
    ("d_update_freq", 0),
    ("d_update_freq", 2.0),
    ("slice_p", True),
    ("maximize", 0),
    ("skip_nonfinite", "yes"),
    ("fp32_state", 1),
    ("stochastic_rounding", None),
]


@pytest.mark.parametrize("field, value", INVALID)
def test_every_invalid_hyperparameter_is_rejected_everywhere(field, value) -> None:
    """Exhaustive over the table: the functional Hyperparams, the constructor, a group in the
    constructor, and add_param_group on a stepped optimizer (which must stay unchanged)."""
    with pytest.raises(ValueError, match=f"Invalid {field}"):
        Hyperparams(**{field: value})
    a = torch.nn.Parameter(torch.randn(4))
    b = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=f"Invalid {field}"):
        KProdigy([a, b], **{field: value})
    with pytest.raises(ValueError, match=f"Invalid {field}"):
        KProdigy([dict(params=[a]), dict(params=[b], **{field: value})])
    opt = KProdigy([a])
    a.grad = torch.ones_like(a)
    opt.step()
    before = snapshot(opt, [a, b])
    with pytest.raises(ValueError, match=f"Invalid {field}"):
        opt.add_param_group(dict(params=[b], **{field: value}))
    assert same(snapshot(opt, [a, b]), before) and len(opt.param_groups) == 1


@given(
    name=st.sampled_from(sorted(_corruptions())),
    seed=st.integers(0, 100),
    betas=st.sampled_from([(0.9, 0.999), (0.5, 0.9)]),
    slice_p=st.sampled_from([1, 2]),
)
def test_fuzz_corrupted_checkpoints(name, seed, betas, slice_p) -> None:
    corrupt, message = _corruptions()[name]
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(3, 4, generator=gen)), torch.nn.Parameter(torch.randn(5, generator=gen))]
    opt = KProdigy(params, betas=betas, slice_p=slice_p)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    corrupt(saved)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(saved)
    assert same(snapshot(opt, params), before)
