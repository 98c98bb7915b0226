"""Robustness: the non-finite skip, bad input, atomic checkpoints, low precision, extreme scales."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch

from kprodigy import KProdigy
from kprodigy.functional import Hyperparams, State, init_state, step


def model_and_data(seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)).to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(16, 5, generator=gen).to(dtype)
    y = torch.randn(16, 1, generator=gen).to(dtype)
    return model, X, y


def loss_of(model, X, y) -> torch.Tensor:
    return ((model(X).float() - y.float()) ** 2).mean()


def train(model, opt, X, y, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(model, X, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def state_tensors(state: State) -> list[torch.Tensor]:
    d = state.d
    return (
        (state.exp_avg or [])
        + state.exp_avg_sq
        + state.s
        + state.p0
        + [d.d, d.d_max, d.d_numerator, d.d_denom, d.d_hat]
    )


def snapshot(opt: torch.optim.Optimizer, params) -> tuple:
    """Everything a rejected input must leave alone: the state_dict (deep) and the params."""
    return copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]


def same(a, b) -> bool:
    """Deep, bitwise equality of nested dicts/lists of tensors and Python values (NaN never equal)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


# ---------------------------------------------------------------------------------------------
# non-finite gradients


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("slice_p, d_update_freq", [(1, 1), (3, 1), (1, 2), (3, 2)])
def test_functional_skip_is_an_exact_no_op(foreach, bad, slice_p, d_update_freq) -> None:
    """A step with a non-finite gradient returns the inputs' values; the next clean step matches a
    run that never saw the bad step. The bad element is at index 1: not in the D slice when slice_p > 1."""
    gen = torch.Generator().manual_seed(0)
    hp = Hyperparams(slice_p=slice_p, d_update_freq=d_update_freq, weight_decay=0.1, d0=1e-3)
    params = [torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen)]
    grads = [[torch.randn(x.shape, generator=gen) for x in params] for _ in range(4)]
    state = init_state(params, hp)
    ref_p, ref_s = params, state
    for k in range(3):
        params, state = step(params, grads[k], state, hp, foreach=foreach)
        ref_p, ref_s = step(ref_p, grads[k], ref_s, hp, foreach=foreach)
    # the next step (k = 3) is a non-update step when d_update_freq == 2
    poisoned = [g.clone() for g in grads[3]]
    poisoned[1][1] = bad
    new_p, new_s = step(params, poisoned, state, hp, foreach=foreach)
    assert all(torch.equal(a, b) for a, b in zip(new_p, params))
    assert all(torch.equal(a, b) for a, b in zip(state_tensors(new_s), state_tensors(state)))
    assert int(new_s.d.k) == int(state.d.k) and int(new_s.d.skipped_steps) == int(state.d.skipped_steps) + 1
    new_p, new_s = step(new_p, grads[3], new_s, hp, foreach=foreach)
    ref_p, ref_s = step(ref_p, grads[3], ref_s, hp, foreach=foreach)
    assert all(torch.equal(a, b) for a, b in zip(new_p, ref_p))
    assert all(torch.equal(a, b) for a, b in zip(state_tensors(new_s), state_tensors(ref_s)))


def test_without_the_check_a_nan_gradient_corrupts_the_run() -> None:
    """The counter-test: skip_nonfinite=False lets NaN through (so the check is what protects)."""
    hp = Hyperparams(skip_nonfinite=False)
    params = [torch.randn(6)]
    state = init_state(params, hp)
    params, state = step(params, [torch.ones(6)], state, hp)
    params, state = step(params, [torch.tensor([1.0, float("nan"), 1, 1, 1, 1])], state, hp)
    assert not torch.isfinite(params[0]).all() or not math.isfinite(float(state.d.d))


def test_class_skips_counts_warns_once_and_keeps_k() -> None:
    model, X, y = model_and_data()
    opt = KProdigy(model.parameters(), weight_decay=0.01)
    train(model, opt, X, y, 3)
    before_state, before_params = snapshot(opt, model.parameters())
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    with pytest.warns(UserWarning, match="skipped a step"):
        opt.step()
    group = opt.param_groups[0]
    assert group["skipped_steps"] == 1 and type(group["skipped_steps"]) is int and group["k"] == 3
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before_params))
    after = opt.state_dict()
    assert same(after["state"], before_state["state"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second skip does not warn again
        opt.step()
    assert opt.param_groups[0]["skipped_steps"] == 2
    losses = train(model, opt, X, y, 10)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert opt.param_groups[0]["k"] == 13


def test_skip_covers_the_whole_shared_d_group_only() -> None:
    model, X, y = model_and_data()
    groups = [dict(params=model[0].parameters()), dict(params=model[2].parameters())]
    opt = KProdigy(groups, independent_d=True)
    train(model, opt, X, y, 2)
    loss_of(model, X, y).backward()
    model[2].bias.grad[0] = float("inf")
    first = [p.detach().clone() for p in model[0].parameters()]
    with pytest.warns(UserWarning):
        opt.step()
    g0, g1 = opt.param_groups
    assert (g0["skipped_steps"], g1["skipped_steps"]) == (0, 1) and (g0["k"], g1["k"]) == (3, 2)
    assert not any(torch.equal(a, b) for a, b in zip(model[0].parameters(), first))


def test_grad_scaler_skips_overflowing_steps_itself() -> None:
    """GradScaler finds the inf gradients of an overflowing scale and does not call step()."""
    model, X, y = model_and_data()
    opt = KProdigy(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(loss_of(model, X, y) * 1e10).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**127
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert opt.param_groups[0]["skipped_steps"] == 0 and opt.param_groups[0]["k"] == 0
    for _ in range(5):
        opt.zero_grad()
        scaler.scale(loss_of(model, X, y)).backward()
        scaler.step(opt)
        scaler.update()
    assert all(torch.isfinite(p).all() for p in model.parameters()) and opt.param_groups[0]["k"] > 0


# ---------------------------------------------------------------------------------------------
# bad input: clear error, nothing changed


def test_param_listed_twice_and_complex_are_rejected() -> None:
    model, X, y = model_and_data()
    w = model[0].weight
    with pytest.raises(ValueError, match="same tensor twice"):
        KProdigy([w, model[0].bias, w])
    opt = KProdigy(model[0].parameters())
    train(model, opt, X, y, 2)
    before = snapshot(opt, model.parameters())
    with pytest.raises(ValueError, match="already in param group 0"):
        opt.add_param_group(dict(params=[model[2].weight, w]))
    with pytest.raises(ValueError, match="complex"):
        opt.add_param_group(dict(params=[torch.zeros(3, dtype=torch.complex64, requires_grad=True)]))
    with pytest.raises(ValueError, match="Invalid eps"):
        opt.add_param_group(dict(params=model[2].parameters(), eps=-1.0))
    assert len(opt.param_groups) == 1 and same(snapshot(opt, model.parameters()), before)


def test_bad_gradients_or_scheduled_hyperparameters_change_nothing() -> None:
    model, X, y = model_and_data()
    groups = [dict(params=model[0].parameters()), dict(params=model[2].parameters())]
    opt = KProdigy(groups, independent_d=True)
    train(model, opt, X, y, 2)
    extra = torch.nn.Parameter(torch.randn(3))
    opt.add_param_group(dict(params=[extra]))
    loss_of(model, X, y).backward()
    extra.grad = torch.ones(3)
    before = snapshot(opt, list(model.parameters()) + [extra])

    opt.param_groups[2]["lr"] = float("nan")  # a broken scheduler
    with pytest.raises(ValueError, match="param group 2: Invalid lr"):
        opt.step()
    opt.param_groups[2]["lr"] = 1.0
    assert same(snapshot(opt, list(model.parameters()) + [extra]), before)

    # a sparse gradient in the LAST group: the earlier groups must not have stepped
    extra.grad = torch.ones(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients \\(param 0 of param group 2\\)"):
        opt.step()
    assert same(snapshot(opt, list(model.parameters()) + [extra]), before)
    assert extra not in opt.state


def test_params_on_two_devices_in_one_d_group_are_rejected_before_any_change() -> None:
    a = torch.nn.Parameter(torch.randn(3))
    b = torch.nn.Parameter(torch.randn(3, device="meta"))
    opt = KProdigy([a, b])
    a.grad, b.grad = torch.ones(3), torch.ones(3, device="meta")
    with pytest.raises(RuntimeError, match="share one D but hold params on cpu and meta"):
        opt.step()
    assert len(opt.state) == 0


def test_shared_d_groups_must_agree_on_skip_nonfinite() -> None:
    model, X, y = model_and_data()
    opt = KProdigy(
        [dict(params=model[0].parameters()), dict(params=model[2].parameters(), skip_nonfinite=False)],
        independent_d=False,
    )
    loss_of(model, X, y).backward()
    with pytest.raises(ValueError, match="skip_nonfinite"):
        opt.step()
    assert len(opt.state) == 0


# ---------------------------------------------------------------------------------------------
# checkpoints


def trained(dtype: torch.dtype = torch.float32, **kwargs):
    model, X, y = model_and_data(dtype=dtype)
    opt = KProdigy(model.parameters(), **kwargs)
    train(model, opt, X, y, 4)
    return model, opt, X, y


def _corruptions():
    def drop(key):
        def f(sd):
            del next(iter(sd["state"].values()))[key]

        return f

    def set_state(key, fn):
        def f(sd):
            st = next(iter(sd["state"].values()))
            st[key] = fn(st[key])

        return f

    def set_group(key, value):
        def f(sd):
            sd["param_groups"][0][key] = value

        return f

    return {
        "missing exp_avg_sq": (drop("exp_avg_sq"), "missing \\['exp_avg_sq'\\]"),
        "missing p0": (drop("p0"), "missing \\['p0'\\]"),
        "wrong exp_avg shape": (set_state("exp_avg", lambda t: t[:1]), "exp_avg has shape"),
        "wrong s size": (set_state("s", lambda t: torch.cat([t, t])), "s has"),
        "integer dtype": (set_state("exp_avg_sq", lambda t: t.long()), "dtype torch.int64"),
        "nan state": (set_state("exp_avg", lambda t: t * float("nan")), "NaN or inf"),
        "bad lr": (set_group("lr", -1.0), "param group 0: Invalid lr"),
        "bad d": (set_group("d", float("inf")), "d=inf"),
        "bad k": (set_group("k", -3), "k=-3"),
        "extra group": (lambda sd: sd["param_groups"].append(copy.deepcopy(sd["param_groups"][0])), "2 param groups"),
        "fewer params": (lambda sd: sd["param_groups"][0]["params"].pop(), "a different param layout"),
        "foreign state": (lambda sd: sd["state"].__setitem__(99, {}), "param id 99"),
        "not a state_dict": (lambda sd: sd.pop("state"), "not an optimizer state_dict"),
    }


@pytest.mark.parametrize("name", list(_corruptions()))
def test_bad_checkpoint_raises_and_leaves_the_optimizer_as_it_was(name: str) -> None:
    corrupt, message = _corruptions()[name]
    model, opt, X, y = trained()
    saved = copy.deepcopy(opt.state_dict())
    corrupt(saved)
    train(model, opt, X, y, 1)
    before = snapshot(opt, model.parameters())
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(saved)
    assert same(snapshot(opt, model.parameters()), before)
    twin = copy.deepcopy((model, opt))
    assert train(model, opt, X, y, 3) == train(twin[0], twin[1], X, y, 3)  # still trains identically


def test_checkpoint_of_an_older_version_loads_with_defaults() -> None:
    model, opt, X, y = trained()
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        for key in ("skipped_steps", "skip_nonfinite", "state_precision", "stochastic_rounding"):
            del group[key]
        group["fp32_state"] = True  # what 0.6 wrote (deprecated: the state takes the optimizer's state_precision)
    opt2 = KProdigy(model.parameters())
    opt2.load_state_dict(saved)
    g = opt2.param_groups[0]
    assert g["skipped_steps"] == 0 and g["skip_nonfinite"] is True and g["state_precision"] == "auto"
    assert "fp32_state" not in g
    assert all(math.isfinite(v) for v in train(model, opt2, X, y, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_state_of_16_bit_params_survives_a_round_trip(dtype: torch.dtype) -> None:
    model, opt, X, y = trained(dtype=dtype, d0=1e-2, state_precision="float32")
    assert all(opt.state[p]["exp_avg"].dtype == torch.float32 for p in model.parameters())
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, X, y, 3)
    expected = [p.detach().clone() for p in model.parameters()]
    buffer.seek(0)
    saved = torch.load(buffer)
    model2, _, _ = model_and_data(seed=5, dtype=dtype)
    model2.load_state_dict(saved["model"])
    opt2 = KProdigy(model2.parameters(), d0=1e-2, state_precision="float32")
    opt2.load_state_dict(saved["opt"])
    for p in model2.parameters():
        for key in ("exp_avg", "exp_avg_sq", "s"):
            assert opt2.state[p][key].dtype == torch.float32, key
        assert opt2.state[p]["p0"].dtype == dtype
    train(model2, opt2, X, y, 3)
    assert all(torch.equal(a, b) for a, b in zip(model2.parameters(), expected))


def test_param_dtype_state_when_asked() -> None:
    with pytest.warns(DeprecationWarning, match="fp32_state"):  # the deprecated alias: False is "auto"
        model, opt, _, _ = trained(dtype=torch.bfloat16, d0=1e-2, fp32_state=False)
    assert all(opt.state[p][k].dtype == torch.bfloat16 for p in model.parameters() for k in ("exp_avg", "s"))


# ---------------------------------------------------------------------------------------------
# low precision


def test_bf16_run_tracks_the_fp32_run() -> None:
    """Same model and data in float32 and bfloat16 (float32 state): losses and D stay close."""
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, X, y = model_and_data(dtype=dtype)
        opt = KProdigy(model.parameters(), d0=1e-3, use_bias_correction=False, state_precision="float32")
        losses = train(model, opt, X, y, 60)
        results[dtype] = (losses, opt.param_groups[0]["d"])
    (l32, d32), (l16, d16) = results[torch.float32], results[torch.bfloat16]
    assert l32[-1] < 0.5 * l32[0]
    assert abs(l16[-1] - l32[-1]) <= 0.1 * l32[-1] + 0.01 * l32[0]
    assert abs(d16 - d32) <= 0.1 * d32


def test_stochastic_rounding_keeps_updates_below_the_bf16_spacing() -> None:
    """Steps of 1e-3 on weights at 1.0 (bfloat16 spacing 2^-8 below 1): lost with round-to-nearest,
    kept on average with stochastic rounding; float32 is the reference."""
    n, steps = 4096, 40
    kw = dict(betas=(0.0, 0.999), use_bias_correction=True, d0=1e-3, d_coef=1e-12)  # D stays at d0
    finals = {}
    for name, dtype, sr in (
        ("fp32", torch.float32, False),
        ("nearest", torch.bfloat16, False),
        ("sr", torch.bfloat16, True),
    ):
        torch.manual_seed(0)
        x = torch.nn.Parameter(torch.ones(n, dtype=dtype))
        opt = KProdigy([x], stochastic_rounding=sr, **kw)
        for _ in range(steps):
            x.grad = torch.ones_like(x)
            opt.step()
        finals[name] = x.detach().float()
    moved = 1.0 - finals["fp32"].mean().item()
    assert abs(moved - steps * 1e-3) < 1e-3  # float32: each step moves 1e-3
    assert torch.equal(finals["nearest"], torch.ones(n))  # every update lost
    assert abs((1.0 - finals["sr"].mean().item()) - moved) < 0.05 * moved  # unbiased on average


def test_float16_params_train() -> None:
    model, X, y = model_and_data(dtype=torch.float16)
    opt = KProdigy(model.parameters(), d0=1e-3)
    losses = train(model, opt, X, y, 40)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.7 * losses[0]
    assert opt.param_groups[0]["skipped_steps"] == 0


def test_stochastic_round_only_picks_the_two_neighbours_and_keeps_specials() -> None:
    from kprodigy.functional._robust import stochastic_round

    torch.manual_seed(0)
    exact = torch.tensor([0.0, -0.0, 1.0, -2.5, 3.0e38, float("inf"), -float("inf")])
    assert torch.equal(stochastic_round(exact, torch.bfloat16), exact.bfloat16())
    assert torch.isnan(stochastic_round(torch.tensor([float("nan")]), torch.bfloat16)).all()
    x = torch.full((20000,), 1.0 + 2.0**-9)  # a quarter of the way from 1 to the next bfloat16 (1 + 2^-7)
    r = stochastic_round(x, torch.bfloat16).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2.0**-7}
    assert abs(r.mean().item() - x[0].item()) < 2e-4  # unbiased
    y = -x
    assert abs(stochastic_round(y, torch.bfloat16).float().mean().item() - y[0].item()) < 2e-4


def test_per_parameter_steps_keep_d_on_a_non_finite_gradient() -> None:
    """step_parameter (fused backward): the param with the bad gradient and D are left alone;
    params already stepped this step keep their update (they were written before the bad one)."""
    model, X, y = model_and_data()
    opt = KProdigy(model.parameters())
    train(model, opt, X, y, 3)
    d_before, k_before = opt.param_groups[0]["d"], opt.param_groups[0]["k"]
    loss_of(model, X, y).backward()
    params = list(model.parameters())
    params[-1].grad[0] = float("nan")
    last = params[-1].detach().clone()
    with pytest.warns(UserWarning, match="skipped a step"):
        for p in params:
            opt.step_parameter(p)
        opt.finalize_step()
    group = opt.param_groups[0]
    assert group["d"] == d_before and group["k"] == k_before and group["skipped_steps"] == 1
    assert torch.equal(params[-1], last) and all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize(
    "grad, message",
    [
        (torch.ones(2, 3), "grads\\[1\\] has shape \\(2, 3\\)"),
        (torch.ones(3, 2).to_sparse(), "dense gradients"),
        (torch.ones(3, 2, dtype=torch.complex64), "complex"),
        (torch.ones(3, 2, dtype=torch.float64), "dtype torch.float64"),
        (torch.ones(3, 2, device="meta"), "is on meta"),
    ],
)
def test_functional_step_rejects_bad_gradients(grad: torch.Tensor, message: str) -> None:
    params = [torch.randn(4), torch.randn(3, 2)]
    state = init_state(params, Hyperparams())
    versions = [t._version for t in params + state_tensors(state)]
    with pytest.raises(ValueError, match=message):
        step(params, [torch.ones(4), grad], state, Hyperparams())
    assert [t._version for t in params + state_tensors(state)] == versions


def test_factored_state_skips_exactly() -> None:
    model, X, y = model_and_data()
    opt = KProdigy(model.parameters(), factored=True)
    train(model, opt, X, y, 3)
    before = snapshot(opt, model.parameters())
    loss_of(model, X, y).backward()
    model[0].weight.grad[1, 1] = float("inf")
    with pytest.warns(UserWarning):
        opt.step()
    assert opt.param_groups[0]["skipped_steps"] == 1
    after = snapshot(opt, model.parameters())
    before[0]["param_groups"][0]["skipped_steps"] = 1
    for sd in (before[0], after[0]):  # the logged step size follows the current D
        sd["param_groups"][0].pop("step_size")
    assert same(after, before)
