"""``diagnostics()``, ``log_dict()`` and the ``KProdigyWarning`` checks (issue 14).

Options that decide D's trajectory (``use_bias_correction``, ``independent_d``) are passed
explicitly where they matter, so that the tests hold under the 0.5 and the 0.6 defaults.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

import kprodigy
from kprodigy import DGroupDiagnostics, KProdigy, KProdigyWarning, log_dict
from kprodigy.optim import _diagnostics


def mlp(dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)).to(dtype)


def data(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(256, 16, generator=gen)
    return X.to(dtype), X[:, :4].sum(1, keepdim=True).sin().to(dtype)


def train(opt: torch.optim.Optimizer, model: torch.nn.Module, steps: int, scale: float = 1.0, sched=None) -> None:  # type: ignore[no-untyped-def]
    dtype = next(model.parameters()).dtype
    X, y = data(dtype)
    for _ in range(steps):
        opt.zero_grad()
        (((model(X) - y) ** 2).mean() * scale).backward()
        opt.step()
        if sched is not None:
            sched.step()


@contextmanager
def kprodigy_warnings() -> Iterator[list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out: list[warnings.WarningMessage] = []
        yield out
    out.extend(w for w in caught if issubclass(w.category, KProdigyWarning))


BOTH_BC = pytest.mark.parametrize("bc", [False, True], ids=["nobc", "bc"])


# --------------------------------------------------------------------------- diagnostics()
def test_diagnostics_reads_the_group_keys_and_is_plain_data() -> None:
    model = mlp()
    params = list(model.parameters())
    opt = KProdigy(
        [{"params": params[:2]}, {"params": params[2:], "lr": 0.5}], independent_d=True, use_bias_correction=False
    )
    train(opt, model, 12)
    diag = opt.diagnostics()
    assert [r.param_groups for r in diag] == [(0,), (1,)]
    for record, group in zip(diag, opt.param_groups):
        assert isinstance(record, DGroupDiagnostics)
        for key in ("d", "d0", "d_max", "d_hat", "d_numerator", "d_denom"):
            assert getattr(record, key) == group[key]
        assert record.k == group["k"] == 12 and record.skipped_steps == 0
        assert record.growth == pytest.approx(group["d"] / group["d0"])
        assert record.lrs == (group["lr"],) and record.effective_lrs == (group["effective_lr"],)
        assert record.step_sizes == (group["step_size"],)
        assert record.status in ("growing", "settled") and not record.frozen and not record.capped
        flat = record.as_dict()
        assert all(isinstance(v, float) for v in flat.values())
        assert flat["d"] == group["d"] and flat["k"] == 12.0
    with pytest.raises(AttributeError):
        diag[0].d = 1.0  # type: ignore[misc]  # frozen
    text = str(diag)
    assert "D-group 0 (param groups [0])" in text and "D-group 1 (param groups [1])" in text
    assert f"k={12}" in text and "lr=0.5" in text
    assert diag.as_dict()["dgroup1/d"] == opt.param_groups[1]["d"]


def test_status_rules() -> None:
    # starting, then growing, then settled (a convex problem whose D stops growing)
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(10))
    target = torch.linspace(-1, 1, 10)
    opt = KProdigy([w], use_bias_correction=False)
    assert opt.diagnostics()[0].status == "starting"  # before the first step: d = d0, k = 0
    seen = []
    for _ in range(200):
        opt.zero_grad()
        ((w - target) ** 2).sum().backward()
        opt.step()
        seen.append(opt.diagnostics()[0].status)
    assert "growing" in seen[:20]
    assert seen[-1] == "settled"
    record = opt.diagnostics()[0]
    assert record.d_hat < record.d_max

    # the rule on hand-set group keys: growing iff the last estimate is D's running maximum
    group = opt.param_groups[0]
    group.update(d=2e-3, d_max=2e-3, d_hat=2e-3, k=100)
    assert opt.diagnostics()[0].status == "growing"
    group.update(d_hat=1e-3)
    assert opt.diagnostics()[0].status == "settled"
    group.update(d=5e-6, d_max=5e-6, d_hat=5e-6)  # 5 x d0 after 100 steps
    assert opt.diagnostics()[0].status == "stuck_at_d0"

    # stuck_at_d0: an Adam-style lr keeps D at d0 (after 50 steps; "starting" before)
    model = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KProdigyWarning)
        opt = KProdigy(model.parameters(), lr=1e-3, use_bias_correction=False)
    train(opt, model, 49)
    assert opt.diagnostics()[0].status == "starting"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KProdigyWarning)
        train(opt, model, 1)
    assert opt.diagnostics()[0].status == "stuck_at_d0"

    # frozen: d_steps reached
    model = mlp()
    opt = KProdigy(model.parameters(), d_steps=5, use_bias_correction=False)
    train(opt, model, 6)
    assert opt.diagnostics()[0].status == "frozen" and opt.diagnostics()[0].frozen


def test_capped_status_names_the_d_group_the_cap_bound() -> None:
    far, near = torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(10))
    opt = KProdigy(
        [{"params": [far]}, {"params": [near]}], d_ratio_cap=2.0, independent_d=True, use_bias_correction=False
    )
    for _ in range(30):
        opt.zero_grad()
        ((far - 100.0) ** 2).sum().add(((near - 0.1) ** 2).sum()).backward()
        opt.step()
    far_diag, near_diag = opt.diagnostics()
    assert far_diag.capped and far_diag.status == "capped"
    assert far_diag.d == pytest.approx(2.0 * near_diag.d) and far_diag.d < far_diag.d_max
    assert not near_diag.capped


def test_diagnostics_in_capturable_mode_reads_the_device_tensors() -> None:
    model = mlp()
    opt = KProdigy(model.parameters(), capturable=True, use_bias_correction=False)
    train(opt, model, 5)
    record = opt.diagnostics()[0]
    assert isinstance(record.d, float) and record.d == float(opt.param_groups[0]["d"])
    assert record.k == 5 and isinstance(record.k, int)
    assert all(isinstance(v, float) for v in log_dict(opt).values())


def test_capturable_step_reads_nothing_on_the_host_with_the_checks_on(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    model = mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KProdigyWarning)
        opt = KProdigy(model.parameters(), capturable=True, lr=1e-3, use_bias_correction=False)
    train(opt, model, 2)  # the first step reads each param once (its p0): warm up first

    def no_host_read(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("host read in a capturable step")

    for name in ("__bool__", "__float__", "__int__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, no_host_read)
    with kprodigy_warnings() as caught:
        train(opt, model, 60)  # the D checks are skipped on device tensors
    monkeypatch.undo()
    assert caught == []
    assert opt.diagnostics()[0].status == "stuck_at_d0"  # diagnostics() sees it when asked


# --------------------------------------------------------------------------- log_dict()
def test_log_dict_key_scheme() -> None:
    model = mlp()
    params = list(model.parameters())
    opt = KProdigy(
        [{"params": params[:2]}, {"params": params[2:3], "lr": 0.1}, {"params": params[3:], "d_group": "head"}],
        independent_d=False,
        use_bias_correction=False,
    )
    train(opt, model, 3)
    logs = log_dict(opt)
    per_d = ["capped", "d", "d0", "d_denom", "d_hat", "d_max", "d_numerator", "frozen", "growth", "k", "skipped_steps"]
    expected = {f"kprodigy/dgroup{j}/{key}" for j in (0, 1) for key in per_d}
    expected |= {f"kprodigy/group{i}/{key}" for i in (0, 1, 2) for key in ("lr", "effective_lr", "step_size")}
    assert set(logs) == expected
    assert all(isinstance(v, float) for v in logs.values())
    assert logs["kprodigy/dgroup0/d"] == opt.param_groups[0]["d"] == opt.param_groups[1]["d"]
    assert logs["kprodigy/dgroup1/d"] == opt.param_groups[2]["d"]
    assert logs["kprodigy/group1/lr"] == 0.1
    assert logs["kprodigy/group1/effective_lr"] == opt.param_groups[1]["effective_lr"]
    assert logs["kprodigy/dgroup0/k"] == 3.0
    assert set(log_dict(opt, prefix="")) == {key.removeprefix("kprodigy/") for key in expected}
    assert "opt/dgroup0/d" in log_dict(opt, prefix="opt")


def test_log_dict_unwraps_trainer_wrappers_and_rejects_other_optimizers() -> None:
    model = mlp()
    opt = KProdigy(model.parameters())

    class Wrapper:  # accelerate's AcceleratedOptimizer and Lightning's LightningOptimizer keep .optimizer
        def __init__(self, optimizer: object) -> None:
            self.optimizer = optimizer

    assert log_dict(Wrapper(Wrapper(opt))) == log_dict(opt)
    with pytest.raises(TypeError, match="expected a KProdigy"):
        log_dict(torch.optim.SGD(model.parameters(), lr=0.1))


def test_public_names() -> None:
    for name in ("KProdigyWarning", "DGroupDiagnostics", "Diagnostics", "log_dict"):
        assert name in kprodigy.__all__ and hasattr(kprodigy, name)
    assert issubclass(KProdigyWarning, UserWarning)


# --------------------------------------------------------------------------- warnings: silent in normal runs
@BOTH_BC
def test_a_normal_run_gives_no_warning(bc: bool) -> None:
    model = mlp()
    with kprodigy_warnings() as caught:
        opt = KProdigy(model.parameters(), use_bias_correction=bc, independent_d=False)
        train(opt, model, 100)
    assert caught == []
    assert opt.diagnostics()[0].growth > 100


def test_no_warning_for_a_small_multiplier_beside_a_group_at_one_or_for_schedules_from_one() -> None:
    model = mlp()
    params = list(model.parameters())
    with kprodigy_warnings() as caught:
        opt = KProdigy([{"params": params[:2], "lr": 0.1}, {"params": params[2:]}], use_bias_correction=False)
        opt2 = KProdigy(
            [{"params": params[:2], "lr": 0.05}, {"params": params[2:], "lr": 1.0}], use_bias_correction=False
        )
        KProdigy([{"params": params[:2], "lr": 0.0}, {"params": params[2:], "lr": 0.0}])  # all frozen: not an Adam lr
        train(opt, model, 5)
        train(opt2, model, 5)
        # a warm-up from 0 and a decay to 0 (torch schedulers write initial_lr = 1.0 into the groups)
        model3 = mlp()
        opt3 = KProdigy(model3.parameters(), use_bias_correction=False)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt3, lambda t: min(1.0, t / 20) * 0.5 * (1 + math.cos(math.pi * t / 80))
        )
        train(opt3, model3, 80, sched=sched)
        # a hand-written cosine to 0 (no scheduler): judged by D, not by lr
        model4 = mlp()
        opt4 = KProdigy(model4.parameters(), use_bias_correction=False)
        X, y = data()
        for t in range(80):
            opt4.param_groups[0]["lr"] = 0.5 * (1 + math.cos(math.pi * t / 80))
            opt4.zero_grad()
            ((model4(X) - y) ** 2).mean().backward()
            opt4.step()
    assert caught == []


# --------------------------------------------------------------------------- warning 1: an Adam lr
def test_adam_lr_warns_once_at_construction_naming_the_fix() -> None:
    model = mlp()
    params = list(model.parameters())
    with kprodigy_warnings() as caught:
        opt = KProdigy(
            [{"params": params[:2], "lr": 1e-4}, {"params": params[2:], "lr": 1e-3}], use_bias_correction=False
        )
        train(opt, model, 3)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "lr=0.0001, 0.001" in message and "lr=1.0" in message and "d_coef" in message
    assert caught[0].filename == __file__  # points at the user's line


def test_adam_lr_set_by_a_scheduler_warns_at_step_time() -> None:
    model = mlp()
    with kprodigy_warnings() as caught:
        opt = KProdigy(model.parameters(), use_bias_correction=False)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=10)
        assert caught == []
        train(opt, model, 10, sched=sched)
    assert len(caught) == 1 and "at step time" in str(caught[0].message)
    assert caught[0].filename == __file__
    # the same schedule around 1.0 is fine
    model = mlp()
    with kprodigy_warnings() as caught:
        opt = KProdigy(model.parameters(), use_bias_correction=False)
        train(opt, model, 10, sched=torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10))
    assert caught == []


def test_warning_category_can_be_filtered() -> None:
    model = mlp()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=KProdigyWarning)
        KProdigy(model.parameters(), lr=1e-3)
    assert caught == []
    with pytest.warns(KProdigyWarning, match="below 0.1"):
        KProdigy(model.parameters(), lr=1e-3)


# --------------------------------------------------------------------------- warning 2: D stuck at d0
def stuck_messages(**kwargs) -> list[str]:  # type: ignore[no-untyped-def]
    dtype = kwargs.pop("dtype", torch.float32)
    scale = kwargs.pop("scale", 1.0)
    steps = kwargs.pop("steps", 60)
    model = mlp(dtype)
    with kprodigy_warnings() as caught:
        opt = KProdigy(model.parameters(), independent_d=False, **kwargs)
        train(opt, model, steps, scale=scale)
    return [str(w.message) for w in caught if "is still" in str(w.message)]


def test_stuck_d_names_16_bit_params() -> None:
    # measured: bfloat16 params with bias correction keep D at exactly d0 (1.00 x) for 60 steps
    messages = stuck_messages(dtype=torch.bfloat16, use_bias_correction=True)
    assert len(messages) == 1
    assert "bfloat16 params" in messages[0] and "stochastic_rounding=True" in messages[0]
    assert "after 50 steps" in messages[0]
    assert stuck_messages(dtype=torch.bfloat16, use_bias_correction=True, stochastic_rounding=True) == []


@BOTH_BC
def test_stuck_d_names_a_tiny_lr(bc: bool) -> None:
    messages = stuck_messages(lr=1e-3, use_bias_correction=bc)
    assert len(messages) == 1 and "a tiny lr (0.001)" in messages[0] and "lr=1.0" in messages[0]
    assert "bfloat16" not in messages[0] and "near zero" not in messages[0]


@BOTH_BC
def test_stuck_d_names_near_zero_gradients(bc: bool) -> None:
    messages = stuck_messages(scale=1e-10, use_bias_correction=bc)
    assert len(messages) == 1 and "gradients near zero" in messages[0] and "clipped" in messages[0]
    assert "tiny lr" not in messages[0]


def test_stuck_d_names_safeguard_warmup_with_bias_correction() -> None:
    # the measured HF case (D 8.8e-6 after 60 steps) is a warm-up run; the cause is named from the
    # flags whenever D is stuck, here with an lr schedule that starts at 1e-3 of its base
    model = mlp()
    with kprodigy_warnings() as caught:
        opt = KProdigy(model.parameters(), safeguard_warmup=True, use_bias_correction=True, independent_d=False)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1e-3)
        train(opt, model, 60, sched=sched)
    messages = [str(w.message) for w in caught if "is still" in str(w.message)]
    assert len(messages) == 1 and "safeguard_warmup=True together with use_bias_correction=True" in messages[0]
    assert "tiny lr" in messages[0]
    # unit check of the naming: the same flags on a D that is stuck for no other reason
    text = _diagnostics._stuck_message(opt, opt.param_groups)
    assert "safeguard_warmup=False" in text


def test_stuck_d_warns_once_and_not_before_50_steps_with_gradients() -> None:
    assert stuck_messages(lr=1e-3, use_bias_correction=False, steps=49) == []
    # zero gradients (d_denom == 0) do not count
    w = torch.nn.Parameter(torch.ones(4))
    with kprodigy_warnings() as caught:
        opt = KProdigy([w], use_bias_correction=False)
        for _ in range(80):
            opt.zero_grad()
            (w * 0).sum().backward()
            opt.step()
    assert caught == []
    assert len(stuck_messages(lr=1e-3, use_bias_correction=False, steps=150)) == 1


# --------------------------------------------------------------------------- warning 3: D growing late
def late_messages(steps: int, shift_at: int = 300, schedule: str = "constant", **kwargs) -> list[str]:  # type: ignore[no-untyped-def]
    """Linear regression whose targets move 100x farther at step ``shift_at`` (measured: D grows
    105-181x between steps 256 and 512, benchmarks/d_growth.py)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 10, generator=gen)
    w_true = torch.randn(10, 1, generator=gen)
    torch.manual_seed(0)
    model = torch.nn.Linear(10, 1)
    with kprodigy_warnings() as caught:
        opt = KProdigy(model.parameters(), independent_d=False, **kwargs)
        for t in range(steps):
            if schedule == "cosine":
                opt.param_groups[0]["lr"] = 0.5 * (1 + math.cos(math.pi * t / steps))
            opt.zero_grad()
            ((model(x) - x @ w_true * (1.0 if t < shift_at else 100.0)) ** 2).mean().backward()
            opt.step()
    return [str(w.message) for w in caught]


@BOTH_BC
def test_late_growth_warns_once_when_d_jumps_late(bc: bool) -> None:
    messages = late_messages(600, use_bias_correction=bc)
    assert len(messages) == 1
    assert "between step 256 and step 512" in messages[0] and "growth_rate" in messages[0]


def test_late_growth_is_silent_early_in_a_decaying_tail_and_for_slow_growth() -> None:
    assert late_messages(600, shift_at=100, use_bias_correction=False) == []  # the jump lands before step 256
    assert late_messages(600, schedule="cosine", use_bias_correction=False) == []  # lr falls: d * lr does not grow
    assert late_messages(_diagnostics.LATE_MIN_STEP - 1, use_bias_correction=False) == []  # too early to judge
    # separable logistic regression: no finite minimizer, D grows forever but slowly (1.3-1.8x per doubling of k)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 10, generator=gen)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    model = torch.nn.Linear(10, 2)
    with kprodigy_warnings() as caught:
        opt = KProdigy(model.parameters(), independent_d=False, use_bias_correction=False)
        for _ in range(1024):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert caught == []
