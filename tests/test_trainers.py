"""What trainers need: logging keys, D partition (d_group, cap), frozen D, per-parameter stepping."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from kprodigy import KProdigy


def mlp(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 2, width: int = 8) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    mods: list[torch.nn.Module] = [torch.nn.Linear(5, width)]
    for _ in range(layers - 1):
        mods += [torch.nn.Tanh(), torch.nn.Linear(width, width)]
    mods += [torch.nn.Tanh(), torch.nn.Linear(width, 1)]
    return torch.nn.Sequential(*mods).to(dtype)


def data(seed: int = 1, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 5, generator=gen).to(dtype), torch.randn(16, 1, generator=gen).to(dtype)


def loss_of(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(X) - y) ** 2).mean()


def train(model, opt, X, y, steps: int) -> list[float]:  # type: ignore[no-untyped-def]
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(model, X, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ---------------------------------------------------------------------------------------------
# logging contract


@pytest.mark.parametrize("bias_correction", [False, True])
def test_group_keys_are_python_numbers_and_d_times_effective_lr_is_the_applied_step(bias_correction: bool) -> None:
    """``effective_lr`` is the multiplier of D (prodigy-plus-schedule-free's key, which OneTrainer
    and musubi-tuner multiply by ``d``); ``step_size`` the step applied."""
    model = mlp()
    X, y = data()
    head = list(model.parameters())[-2:]
    body = list(model.parameters())[:-2]
    opt = KProdigy([{"params": body}, {"params": head, "lr": 0.5}], use_bias_correction=bias_correction)
    assert opt.get_learning_rates() == [0.0, 0.0]  # nothing applied yet
    b1, b2 = 0.9, 0.999
    for k in range(4):
        d_before = [g["d"] for g in opt.param_groups]
        train(model, opt, X, y, 1)
        for group, d in zip(opt.param_groups, d_before):
            for key in ("d", "d_max", "d_numerator", "d_denom", "d_hat", "lr", "effective_lr", "step_size"):
                assert type(group[key]) is float, key  # what trainers log (json, tensorboard)
            assert type(group["k"]) is int and group["k"] == k + 1
            bc = math.sqrt(1 - b2 ** (k + 1)) / (1 - b1 ** (k + 1)) if bias_correction else 1.0
            assert group["effective_lr"] == pytest.approx(group["lr"] * bc, rel=1e-12)
            assert group["step_size"] == pytest.approx(d * group["lr"] * bc, rel=1e-12)
            assert group["step_size"] == pytest.approx(d * group["effective_lr"], rel=1e-12)
        assert opt.get_learning_rates() == [g["step_size"] for g in opt.param_groups]
    # read the way kohya/OneTrainer log it: d * lr per group, from the scheduler's optimizer
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    logged = [g["d"] * g["lr"] for g in sched.optimizer.param_groups]  # type: ignore[attr-defined]
    assert all(type(v) is float and v > 0 for v in logged)


def test_step_size_is_the_size_of_the_first_update() -> None:
    # first step, betas (0.9, 0.999), D unchanged by it (p0 - x = 0): with m = d (1 - b1) g and
    # sqrt(v) = d sqrt(1 - b2) |g|, |x1 - x0| = dlr (1 - b1) |g| / (sqrt(1 - b2) |g| + eps) exactly
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(50, dtype=torch.float64))
    opt = KProdigy([p], d0=1e-3, eps=1e-3)  # an eps that shows in the result
    p0 = p.detach().clone()
    g = torch.randn(50, dtype=torch.float64)
    p.grad = g.clone()
    opt.step()
    assert opt.param_groups[0]["d"] == 1e-3
    expected = opt.param_groups[0]["step_size"] * 0.1 * g.abs() / (math.sqrt(0.001) * g.abs() + 1e-3)
    torch.testing.assert_close((p.detach() - p0).abs(), expected, rtol=1e-9, atol=0)


# ---------------------------------------------------------------------------------------------
# D partition


def three_part_model(seed: int = 0) -> tuple[list[torch.nn.Module], torch.nn.Module]:
    """'te1', 'te2', 'unet' stand-ins of a diffusion trainer; unet sees 100x larger gradients."""
    torch.manual_seed(seed)
    parts = [torch.nn.Linear(5, 6), torch.nn.Linear(5, 6), torch.nn.Linear(12, 1)]

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.parts = torch.nn.ModuleList(parts)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.cat([torch.tanh(parts[0](x)), torch.tanh(parts[1](x))], dim=1)
            return 100 * parts[2](h)

    return parts, Net()


def test_d_group_shares_one_d_between_labelled_groups() -> None:
    X, y = data()
    parts, net = three_part_model()
    opt = KProdigy(
        [
            {"params": parts[0].parameters(), "d_group": "te"},
            {"params": parts[1].parameters(), "d_group": "te", "lr": 0.5},
            {"params": parts[2].parameters(), "d_group": "unet"},
        ]
    )
    assert opt.d_groups() == [[0, 1], [2]]
    # reference: te1 and te2 as two groups under one shared D, unet in another optimizer
    parts_r, net_r = three_part_model()
    ref_te = KProdigy(
        [{"params": parts_r[0].parameters()}, {"params": parts_r[1].parameters(), "lr": 0.5}],
        independent_d=False,
    )
    ref_unet = KProdigy(parts_r[2].parameters())
    for _ in range(5):
        train(net, opt, X, y, 1)
        ref_te.zero_grad()
        ref_unet.zero_grad()
        loss_of(net_r, X, y).backward()
        ref_te.step()
        ref_unet.step()
    torch.testing.assert_close(flat(net), flat(net_r), rtol=0, atol=0)
    g = opt.param_groups
    assert g[0]["d"] == g[1]["d"] == ref_te.param_groups[0]["d"] != g[2]["d"]
    assert g[2]["d"] == ref_unet.param_groups[0]["d"]


def test_d_group_partition_rules() -> None:
    ps = [torch.nn.Parameter(torch.randn(3)) for _ in range(5)]
    groups = [{"params": [p]} for p in ps]
    groups[1]["d_group"] = groups[3]["d_group"] = 7
    assert KProdigy(copy.deepcopy(groups)).d_groups() == [[0, 2, 4], [1, 3]]  # default: one D for the unlabelled
    assert KProdigy(copy.deepcopy(groups), independent_d=None).d_groups() == [[0], [1, 3], [2], [4]]
    assert KProdigy(copy.deepcopy(groups), independent_d=False).d_groups() == [[0, 2, 4], [1, 3]]
    assert KProdigy(copy.deepcopy(groups), independent_d=True).d_groups() == [[0], [1, 3], [2], [4]]
    # labels survive a weights_only checkpoint round trip
    opt = KProdigy(groups, independent_d=False)
    for p in ps:
        p.grad = torch.ones(3)
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    fresh = KProdigy([{"params": [p]} for p in ps], independent_d=False)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.d_groups() == [[0, 2, 4], [1, 3]] and fresh.param_groups[1]["k"] == 1


def test_invalid_d_group_d_steps_and_cap_are_rejected_and_change_nothing() -> None:
    p, q = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = KProdigy([p])
    with pytest.raises(ValueError, match="d_group"):
        opt.add_param_group({"params": [q], "d_group": ["te"]})
    with pytest.raises(ValueError, match="d_steps"):
        opt.add_param_group({"params": [q], "d_steps": 0})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="d_steps"):
        KProdigy([p], d_steps=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="d_ratio_cap"):
        KProdigy([p], d_ratio_cap=0.5)
    opt = KProdigy([{"params": [p], "d_group": 1}, {"params": [q], "d_group": 1, "d_coef": 2.0}])
    p.grad, q.grad = torch.ones(3), torch.ones(3)
    with pytest.raises(ValueError, match="d_coef"):
        opt.step()


def test_deepcopy_and_pickle_keep_the_optimizer_wide_settings() -> None:
    import pickle

    p = torch.nn.Parameter(torch.ones(2))
    opt = KProdigy([{"params": [p]}], independent_d=True, d_ratio_cap=3.0, reduce_d_stats=False)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert (clone.independent_d, clone.d_ratio_cap, clone.reduce_d_stats) == (True, 3.0, False)


def test_per_group_d_coef_with_independent_d() -> None:
    # two identical halves; d_coef 2 doubles the first D estimate
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(20, dtype=torch.float64))
    b = torch.nn.Parameter(a.detach().clone())
    opt = KProdigy([{"params": [a]}, {"params": [b], "d_coef": 2.0}], independent_d=True)
    g = torch.randn(20, dtype=torch.float64)
    for _ in range(2):
        a.grad, b.grad = g.clone(), g.clone()
        opt.step()
    assert opt.param_groups[1]["d_hat"] > 1.5 * opt.param_groups[0]["d_hat"]


def test_d_ratio_cap_keeps_d_values_within_the_factor() -> None:
    # two components whose solutions lie at very different distances: their D values drift apart
    def run(cap: float | None) -> list[float]:
        torch.manual_seed(0)
        far, near = torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(10))
        opt = KProdigy([{"params": [far]}, {"params": [near]}], d_ratio_cap=cap, independent_d=True)
        ratios, last = [], [0.0, 0.0]
        for _ in range(30):
            opt.zero_grad()
            ((far - 100.0) ** 2).sum().add(((near - 0.1) ** 2).sum()).backward()
            opt.step()
            ds = [g["d"] for g in opt.param_groups]
            assert all(d >= prev for d, prev in zip(ds, last))  # D never decreases, capped or not
            last = ds
            ratios.append(max(ds) / min(ds))
        return ratios

    assert max(run(None)) > 4
    assert max(run(2.0)) <= 2.0 * (1 + 1e-6)


# ---------------------------------------------------------------------------------------------
# frozen D


def test_d_steps_freezes_d_frees_s_and_p0_and_is_checkpointed() -> None:
    X, y = data()
    model, ref = mlp(), mlp()
    opt = KProdigy(model.parameters(), d_steps=3)
    ref_opt = KProdigy(ref.parameters())
    train(model, opt, X, y, 3)
    train(ref, ref_opt, X, y, 3)
    torch.testing.assert_close(flat(model), flat(ref), rtol=0, atol=0)  # same until frozen
    group = opt.param_groups[0]
    assert group["d_frozen"] is True
    for p in model.parameters():
        assert set(opt.state[p]) == {"exp_avg", "exp_avg_sq", "step"}  # 2 words per param left
    d = group["d"]
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    model2 = copy.deepcopy(model)
    losses = train(model, opt, X, y, 5)
    assert group["d"] == d and group["k"] == 8
    assert losses[-1] < losses[0]
    # resume from the checkpoint (weights_only load): bit-exact continuation, D still frozen
    opt2 = KProdigy(model2.parameters(), d_steps=3)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert saved["param_groups"][0]["d_frozen"] is True
    opt2.load_state_dict(saved)
    train(model2, opt2, X, y, 5)
    torch.testing.assert_close(flat(model2), flat(model), rtol=0, atol=0)
    assert opt2.param_groups[0]["d"] == d and "s" not in opt2.state[next(model2.parameters())]


def test_frozen_step_is_adam_with_the_frozen_d() -> None:
    # a float64 re-statement of one step after D froze
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(30, dtype=torch.float64))
    opt = KProdigy([p], d_steps=2, weight_decay=0.1, use_bias_correction=False)
    for _ in range(2):
        p.grad = torch.randn(30, dtype=torch.float64)
        opt.step()
    d = opt.param_groups[0]["d"]
    m, v = opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone()
    x = p.detach().clone()
    g = torch.randn(30, dtype=torch.float64)
    p.grad = g.clone()
    opt.step()
    m = 0.9 * m + d * 0.1 * g
    v = 0.999 * v + d * d * 0.001 * g * g
    expected = x * (1 - 0.1 * d) - d * m / (v.sqrt() + d * 1e-8)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=0)
    assert opt.param_groups[0]["d"] == d


def test_new_params_after_freezing_get_no_s_or_p0() -> None:
    p, q = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    opt = KProdigy([p, q], d_steps=1)
    p.grad = torch.randn(4)
    opt.step()
    p.grad, q.grad = torch.randn(4), torch.randn(4)
    opt.step()
    assert "s" not in opt.state[q] and "p0" not in opt.state[q]
    assert torch.isfinite(q).all()


# ---------------------------------------------------------------------------------------------
# per-parameter stepping (fused backward)


def hooked(model: torch.nn.Module, opt: KProdigy) -> None:
    def hook(p: torch.Tensor) -> None:
        opt.step_parameter(p)
        p.grad = None  # the gradient is freed as soon as it was used

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(hook)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"use_bias_correction": True, "weight_decay": 0.01, "d_update_freq": 2},
        {"betas": (0.0, 0.99), "slice_p": 3, "foreach": False},
        {"d_steps": 3, "safeguard_warmup": True},
        {"factored": True},
    ],
)
def test_step_parameter_matches_step(kwargs: dict) -> None:
    X, y = data(dtype=torch.float64)
    model, ref = mlp(dtype=torch.float64, layers=3), mlp(dtype=torch.float64, layers=3)
    mods = [m for m in model if isinstance(m, torch.nn.Linear)]
    mods_r = [m for m in ref if isinstance(m, torch.nn.Linear)]
    opt = KProdigy(
        [{"params": mods[0].parameters(), "lr": 0.7}, {"params": [p for m in mods[1:] for p in m.parameters()]}],
        **kwargs,
    )
    ref_opt = KProdigy(
        [{"params": mods_r[0].parameters(), "lr": 0.7}, {"params": [p for m in mods_r[1:] for p in m.parameters()]}],
        **kwargs,
    )
    hooked(model, opt)
    for _ in range(6):
        loss_of(model, X, y).backward()
        opt.finalize_step()
        train(ref, ref_opt, X, y, 1)
        assert all(p.grad is None for p in model.parameters())
    assert rel_err(flat(model), flat(ref)) < 1e-12
    for g, gr in zip(opt.param_groups, ref_opt.param_groups):
        for key in ("d", "d_max", "d_hat", "effective_lr", "step_size"):
            assert g[key] == pytest.approx(gr[key], rel=1e-10, abs=0), key
        assert g["k"] == gr["k"] == 6


def test_step_parameter_finalizes_on_step_and_state_dict_and_refuses_a_second_backward() -> None:
    X, y = data()
    model = mlp()
    opt = KProdigy(model.parameters())
    hooked(model, opt)
    first = flat(model)
    loss_of(model, X, y).backward()
    assert opt.param_groups[0]["k"] == 0 and torch.equal(flat(model), first)  # x moves with the new D
    opt.step()  # finalizes; no gradient is left for step() itself
    assert opt.param_groups[0]["k"] == 1 and not torch.equal(flat(model), first)
    loss_of(model, X, y).backward()
    assert opt.state_dict()["param_groups"][0]["k"] == 2
    loss_of(model, X, y).backward()
    with pytest.raises(RuntimeError, match="finalize_step"):  # a second backward without finalizing
        loss_of(model, X, y).backward()
    opt.finalize_step()
    assert opt.param_groups[0]["k"] == 3
    p = next(model.parameters())
    p.grad = torch.ones_like(p)
    opt.step_parameter(p)
    opt.step_parameter(p)  # outside backward: the first of the two is finalized first
    opt.finalize_step()
    assert opt.param_groups[0]["k"] == 5
    with pytest.raises(ValueError, match="not a param"):
        opt.step_parameter(torch.nn.Parameter(torch.zeros(1)))


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.0, 0.999)])
def test_step_parameter_equals_step_where_eps_binds(betas: tuple[float, float]) -> None:
    # a huge eps makes d * eps dominate the denominator, and betas[0] = 0 scales the step by d:
    # both use the D after this step's update, which step_parameter knows only in finalize_step
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(10, dtype=torch.float64))
    q = torch.nn.Parameter(p.detach().clone())
    full, partial = KProdigy([p], betas=betas, eps=0.1), KProdigy([q], betas=betas, eps=0.1)
    for _ in range(6):  # gradients of |x - 5|^2: D grows every step
        p.grad, q.grad = 2 * (p.detach() - 5), 2 * (q.detach() - 5)
        d_old = full.param_groups[0]["d"]
        full.step()
        partial.step_parameter(q)
        q.grad = None
        partial.finalize_step()
    assert full.param_groups[0]["d"] > 1.01 * d_old  # D moved in the last step
    assert partial.param_groups[0]["d"] == pytest.approx(full.param_groups[0]["d"], rel=1e-12)
    torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-12, atol=0)


def test_lr_scheduler_sees_finalize_step_as_a_step() -> None:
    import warnings

    X, y = data()
    model = mlp()
    opt = KProdigy(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    hooked(model, opt)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lr_scheduler.step.*")
        for _ in range(2):
            loss_of(model, X, y).backward()
            opt.finalize_step()
            sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------------------------
# factored second moment


def test_factored_equals_full_when_the_second_moment_is_rank_one() -> None:
    # g_t = s_t * outer(a, b): v is rank one, which row and column means represent exactly
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)
    w0, bias0 = (
        torch.randn(6, 4, generator=gen, dtype=torch.float64),
        torch.randn(4, generator=gen, dtype=torch.float64),
    )
    runs = []
    for factored in (False, True):
        w, bias = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(bias0.clone())
        opt = KProdigy([w, bias], factored=factored, weight_decay=0.01, use_bias_correction=True)
        g = torch.Generator().manual_seed(1)
        for _ in range(6):
            s = torch.randn((), generator=g, dtype=torch.float64)
            w.grad = s * torch.outer(a, b)  # rank one
            bias.grad = torch.randn(4, generator=g, dtype=torch.float64)  # 1-D: full v either way
            opt.step()
        runs.append((w.detach().clone(), bias.detach().clone(), opt))
    (w_full, b_full, full), (w_fact, b_fact, fact) = runs
    assert fact.state[w_fact_param(fact)]["exp_avg_sq"].shape == (6 + 4,)
    assert rel_err(w_fact, w_full) < 1e-12 and rel_err(b_fact, b_full) < 1e-12
    assert fact.param_groups[0]["d"] == pytest.approx(full.param_groups[0]["d"], rel=1e-12)


def w_fact_param(opt: KProdigy) -> torch.Tensor:
    return opt.param_groups[0]["params"][0]


def test_factored_step_restated_in_float64() -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(2, 3, 5, dtype=torch.float64))  # seen as 6 x 5
    opt = KProdigy([w], factored=True, betas=(0.9, 0.99))
    d, x0 = opt.param_groups[0]["d"], w.detach().clone()
    g = torch.randn(2, 3, 5, dtype=torch.float64)
    w.grad = g.clone()
    opt.step()
    g2 = (0.01 * d * d * g * g).reshape(6, 5)
    r, c = g2.mean(1), g2.mean(0)
    v_hat = (torch.outer(r, c) / r.mean()).reshape(2, 3, 5)
    m = 0.1 * d * g
    expected = x0 - d * m / (v_hat.sqrt() + opt.param_groups[0]["d"] * 1e-8)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(opt.state[w]["exp_avg_sq"], torch.cat([r, c]), rtol=1e-12, atol=0)


def test_factored_trains_checkpoints_and_validates() -> None:
    X, y = data()
    model = mlp()
    opt = KProdigy(model.parameters(), factored=True, d_steps=5)
    losses = train(model, opt, X, y, 10)
    assert losses[-1] < losses[0]
    words = sum(t.numel() for p in model.parameters() for t in opt.state[p].values() if torch.is_tensor(t) and t.dim())
    n = sum(p.numel() for p in model.parameters())
    assert words < 1.5 * n  # exp_avg, plus the small factored and 1-D statistics
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    model2 = copy.deepcopy(model)
    opt2 = KProdigy(model2.parameters(), factored=True, d_steps=5)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    train(model, opt, X, y, 2)
    train(model2, opt2, X, y, 2)
    torch.testing.assert_close(flat(model2), flat(model), rtol=0, atol=0)
    with pytest.raises(ValueError, match="factored"):
        KProdigy(model.parameters(), factored=1)  # type: ignore[arg-type]


def test_step_parameter_rejects_a_sparse_gradient_before_any_change() -> None:
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = KProdigy(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step_parameter(emb.weight)
    assert not opt._pending and not opt.state


def test_step_parameter_requires_groups_sharing_d_to_agree() -> None:
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))
    opt = KProdigy([{"params": [a]}, {"params": [b], "skip_nonfinite": False}], independent_d=False)
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    with pytest.raises(ValueError, match="must agree"):
        opt.step_parameter(a)
    assert not opt._pending and not opt.state
