"""torch.func workflows on the pure step: pytrees, functional loops, vmapped ensembles, torch.compile, checkpoints."""

from __future__ import annotations

import copy
import dataclasses
import io
import warnings
from collections import namedtuple
from typing import Any

import pytest
import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, stack_module_state, vmap

import kprodigy.functional as F
from kprodigy import KProdigy
from kprodigy.functional import Hyperparams


def _rel_err(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |b| in float64; NaN or inf anywhere fails (returns inf)."""
    a, b = a.double(), b.double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _assert_trees_close(a: Any, b: Any, rtol: float) -> None:
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    assert sa == sb
    for x, y in zip(la, lb):
        assert x.shape == y.shape and x.dtype == y.dtype
        assert _rel_err(x, y) <= rtol, _rel_err(x, y)


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    nn.init.zeros_(m[2].bias)  # an all-zero tensor: compact p0
    return m


def _data(seed: int, n: int = 32) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(n, 3, generator=gen)
    return x, torch.sin(2 * x[:, :1]) + 0.5 * x[:, 1:2]


# ---------------------------------------------------------------- pytrees


def test_dict_params_equal_list_params_and_state_mirrors_structure() -> None:
    hp = Hyperparams(weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    params = {
        "w": torch.randn(4, 3, generator=gen),
        "inner": {"b": torch.zeros(3)},
        "t": (torch.randn(5, generator=gen),),
    }
    leaves, spec = pytree.tree_flatten(params)
    sd, sl = F.init_state(params, hp), F.init_state(leaves, hp)
    assert isinstance(sd.exp_avg, dict) and sd.p0["inner"]["b"].dim() == 0  # all zeros: compact p0
    pd, pl = params, leaves
    for _ in range(5):
        grads = [torch.randn(x.shape, generator=gen) for x in leaves]
        pd, sd = F.step(pd, pytree.tree_unflatten(grads, spec), sd, hp)
        pl, sl = F.step(pl, grads, sl, hp)
    assert isinstance(pd, dict) and isinstance(pd["t"], tuple)
    for a, b in zip(pytree.tree_leaves(pd), pl):
        assert torch.equal(a, b)
    for name in ("exp_avg", "exp_avg_sq", "s", "p0"):
        assert pytree.tree_structure(getattr(sd, name)) == spec
        for a, b in zip(pytree.tree_leaves(getattr(sd, name)), getattr(sl, name)):
            assert torch.equal(a, b)
    assert torch.equal(sd.d.d, sl.d.d) and int(sd.d.k) == 5
    # State is a pytree: flattening round-trips
    flat, sspec = pytree.tree_flatten(sd)
    again = pytree.tree_unflatten(flat, sspec)
    assert pytree.tree_structure(again) == sspec and all(a is b for a, b in zip(pytree.tree_leaves(again), flat))


def test_single_tensor_and_iterator_params() -> None:
    hp = Hyperparams()
    x = torch.randn(6)
    s = F.init_state(x, hp)
    assert isinstance(s.exp_avg_sq, Tensor)
    new, s = F.step(x, torch.ones(6), s, hp)
    assert isinstance(new, Tensor) and not torch.equal(new, x)
    m = nn.Linear(2, 2)
    s2 = F.init_state(m.parameters(), hp)  # an iterator becomes a list
    assert isinstance(s2.s, list) and len(s2.s) == 2


def test_structure_mismatch_raises_and_changes_nothing() -> None:
    hp = Hyperparams()
    params = {"a": torch.randn(3), "b": torch.randn(2)}
    state = F.init_state(params, hp)
    before = [t.clone() for t in pytree.tree_leaves(state)]
    with pytest.raises(ValueError, match="grads have structure"):
        F.step(params, {"a": torch.randn(3), "c": torch.randn(2)}, state, hp)
    with pytest.raises(ValueError, match="state.exp_avg has structure"):
        F.step([params["a"], params["b"]], [torch.randn(3), torch.randn(2)], state, hp)
    with pytest.raises(TypeError, match=r"params\['a'\] is a float"):
        F.step({"a": 1.0}, {"a": 1.0}, state, hp)
    with pytest.raises(ValueError, match=r"grads\[0\] has shape"):
        F.step(params, {"a": torch.randn(4), "b": torch.randn(2)}, state, hp)
    assert all(torch.equal(a, b) for a, b in zip(before, pytree.tree_leaves(state)))


def test_flat_lists_and_tuples_keep_their_type_and_are_checked() -> None:
    """A list or a tuple of tensors (flattened without pytree's walk, ``_tree._tree_flatten``)
    comes back as what it was, in params and in the state, and a list is not a tuple."""
    hp = Hyperparams()
    for kind in (list, tuple):
        params = kind(torch.randn(3) for _ in range(4))
        state = F.init_state(params, hp)
        new, new_state = F.step(params, kind(torch.randn(3) for _ in range(4)), state, hp)
        assert type(new) is kind and type(new_state.exp_avg_sq) is kind and len(new) == 4
        other = tuple if kind is list else list
        with pytest.raises(ValueError, match="grads have structure"):
            F.step(params, other(torch.randn(3) for _ in range(4)), state, hp)
        with pytest.raises(ValueError, match="grads have structure"):
            F.step(params, kind(torch.randn(3) for _ in range(3)), state, hp)


# ---------------------------------------------------------------- functional training loop


def test_functional_call_loop_equals_class() -> None:
    model = _model(0)
    x, y = _data(0)
    hp = Hyperparams(weight_decay=0.01, d_update_freq=2)

    def loss_fn(params: dict[str, Tensor]) -> Tensor:
        return ((functional_call(model, params, (x,)) - y) ** 2).mean()

    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = F.init_state(params, hp)
    losses = []
    for _ in range(12):
        grads, loss = grad_and_value(loss_fn)(params)
        params, state = F.step(params, grads, state, hp)
        losses.append(float(loss))

    ref = copy.deepcopy(model)
    opt = KProdigy(ref.parameters(), weight_decay=0.01, d_update_freq=2)
    for _ in range(12):
        opt.zero_grad()
        ((ref(x) - y) ** 2).mean().backward()
        opt.step()
    _assert_trees_close(params, {k: v.detach() for k, v in ref.named_parameters()}, 1e-6)
    assert abs(float(state.d.d) - opt.param_groups[0]["d"]) <= 1e-6 * opt.param_groups[0]["d"]
    assert float(state.d.d) > 10 * hp.d0 and losses[-1] < losses[0]  # it trained


# ---------------------------------------------------------------- vmapped ensembles


def _ensemble(n: int) -> tuple[nn.Module, dict[str, Tensor], Tensor, Tensor]:
    models = [_model(i) for i in range(n)]
    params, _ = stack_module_state(models)
    xs, ys = zip(*[_data(i) for i in range(n)])
    base = copy.deepcopy(models[0]).to("meta")
    return base, {k: v.detach() for k, v in params.items()}, torch.stack(xs), torch.stack(ys)


@pytest.mark.parametrize("d_update_freq", [1, 3])
def test_vmapped_ensemble_equals_separate_runs(d_update_freq: int) -> None:
    n, steps = 4, 10
    hp = Hyperparams(betas=(0.9, 0.99), weight_decay=0.01, d_update_freq=d_update_freq, use_bias_correction=True)
    base, params, xs, ys = _ensemble(n)

    def train_step(p: dict[str, Tensor], s: F.State, x: Tensor, y: Tensor) -> tuple[dict[str, Tensor], F.State]:
        g = grad(lambda q: ((functional_call(base, q, (x,)) - y) ** 2).mean())(p)
        return F.step(p, g, s, hp)

    state = F.init_ensemble_state(params, hp)
    assert state.d.d.shape == (n,) and state.p0["2.bias"].shape == (n,)  # all members zero: compact
    assert state.p0["0.weight"].shape == (n, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a slow vmap fallback (in-place or foreach op) would warn
        vstep = vmap(train_step)
        p, s = params, state
        for _ in range(steps):
            p, s = vstep(p, s, xs, ys)

    for i in range(n):
        base_i = _model(i)
        pi = {k: v.detach().clone() for k, v in base_i.named_parameters()}
        si = F.init_state(pi, hp)
        x, y = _data(i)

        def loss_i(q: dict[str, Tensor], m: nn.Module = base_i, x: Tensor = x, y: Tensor = y) -> Tensor:
            return ((functional_call(m, q, (x,)) - y) ** 2).mean()

        for _ in range(steps):
            g = grad(loss_i)(pi)
            pi, si = F.step(pi, g, si, hp, foreach=False)
        _assert_trees_close({k: v[i] for k, v in p.items()}, pi, 1e-5)
        for name in ("d", "d_max", "d_numerator", "d_denom", "d_hat"):
            assert _rel_err(getattr(s.d, name)[i], getattr(si.d, name)) <= 1e-5, name
        assert int(s.d.k[i]) == int(si.d.k) == steps
    ds = s.d.d
    assert bool((ds > 5 * hp.d0).all())  # every member's D moved
    assert len({float(v) for v in ds}) == n  # and each member has its own D


def test_init_state_under_vmap_and_ensemble_checks() -> None:
    hp = Hyperparams()
    stacked = [torch.randn(3, 4), torch.zeros(3, 2)]
    s = vmap(lambda xs: F.init_state(xs, hp))(stacked)  # no data-dependent branch under vmap
    assert s.p0[1].shape == (3, 2)  # full p0 inside vmap
    s = F.init_ensemble_state(stacked, hp, compact_p0=False)
    assert s.p0[1].shape == (3, 2) and s.d.d.stride() == (1,)
    partly = torch.zeros(3, 2)
    partly[1, 0] = 1.0
    s = F.init_ensemble_state([partly], hp)
    assert torch.equal(s.p0[0], partly)  # one member is nonzero: full p0 for all
    with pytest.raises(ValueError, match="leading ensemble dimension"):
        F.init_ensemble_state([torch.zeros(3, 2), torch.zeros(4, 2)], hp)


def test_compact_p0_option() -> None:
    hp = Hyperparams()
    assert F.init_state([torch.zeros(5)], hp).p0[0].dim() == 0
    assert F.init_state([torch.zeros(5)], hp, compact_p0=False).p0[0].shape == (5,)


# ---------------------------------------------------------------- torch.compile


def test_compiled_step_fullgraph_bounded_recompiles() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    hp = Hyperparams(d_update_freq=2, use_bias_correction=True, weight_decay=0.1)
    gen = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(4, 5, generator=gen), "b": torch.randn(5, generator=gen)}
    cstep = torch.compile(F.step, fullgraph=True)  # fullgraph: a graph break raises
    p_c, s_c = params, F.init_state(params, hp)
    p_e, s_e = params, s_c

    target = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}

    def both(lr: float) -> None:  # gradients of 0.5 * ||p - target||^2, so that D grows
        nonlocal p_c, s_c, p_e, s_e
        h = dataclasses.replace(hp, lr=lr)
        p_c, s_c = cstep(p_c, {k: v - target[k] for k, v in p_c.items()}, s_c, h)
        p_e, s_e = F.step(p_e, {k: v - target[k] for k, v in p_e.items()}, s_e, h)

    both(1.0)
    both(0.5)  # the first new lr value recompiles once: dynamo then treats lr as a symbolic float
    assert counters["stats"]["unique_graphs"] == 2
    with torch.compiler.set_stance("fail_on_recompile"):
        for lr in (0.25, 0.75, 1.5, 2.0, 0.5, 1.0):  # further lr values and D-update / skip steps
            both(lr)
    assert counters["stats"]["unique_graphs"] == 2
    assert not counters["graph_break"]
    _assert_trees_close(p_c, p_e, 1e-5)
    _assert_trees_close(s_c.exp_avg_sq, s_e.exp_avg_sq, 1e-5)
    assert _rel_err(s_c.d.d, s_e.d.d) <= 1e-5 and float(s_e.d.d) > 1.5 * hp.d0 and int(s_c.d.k) == 8


# ---------------------------------------------------------------- checkpoints


def _run(params: Any, state: F.State, hp: Hyperparams, seed: int, steps: int) -> tuple[Any, F.State]:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grads = pytree.tree_map(lambda t: torch.randn(t.shape, generator=gen), params)
        params, state = F.step(params, grads, state, hp)
    return params, state


def test_plain_dict_roundtrip_through_torch_save_weights_only() -> None:
    hp = Hyperparams(d_update_freq=2)
    params = {"w": torch.randn(3, 4), "b": [torch.zeros(4), torch.randn(2)]}
    params, state = _run(params, F.init_state(params, hp), hp, 0, 3)
    buf = io.BytesIO()
    torch.save({"params": params, "state": F.state_to_dict(state)}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    state2 = F.state_from_dict(loaded["state"])
    a = _run(params, state, hp, 1, 4)
    b = _run(loaded["params"], state2, hp, 1, 4)
    for x, y in zip(pytree.tree_leaves(a), pytree.tree_leaves(b)):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="lacks keys"):
        F.state_from_dict({"d": {}})


def test_plain_dict_rejects_custom_containers() -> None:
    Pair = namedtuple("Pair", ["a", "b"])
    hp = Hyperparams()
    state = F.init_state(Pair(torch.randn(2), torch.randn(3)), hp)
    with pytest.raises(TypeError, match="weights_only"):
        F.state_to_dict(state)


def _class_steps(opt: KProdigy, model: nn.Module, seed: int, steps: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def _functional_steps(params: dict[str, Tensor], state: F.State, hp: Hyperparams, seed: int, steps: int) -> Any:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grads = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
        params, state = F.step(params, grads, state, hp)
    return params, state


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.0, 0.99)])
def test_switch_between_class_and_functional(betas: tuple[float, float]) -> None:
    kw: dict[str, Any] = dict(betas=betas, weight_decay=0.01, d_update_freq=2)
    hp = Hyperparams(**kw)
    model = _model(5)
    opt = KProdigy(model.parameters(), **kw)
    _class_steps(opt, model, 0, 5)

    # class -> functional: continue in the functional loop, compare with the class continuing
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = F.from_optimizer_state_dict(opt.state_dict(), like=params)
    assert isinstance(state.s, dict) and int(state.d.k) == 5
    p_f, s_f = _functional_steps(params, state, hp, 1, 5)
    _class_steps(opt, model, 1, 5)
    _assert_trees_close(p_f, {k: v.detach() for k, v in model.named_parameters()}, 1e-6)
    assert abs(float(s_f.d.d) - opt.param_groups[0]["d"]) <= 1e-6 * opt.param_groups[0]["d"]

    # functional -> class: load into a fresh optimizer and continue both
    fresh = _model(99)
    with torch.no_grad():
        for name, p in fresh.named_parameters():
            p.copy_(p_f[name])
    opt2 = KProdigy(fresh.parameters(), lr=0.123)  # the state dict's group overrides these arguments
    opt2.load_state_dict(F.to_optimizer_state_dict(s_f, hp))
    assert opt2.param_groups[0]["lr"] == 1.0 and opt2.param_groups[0]["k"] == 10
    _class_steps(opt2, fresh, 2, 4)
    p_g, s_g = _functional_steps(p_f, s_f, hp, 2, 4)
    _assert_trees_close(p_g, {k: v.detach() for k, v in fresh.named_parameters()}, 1e-6)
    assert abs(float(s_g.d.d) - opt2.param_groups[0]["d"]) <= 1e-6 * opt2.param_groups[0]["d"]


def test_optimizer_state_dict_errors() -> None:
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    opt = KProdigy([{"params": a.parameters()}, {"params": b.parameters(), "lr": 0.5}], independent_d=True)
    _class_steps(opt, nn.ModuleList([a, b]), 0, 2)
    sd = opt.state_dict()
    sd["param_groups"][1]["d"] *= 2  # the two groups' D differ
    with pytest.raises(ValueError, match="different D estimates"):
        F.from_optimizer_state_dict(sd)
    assert F.from_optimizer_state_dict(sd, groups=1).d.d.dtype == torch.float64  # D in float64
    c = nn.Linear(2, 2)
    opt3 = KProdigy(c.parameters())
    c.weight.grad = torch.ones(2, 2)
    opt3.step()  # the bias never had a gradient
    with pytest.raises(ValueError, match="no optimizer state"):
        F.from_optimizer_state_dict(opt3.state_dict())
    with pytest.raises(ValueError, match="like has 3 tensors"):
        F.from_optimizer_state_dict(opt.state_dict(), groups=0, like=[torch.zeros(1)] * 3)
    d = nn.Linear(3, 3)
    opt4 = KProdigy(d.parameters(), factored=True)
    _class_steps(opt4, d, 0, 1)
    with pytest.raises(ValueError, match="factored=True"):
        F.from_optimizer_state_dict(opt4.state_dict())
    ens = F.init_ensemble_state([torch.randn(2, 3)], Hyperparams())
    with pytest.raises(ValueError, match="one ensemble member at a time"):
        F.to_optimizer_state_dict(ens, Hyperparams())


def test_in_place_step_keeps_one_plan_per_state_and_frees_it_with_the_state() -> None:
    """``step_`` keeps its plan with the state object: rebuilt plans (a flag changing every call)
    replace it without piling up finalizers, and it goes when the state goes."""
    import gc
    import weakref

    from kprodigy.functional import _tree

    xs = [torch.randn(3, 4), torch.randn(5)]
    hp = F.Hyperparams()
    state = F.step_(xs, [torch.ones_like(x) for x in xs], F.init_state(xs, hp), hp)  # lays the state out
    finalizers = len(weakref.finalize._registry)  # type: ignore[attr-defined]
    for i in range(20):
        state = F.step_(xs, [torch.ones_like(x) for x in xs], state, hp, foreach=bool(i % 2))
    assert len(weakref.finalize._registry) <= finalizers + 1  # type: ignore[attr-defined]
    assert id(state) in _tree._KEPT
    key = id(state)
    del state
    gc.collect()
    assert key not in _tree._KEPT
