"""KProdigy as a torch.optim.Optimizer: API, bookkeeping, checkpoints, schedulers, AMP, dtypes."""

from __future__ import annotations

import copy
import io
import math

import prodigyopt
import pytest
import torch

import kprodigy
from kprodigy import KProdigy
from kprodigy.functional import Hyperparams, init_state, step


def model_and_data(seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)).to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(16, 5, generator=gen).to(dtype)
    y = torch.randn(16, 1, generator=gen).to(dtype)
    return model, X, y


def train(model, opt, X, y, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(X) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_public_api_and_version() -> None:
    assert kprodigy.KProdigy is kprodigy.optim.KProdigy
    assert isinstance(kprodigy.__version__, str)
    assert set(kprodigy.functional.__all__) >= {"Hyperparams", "State", "DState", "init_state", "step"}


def test_trains_and_exposes_prodigyopt_group_keys() -> None:
    model, X, y = model_and_data()
    opt = KProdigy(model.parameters())
    losses = train(model, opt, X, y, 60)
    assert losses[-1] < 0.5 * losses[0]
    group = opt.param_groups[0]
    for key in ("d", "d_max", "d_numerator", "d_denom", "d_hat", "d0", "lr"):
        assert type(group[key]) is float, key
    assert type(group["k"]) is int and group["k"] == 60
    assert group["d"] > group["d0"]
    assert group["d"] * group["lr"] > 0  # what trainers log


def test_unknown_keyword_is_an_error() -> None:
    model, _, _ = model_and_data()
    with pytest.raises(TypeError, match="unexpected keyword"):
        KProdigy(model.parameters(), lr=1.0, betas1=0.9)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(lr=-1.0), "lr"),
        (dict(betas=(1.0, 0.999)), "betas\\[0\\]"),
        (dict(betas=(0.9, -0.1)), "betas\\[1\\]"),
        (dict(betas=(0.9,)), "betas"),
        (dict(beta3=1.5), "beta3"),
        (dict(eps=0.0), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(d0=0.0), "d0"),
        (dict(d_coef=float("nan")), "d_coef"),
        (dict(growth_rate=0.5), "growth_rate"),
        (dict(d_update_freq=0), "d_update_freq"),
        (dict(slice_p=1.5), "slice_p"),
        (dict(decouple="yes"), "decouple"),
        (dict(foreach="auto"), "foreach"),
        (dict(independent_d=1), "independent_d"),
    ],
)
def test_invalid_hyperparameters_name_the_field(kwargs: dict, field: str) -> None:
    model, _, _ = model_and_data()
    with pytest.raises(ValueError, match=f"Invalid {field}"):
        KProdigy(model.parameters(), **kwargs)


def test_invalid_group_hyperparameter_in_add_param_group_changes_nothing() -> None:
    model, _, _ = model_and_data()
    opt = KProdigy(model[0].parameters())
    with pytest.raises(ValueError, match="Invalid lr"):
        opt.add_param_group(dict(params=model[2].parameters(), lr=-0.1))
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="Invalid betas"):
        KProdigy([dict(params=model[0].parameters()), dict(params=model[2].parameters(), betas=(0.9, 2.0))])


def test_closure_zero_grad_and_params_without_grad() -> None:
    model, X, y = model_and_data()
    frozen = torch.nn.Parameter(torch.randn(3))
    opt = KProdigy(list(model.parameters()) + [frozen])
    before = frozen.detach().clone()

    def closure():
        opt.zero_grad()
        loss = ((model(X) - y) ** 2).mean()
        loss.backward()
        return loss

    loss0 = opt.step(closure)
    for _ in range(20):
        loss = opt.step(closure)
    assert loss < loss0
    assert torch.equal(frozen, before) and frozen not in opt.state
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_add_param_group_gets_its_own_state_and_d() -> None:
    model, X, y = model_and_data()
    opt = KProdigy(model[0].parameters(), independent_d=True)
    train(model, opt, X, y, 5)
    opt.add_param_group(dict(params=model[2].parameters(), lr=0.5, d0=1e-5))
    train(model, opt, X, y, 5)
    g0, g1 = opt.param_groups
    assert g1["lr"] == 0.5 and g1["d0"] == 1e-5 and g1["k"] == 5 and g0["k"] == 10
    assert g1["d"] >= 1e-5  # never below d0, also in float32 (issue 21: D arithmetic in float64)


def test_state_dict_round_trip_resumes_bit_exactly() -> None:
    model, X, y = model_and_data()
    opt = KProdigy(model.parameters(), weight_decay=0.01, use_bias_correction=True)
    train(model, opt, X, y, 7)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, X, y, 5)
    expected = flat(model)

    buffer.seek(0)
    saved = torch.load(buffer)  # weights_only=True: the checkpoint holds no custom classes
    model2, _, _ = model_and_data(seed=99)
    model2.load_state_dict(saved["model"])
    opt2 = KProdigy(model2.parameters(), weight_decay=0.01, use_bias_correction=True)
    opt2.load_state_dict(saved["opt"])
    train(model2, opt2, X, y, 5)
    assert torch.equal(flat(model2), expected)
    assert opt2.param_groups[0]["d"] == opt.param_groups[0]["d"]


def test_prodigyopt_checkpoint_loads_and_training_continues() -> None:
    model, X, y = model_and_data()
    ref = prodigyopt.Prodigy(model.parameters(), eps=1e-30)
    train(model, ref, X, y, 6)
    saved = copy.deepcopy(ref.state_dict())
    model_ref = copy.deepcopy(model)
    ref = prodigyopt.Prodigy(model_ref.parameters())
    ref.load_state_dict(copy.deepcopy(saved))
    opt = KProdigy(model.parameters())
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["d"] == ref.param_groups[0]["d"]
    assert opt.param_groups[0]["d_update_freq"] == 1 and opt.param_groups[0]["eps"] == 1e-30
    ours = train(model, opt, X, y, 6)
    train(model_ref, ref, X, y, 6)
    assert all(math.isfinite(v) for v in ours)
    assert torch.allclose(flat(model), flat(model_ref), rtol=1e-4, atol=1e-6)
    assert ours[-1] < ours[0]


def test_kprodigy_checkpoint_loads_into_prodigyopt() -> None:
    model, X, y = model_and_data()
    opt = KProdigy(model.parameters())
    train(model, opt, X, y, 4)
    ref = prodigyopt.Prodigy(model.parameters())
    ref.load_state_dict(opt.state_dict())
    losses = train(model, ref, X, y, 3)
    assert all(math.isfinite(v) for v in losses) and ref.param_groups[0]["k"] == 7


def test_per_group_lr_and_frozen_group() -> None:
    model, X, y = model_and_data()
    head_before = [p.detach().clone() for p in model[2].parameters()]
    opt = KProdigy(
        [dict(params=model[0].parameters(), lr=0.5), dict(params=model[2].parameters(), lr=0.0)],
        weight_decay=0.1,
        independent_d=False,
        use_bias_correction=False,  # D moves within 5 steps
    )
    train(model, opt, X, y, 5)
    for p, before in zip(model[2].parameters(), head_before):
        assert torch.equal(p.detach(), before)  # lr=0: frozen, weight decay included
        assert not opt.state[p]["exp_avg_sq"].any()
    assert opt.param_groups[0]["d"] > opt.param_groups[0]["d0"]


def test_one_d_for_all_groups_by_default_and_the_legacy_automatic_rule() -> None:
    model, X, y = model_and_data()
    groups = [dict(params=list(model[0].parameters())), dict(params=list(model[2].parameters()))]
    assert KProdigy(groups).d_groups() == [[0, 1]]  # prodigyopt's: one D, however many groups
    assert KProdigy(groups, independent_d=True).d_groups() == [[0], [1]]
    assert KProdigy(groups, independent_d=None).d_groups() == [[0], [1]]  # 0.5.0's automatic rule
    assert KProdigy(model.parameters(), independent_d=None).d_groups() == [[0]]


def test_shared_d_requires_agreeing_d_settings() -> None:
    model, X, y = model_and_data()
    opt = KProdigy(
        [dict(params=model[0].parameters(), d_coef=2.0), dict(params=model[2].parameters())], independent_d=False
    )
    with pytest.raises(ValueError, match="must agree"):
        train(model, opt, X, y, 1)


@pytest.mark.parametrize("decouple", [False, True])
def test_step_never_writes_into_grad(decouple: bool) -> None:
    model, X, y = model_and_data()
    opt = KProdigy(model.parameters(), weight_decay=0.5, decouple=decouple, maximize=True)
    ((model(X) - y) ** 2).mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


def test_maximize_equals_minimizing_the_negation() -> None:
    xs = [torch.randn(4, 3, generator=torch.Generator().manual_seed(0))]
    a = [xs[0].clone().requires_grad_()]
    b = [xs[0].clone().requires_grad_()]
    opt_a, opt_b = KProdigy(a, maximize=True), KProdigy(b)
    for k in range(4):
        g = torch.randn(4, 3, generator=torch.Generator().manual_seed(k + 1))
        a[0].grad, b[0].grad = g.clone(), -g
        opt_a.step()
        opt_b.step()
    assert torch.equal(a[0], b[0])


def test_sparse_gradients_are_rejected_with_a_clear_error() -> None:
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = KProdigy(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_lr_scheduler_and_one_cycle_beta_cycling() -> None:
    model, X, y = model_and_data()
    opt = KProdigy(model.parameters())
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=20)
    betas_seen, lrs = set(), []
    for _ in range(20):
        train(model, opt, X, y, 1)
        sched.step()
        betas_seen.add(opt.param_groups[0]["betas"][0])
        lrs.append(opt.param_groups[0]["lr"])
    assert len(betas_seen) > 5 and max(lrs) > 10 * min(lrs)
    assert math.isfinite(opt.param_groups[0]["d"])
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(KProdigy(model.parameters()), T_max=10)
    cosine.step()


def test_grad_scaler() -> None:
    model, X, y = model_and_data()
    opt = KProdigy(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    reference = copy.deepcopy(model)
    ref_opt = KProdigy(reference.parameters())
    for _ in range(5):
        opt.zero_grad()
        scaler.scale(((model(X) - y) ** 2).mean()).backward()
        scaler.step(opt)
        scaler.update()
        train(reference, ref_opt, X, y, 1)
    assert torch.allclose(flat(model), flat(reference), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("foreach", [False, True])
def test_dtypes_train(dtype: torch.dtype, foreach: bool) -> None:
    model, X, y = model_and_data(dtype=dtype)
    # bfloat16 cannot represent steps of d0 = 1e-6 on weights of order 0.1: start D higher there
    d0 = 1e-2 if dtype == torch.bfloat16 else 1e-6
    opt = KProdigy(model.parameters(), foreach=foreach, d0=d0)
    losses = train(model, opt, X, y, 40)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0]
    assert all(p.dtype == dtype for p in model.parameters())
    state_dtype = dtype  # state_precision="auto": bfloat16 state for bfloat16 params
    assert all(opt.state[p]["exp_avg_sq"].dtype == state_dtype for p in model.parameters())


def test_mixed_dtypes_in_one_group() -> None:
    a = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float32, requires_grad=True)
    opt = KProdigy([a, b], foreach=True)
    for _ in range(3):
        a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
        opt.step()
    assert a.dtype == torch.float64 and b.dtype == torch.float32
    assert torch.isfinite(a).all() and torch.isfinite(b).all()


def test_functional_step_host_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """With D on the device (inside torch.func transforms, torch.compile, off the CPU) the step
    reads no tensor value on the host: .item(), bool(), .tolist() are forbidden. On the CPU it
    keeps D on the host as the class does: at most three reads a step (D; on the native path the
    dots that decide the skip before ``s`` is written; the statistics), none a device sync there."""
    xs = [torch.randn(5, 4), torch.randn(7)]
    hp = Hyperparams(use_bias_correction=True, d_update_freq=2, weight_decay=0.1)
    reads = []
    original = torch.Tensor.tolist

    def counted(self, *args, **kwargs):
        reads.append(1)
        return original(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "tolist", counted)
        params, state = xs, init_state(xs, hp)
        for k in range(4):
            before = len(reads)
            params, state = step(params, [torch.ones_like(x) for x in xs], state, hp)
            assert len(reads) - before <= 3, k

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation inside the step")

    stacked = [x.unsqueeze(0) for x in xs]  # an ensemble of one, under vmap: D on the device
    state = torch.func.vmap(lambda ps: init_state(ps, hp, compact_p0=False))(stacked)
    for name in ("item", "__bool__", "tolist", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    params = stacked
    for _ in range(3):
        params, state = torch.func.vmap(lambda p, g, s: step(p, g, s, hp))(params, [torch.ones_like(x) for x in stacked], state)


def test_functorch_inputs_take_the_per_tensor_path() -> None:
    from kprodigy.functional._engine import use_foreach

    x = torch.randn(3, 4)
    assert use_foreach([x], True) is True
    assert use_foreach([x], None) is False  # CPU: per-tensor kernels by default (faster there)
    seen = []
    torch.func.vmap(lambda t: seen.append(use_foreach([t], True)) or t)(x)
    assert seen == [False]


def test_lr_schedule_hyperparams_equal_a_full_validation() -> None:
    """An lr that changes every step (a scheduler) is validated alone (``Hyperparams.with_lr``):
    the result equals a full validation, and a bad lr still raises before anything changes."""
    import math

    from kprodigy.optim._checks import hparams

    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = KProdigy([p], weight_decay=0.01, betas=(0.8, 0.99))
    group = opt.param_groups[0]
    for t in range(5):
        group["lr"] = 0.5 * (1 + math.cos(math.pi * t / 5)) + 1e-3 * t
        assert hparams(group) == Hyperparams.from_mapping(group)
        p.grad = torch.ones_like(p)
        opt.step()
    for bad in (-1.0, float("nan"), "0.1"):
        group["lr"] = bad
        before = p.detach().clone()
        with pytest.raises(ValueError, match="lr"):
            opt.step()
        assert torch.equal(p.detach(), before)
