"""``state_precision`` (issue 22): float32, bfloat16 (stochastic rounding) and int8 state, the
"auto" default, bytes per parameter, checkpoints across precisions, prodigyopt's state dict, the
deprecated ``fp32_state`` alias, validation and the non-finite skip with compact state."""

from __future__ import annotations

import copy
import io
import math
import warnings
from typing import Any

import prodigyopt
import pytest
import torch
from reference import Reference

from kprodigy import KProdigy
from kprodigy.functional import Hyperparams, _formats, init_state, step

BF16_SPACING = 2.0**-8  # relative spacing of bfloat16 (8 significant bits)


def mlp(dtype: torch.dtype, seed: int = 0, width: int = 32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, width), torch.nn.Tanh(), torch.nn.Linear(width, 4)).to(dtype)


def data(seed: int = 1, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(64, 16, generator=gen)
    return X.to(dtype), torch.sin(X[:, :4] * 2).to(dtype)


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> list[float]:
    X, y = data(seed, next(model.parameters()).dtype)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(X).float() - y.float()) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the storages behind the optimizer's state tensors (each storage once)."""
    seen: dict[int, int] = {}
    for st in opt.state.values():
        for t in st.values():
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def bytes_per_param(opt: torch.optim.Optimizer, model: torch.nn.Module) -> float:
    return state_bytes(opt) / sum(p.numel() for p in model.parameters())


def dtypes(opt: torch.optim.Optimizer, p: torch.Tensor) -> dict[str, torch.dtype]:
    return {k: t.dtype for k, t in opt.state[p].items() if isinstance(t, torch.Tensor) and k != "step"}


# ---------------------------------------------------------------------------------------------
# what "auto" and each precision store


@pytest.mark.parametrize(
    "param, precision, moments, s",
    [
        (torch.float32, "auto", torch.float32, torch.float32),
        (torch.float64, "auto", torch.float64, torch.float64),
        (torch.bfloat16, "auto", torch.bfloat16, torch.bfloat16),
        (torch.float16, "auto", torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, "float32", torch.float32, torch.float32),
        (torch.float32, "bfloat16", torch.bfloat16, torch.bfloat16),
        (torch.float32, "int8", torch.uint8, torch.bfloat16),
        (torch.bfloat16, "int8", torch.uint8, torch.bfloat16),
    ],
)
def test_state_dtypes(param: torch.dtype, precision: str, moments: torch.dtype, s: torch.dtype) -> None:
    model = mlp(param, width=512)  # the first weight has 8192 elements: int8 blocks under "int8"
    opt = KProdigy(model.parameters(), state_precision=precision, d0=1e-3)
    train(model, opt, 3)
    w = model[0].weight
    assert dtypes(opt, w) == {"exp_avg": moments, "exp_avg_sq": moments, "s": s, "p0": param}
    assert opt.param_groups[0]["state_precision"] == precision
    if precision == "int8":  # a bias under 4096 elements keeps bfloat16 moments
        assert opt.state[model[0].bias]["exp_avg"].dtype == torch.bfloat16


def test_float32_state_is_the_old_default_bit_for_bit() -> None:
    """float32 params: "auto", "float32" and the deprecated fp32_state=True are one code path
    (the float32 kernels, never the compact backend): identical trajectories."""
    runs = []
    for kw in ({}, {"state_precision": "float32"}, {"fp32_state": True}):
        model = mlp(torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            opt = KProdigy(model.parameters(), d0=1e-4, **kw)
        train(model, opt, 12)
        runs.append([p.detach().clone() for p in model.parameters()])
        assert opt.param_groups[0]["d"] > 1e-4
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run))


def test_fp32_state_alias_warns_and_maps() -> None:
    model = mlp(torch.bfloat16)
    with pytest.warns(DeprecationWarning, match="state_precision='float32'"):
        opt = KProdigy(model.parameters(), fp32_state=True)
    assert opt.param_groups[0]["state_precision"] == "float32" and "fp32_state" not in opt.param_groups[0]
    train(model, opt, 2)
    assert dtypes(opt, model[0].weight)["exp_avg"] == torch.float32
    with pytest.warns(DeprecationWarning):
        assert Hyperparams(fp32_state=False).state_precision == "auto"
    with pytest.raises(ValueError, match="fp32_state"):
        KProdigy(model.parameters(), fp32_state=True, state_precision="bfloat16")


# ---------------------------------------------------------------------------------------------
# bytes per parameter, counted from the storages


def test_bf16_params_at_the_defaults_keep_no_more_state_than_prodigyopt() -> None:
    ours, theirs = mlp(torch.bfloat16, width=256), mlp(torch.bfloat16, width=256)
    opt = KProdigy(ours.parameters())
    ref = prodigyopt.Prodigy(theirs.parameters())
    train(ours, opt, 2)
    train(theirs, ref, 2)
    assert bytes_per_param(opt, ours) <= bytes_per_param(ref, theirs)
    assert bytes_per_param(opt, ours) == pytest.approx(8.0)


@pytest.mark.parametrize("param, limit", [(torch.float32, 3.0), (torch.bfloat16, 2.5)])
def test_int8_with_slice_p_11_meets_the_targets(param: torch.dtype, limit: float) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).to(param)
    opt = KProdigy(model.parameters(), state_precision="int8", slice_p=11)
    x = torch.randn(8, 256, dtype=param)
    model(x).float().square().mean().backward()
    opt.step()
    assert bytes_per_param(opt, model) <= limit


# ---------------------------------------------------------------------------------------------
# numerics


def quadratic_run(steps: int, precision: str, **kw: object) -> tuple[list[torch.Tensor], list[torch.Tensor], float, float]:
    """A problem where D grows by orders of magnitude (from d0 = 1e-6): KProdigy with
    ``precision`` state on float64 params against the float64 re-statement on the same gradients
    (each computed from the re-statement's own params, so that errors do not feed back)."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(40, 30, generator=gen), torch.randn(300, generator=gen)]
    targets = [torch.randn(p.shape, generator=gen) * 3 for p in params]
    params = [p.double() for p in params]
    ours = [p.clone() for p in params]
    hp = dict(d0=1e-6, slice_p=int(kw.get("slice_p", 1)))  # type: ignore[call-overload]
    opt = KProdigy(ours, state_precision=precision, **kw)
    ref = Reference([(params, hp)], [[0]])
    torch.manual_seed(0)
    for _ in range(steps):
        grads = [2 * (x - t) for x, t in zip(ref.params(0), targets)]
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        opt.step()
        ref.step([grads])
    return ours, ref.params(0), opt.param_groups[0]["d"], ref.ds[0].d


def movement_error(ours: list[torch.Tensor], ref: list[torch.Tensor], start: list[torch.Tensor]) -> float:
    num = sum(float((a.double() - b).norm() ** 2) for a, b in zip(ours, ref))
    den = sum(float((b - s.double()).norm() ** 2) for b, s in zip(ref, start))
    return math.sqrt(num / den)


@pytest.mark.parametrize("kw", [{}, {"slice_p": 7}])
def test_bf16_state_tracks_the_float64_restatement(kw: dict) -> None:
    """bfloat16 state (stochastic rounding) of float64 params against the float64 re-statement, 25
    steps in which D grows from 1e-6 to about 1: the params' movement within 2% and D within
    1e-3 (measured: 1.0% and 8e-5; each write rounds m, v and s by up to 2^-8 relative, without
    bias), while float64 state ("float32" keeps float64 params' state in float64) is exact to 1e-10."""
    gen = torch.Generator().manual_seed(3)
    start = [torch.randn(40, 30, generator=gen).double(), torch.randn(300, generator=gen).double()]
    ours, ref, d, d_ref = quadratic_run(25, "bfloat16", **kw)
    assert d_ref > 0.5  # D grew by more than five orders of magnitude
    err = movement_error(ours, ref, start)
    assert 1e-4 < err < 2e-2  # (bfloat16 rounding shows, within its bound)
    assert abs(d - d_ref) <= 1e-3 * d_ref
    ours64, ref64, d64, _ = quadratic_run(25, "float32", **kw)
    assert movement_error(ours64, ref64, start) < 1e-10
    assert abs(d64 - d_ref) <= 1e-12 * d_ref


def test_bf16_state_writes_round_stochastically_without_bias() -> None:
    """A value between two bfloat16 neighbours, written 20000 times: the mean of the stored values
    is the value (within 4 standard errors), where round-to-nearest is off by a quarter spacing."""
    value = 1.0 + 0.25 * BF16_SPACING * 2  # a quarter of the way from 1 to the next bfloat16 above
    n = 20000
    t = torch.zeros(n, dtype=torch.bfloat16)
    torch.manual_seed(0)
    _formats.encode(t, "exp_avg", 0, n, torch.full((n,), value))
    stored = t.float()
    assert set(stored.unique().tolist()) == {1.0, 1.0 + 2 * BF16_SPACING}
    spacing = 2 * BF16_SPACING
    stderr = spacing / 2 / math.sqrt(n)
    assert abs(float(stored.double().mean()) - value) < 4 * stderr
    assert abs(float(torch.tensor(value).bfloat16().float()) - value) > 50 * stderr  # nearest: biased


@pytest.mark.filterwarnings("ignore:KProdigy. D of param groups")  # (D stays at d0 here: not the point)
def test_bf16_state_lets_v_decay() -> None:
    """After one large gradient and 300 tiny ones, v is the large one's contribution times
    0.999^300 (within 2%): each ``v <- 0.999 v`` moves v by less than bfloat16's spacing, so a
    rounding to nearest would keep v where it was (prodigyopt's bfloat16 state does)."""
    x = torch.zeros(4096, dtype=torch.bfloat16)
    x += 1
    opt = KProdigy([x], d0=1e-3)
    torch.manual_seed(0)
    x.grad = torch.ones_like(x)
    opt.step()
    v1 = opt.state[x]["exp_avg_sq"].double().mean()
    for _ in range(300):
        x.grad = torch.full_like(x, 1e-9)
        opt.step()
    assert opt.state[x]["exp_avg_sq"].dtype == torch.bfloat16
    ratio = float(opt.state[x]["exp_avg_sq"].double().mean() / v1)
    assert abs(ratio - 0.999**300) <= 0.02 * 0.999**300


def test_bf16_params_auto_trains_as_well_as_float32_state() -> None:
    """bfloat16 params: the default (bfloat16 state) ends within 5% (+ a small absolute slack) of
    float32 state's loss on a small regression, 3 seeds, and D agrees within 10%."""
    for seed in range(3):
        results = {}
        for precision in ("auto", "float32"):
            model = mlp(torch.bfloat16, seed=seed)
            opt = KProdigy(model.parameters(), state_precision=precision, d0=1e-4)
            torch.manual_seed(seed)
            losses = train(model, opt, 100, seed=seed + 1)
            results[precision] = (losses[-1], opt.param_groups[0]["d"], losses[0])
        (auto, d_auto, first), (fp32, d_fp32, _) = results["auto"], results["float32"]
        assert fp32 < 0.5 * first
        assert auto <= 1.05 * fp32 + 0.01 * first
        assert abs(d_auto - d_fp32) <= 0.1 * d_fp32


CONFIGS = [
    {},
    {"slice_p": 5},
    {"factored": True},
    {"d_steps": 6},
    {"independent_d": True},
    {"foreach": True},
    {"betas": (0.0, 0.999)},
    {"weight_decay": 0.01, "decouple": False},
    {"stochastic_rounding": True},
    {"capturable": True},
]


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: ",".join(kw) or "defaults")
@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
def test_every_path_with_compact_state_tracks_float32_state(kw: dict, precision: str) -> None:
    """Two param groups (so that independent_d has two D-groups) of bfloat16 params, one weight
    large enough for int8 blocks: compact state stays compact and ends close to float32 state."""
    results = {}
    for prec in (precision, "float32"):
        model = mlp(torch.bfloat16, width=320)
        groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}]
        opt = KProdigy(groups, state_precision=prec, d0=1e-3, **kw)
        torch.manual_seed(0)
        losses = train(model, opt, 12)
        results[prec] = (losses, float(opt.param_groups[0]["d"]))
        w = model[0].weight
        want = {"bfloat16": torch.bfloat16, "int8": torch.uint8, "float32": torch.float32}[prec]
        assert opt.state[w]["exp_avg_sq"].dtype == (torch.bfloat16 if kw.get("factored") and want != torch.float32 else want)
    (compact, d_c), (fp32, d_32) = results[precision], results["float32"]
    assert all(math.isfinite(v) for v in compact)
    assert compact[-1] < compact[0]
    assert abs(compact[-1] - fp32[-1]) <= 0.1 * fp32[0]
    assert abs(d_c - d_32) <= 0.15 * d_32


@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
def test_step_parameter_with_compact_state(precision: str) -> None:
    """The fused back pass (step_parameter then finalize_step) on compact state tracks step()."""
    results = {}
    for per_param in (False, True):
        model = mlp(torch.float32, width=320)
        opt = KProdigy(model.parameters(), state_precision=precision, d0=1e-3)
        X, y = data()
        torch.manual_seed(0)
        for _ in range(10):
            opt.zero_grad()
            ((model(X) - y) ** 2).mean().backward()
            if per_param:
                for p in model.parameters():
                    opt.step_parameter(p)
                opt.finalize_step()
            else:
                opt.step()
        results[per_param] = ([p.detach().clone() for p in model.parameters()], opt.param_groups[0]["d"])
        assert opt.state[model[0].weight]["exp_avg"].dtype == (torch.uint8 if precision == "int8" else torch.bfloat16)
    (a, da), (b, db) = results[False], results[True]
    assert abs(da - db) <= 0.02 * da
    moved = sum(float((p - q).norm()) for p, q in zip(a, [t.detach() for t in mlp(torch.float32, width=320).parameters()]))
    assert sum(float((p - q).norm()) for p, q in zip(a, b)) <= 0.05 * moved


def test_functional_step_with_bf16_state() -> None:
    """The functional (pure) step: state made compact by init_state, stepped without changing the
    inputs, close to float32 state."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(64, 70, generator=gen), torch.randn(70, generator=gen)]
    targets = [torch.randn(p.shape, generator=gen) for p in params]
    out = {}
    for precision in ("bfloat16", "float32"):
        hp = Hyperparams(state_precision=precision, d0=1e-4)
        state = init_state(params, hp)
        assert state.exp_avg_sq[0].dtype == (torch.bfloat16 if precision == "bfloat16" else torch.float32)
        xs = [p.clone() for p in params]
        torch.manual_seed(0)
        for _ in range(30):
            grads = [2 * (x - t) for x, t in zip(xs, targets)]
            before = copy.deepcopy(state)
            new_xs, new_state = step(xs, grads, state, hp)
            assert all(torch.equal(a, b) for a, b in zip(before.exp_avg_sq + before.s, state.exp_avg_sq + state.s))
            xs, state = new_xs, new_state
        out[precision] = (xs, float(state.d.d))
        assert state.exp_avg[0].dtype == (torch.bfloat16 if precision == "bfloat16" else torch.float32)
    (xb, db), (xf, df) = out["bfloat16"], out["float32"]
    assert abs(db - df) <= 0.03 * df
    moved = sum(float((x - p).norm()) for x, p in zip(xf, params))
    assert sum(float((a - b).norm()) for a, b in zip(xb, xf)) <= 0.03 * moved


# ---------------------------------------------------------------------------------------------
# checkpoints


@pytest.mark.parametrize("param", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("precision", ["auto", "bfloat16", "int8"])
def test_checkpoint_round_trip_gives_the_identical_next_steps(param: torch.dtype, precision: str) -> None:
    model = mlp(param, width=320)
    opt = KProdigy(model.parameters(), state_precision=precision, d0=1e-3)
    train(model, opt, 4)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    torch.manual_seed(7)  # stochastic rounding draws from the global generator
    train(model, opt, 3)
    expected = [p.detach().clone() for p in model.parameters()]
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2 = mlp(param, seed=9, width=320)
    model2.load_state_dict(saved["model"])
    opt2 = KProdigy(model2.parameters(), state_precision=precision, d0=1e-3)
    opt2.load_state_dict(saved["opt"])
    assert dtypes(opt2, model2[0].weight) == dtypes(opt, model[0].weight)
    torch.manual_seed(7)
    train(model2, opt2, 3)
    assert all(torch.equal(a, b) for a, b in zip(model2.parameters(), expected))


def test_load_across_precisions_converts_the_state() -> None:
    """float32 state of bfloat16 params loads into a bfloat16-state optimizer (each value rounded
    to a bfloat16 neighbour) and back (exactly: bfloat16 is a subset of float32); int8 state loads
    into a float32-state optimizer as its decoded values. The next steps train on."""
    model = mlp(torch.bfloat16, width=320)
    opt = KProdigy(model.parameters(), state_precision="float32", d0=1e-3)
    train(model, opt, 5)
    sd32 = copy.deepcopy(opt.state_dict())
    w = model[0].weight
    opt_bf = KProdigy(model.parameters(), d0=1e-3)  # auto: bfloat16 state for bfloat16 params
    opt_bf.load_state_dict(copy.deepcopy(sd32))
    for key in ("exp_avg", "exp_avg_sq", "s"):
        src, got = opt.state[w][key], opt_bf.state[w][key]
        assert got.dtype == torch.bfloat16
        lo, hi = src.bfloat16().float(), src.bfloat16().float()  # neighbours of each value
        lo = torch.where(lo > src, torch.nextafter(lo.bfloat16(), torch.tensor(-math.inf).bfloat16()).float(), lo)
        hi = torch.where(hi < src, torch.nextafter(hi.bfloat16(), torch.tensor(math.inf).bfloat16()).float(), hi)
        assert bool(((got.float() >= lo) & (got.float() <= hi)).all()), key
    sd_bf = copy.deepcopy(opt_bf.state_dict())
    opt_back = KProdigy(model.parameters(), state_precision="float32", d0=1e-3)
    opt_back.load_state_dict(sd_bf)
    for key in ("exp_avg", "exp_avg_sq", "s"):
        assert opt_back.state[w][key].dtype == torch.float32
        assert torch.equal(opt_back.state[w][key], opt_bf.state[w][key].float())
    opt_int8 = KProdigy(model.parameters(), state_precision="int8", d0=1e-3)
    opt_int8.load_state_dict(copy.deepcopy(sd32))
    assert opt_int8.state[w]["exp_avg"].dtype == torch.uint8
    opt_f = KProdigy(model.parameters(), state_precision="float32", d0=1e-3)
    opt_f.load_state_dict(copy.deepcopy(opt_int8.state_dict()))
    m = opt_f.state[w]["exp_avg"]
    assert m.dtype == torch.float32 and m.shape == w.shape
    ref = opt.state[w]["exp_avg"]
    assert float((m - ref).norm()) <= 0.1 * float(ref.norm())
    assert all(math.isfinite(v) for v in train(model, opt_f, 3))


@pytest.mark.parametrize("param, precision", [(torch.bfloat16, "auto"), (torch.float32, "int8"), (torch.float32, "bfloat16")])
def test_prodigyopt_state_dict_loads(param: torch.dtype, precision: str) -> None:
    theirs, ours = mlp(param, width=320), mlp(param, width=320)
    ref = prodigyopt.Prodigy(theirs.parameters(), d0=1e-3)
    train(theirs, ref, 4)
    ours.load_state_dict(theirs.state_dict())
    opt = KProdigy(ours.parameters(), state_precision=precision, d0=1e-3)
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))
    assert opt.param_groups[0]["d"] == ref.param_groups[0]["d"]
    w = ours[0].weight
    want = _formats.storage_dtype(param, precision, "exp_avg", w.numel())
    assert opt.state[w]["exp_avg"].dtype == want
    if want == param:  # prodigyopt keeps the param dtype: loaded as it is
        assert torch.equal(opt.state[w]["exp_avg"], ref.state[theirs[0].weight]["exp_avg"])
    losses = train(ours, opt, 5)
    assert all(math.isfinite(v) for v in losses)


# ---------------------------------------------------------------------------------------------
# validation and the skip


@pytest.mark.parametrize("bad", ["fp8", "Float32", None, 16, "int4"])
def test_bad_state_precision_raises_naming_it_and_changes_nothing(bad: object) -> None:
    model = mlp(torch.float32)
    with pytest.raises(ValueError, match="state_precision"):
        KProdigy(model.parameters(), state_precision=bad)
    opt = KProdigy(model.parameters(), state_precision="bfloat16")
    train(model, opt, 2)
    before = (copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in model.parameters()])
    opt.param_groups[0]["state_precision"] = bad  # as a scheduler might set it
    opt.zero_grad()
    model(data()[0]).square().mean().backward()
    with pytest.raises(ValueError, match="state_precision"):
        opt.step()
    opt.param_groups[0]["state_precision"] = "bfloat16"
    after = (opt.state_dict(), [p.detach() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(before[1], after[1]))
    for pid, st in before[0]["state"].items():
        for key, t in st.items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(after[0]["state"][pid][key])), key
    with pytest.raises(ValueError, match="state_precision"):
        Hyperparams(state_precision=bad)  # type: ignore[arg-type]


SKIP_CASES = [(p, kw) for p in ("bfloat16", "int8") for kw in ({}, {"slice_p": 3}, {"foreach": True})]


@pytest.mark.parametrize("precision, kw", [*SKIP_CASES, ("bfloat16", {"capturable": True})], ids=str)
def test_nan_gradient_skips_the_step_exactly_with_compact_state(precision: str, kw: dict) -> None:
    """With D on the host nothing is written; with ``capturable`` (D on the device) the skip is
    folded into the step's coefficients and bfloat16 state is re-encoded unchanged (a bfloat16
    value rounds to itself). int8 blocks re-encoded may move their largest entry down a level
    (probability 1e-4 per block, ``Int8Codec.encode``): not asserted exact there."""
    model = mlp(torch.bfloat16, width=320)
    opt = KProdigy(model.parameters(), state_precision=precision, d0=1e-3, **kw)
    train(model, opt, 3)
    before = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    model(data(dtype=torch.bfloat16)[0]).float().square().mean().backward()
    model[2].bias.grad[0] = math.nan
    if kw.get("capturable"):
        opt.step()  # (no warning without a host read)
    else:
        with pytest.warns(UserWarning, match="skipped"):
            opt.step()
    assert int(opt.param_groups[0]["skipped_steps"]) == 1
    assert all(torch.equal(a, b) for a, b in zip(before[1], model.parameters()))
    after = opt.state_dict()
    for pid, st in before[0]["state"].items():
        for key, t in st.items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(after["state"][pid][key])), key
    assert all(math.isfinite(v) for v in train(model, opt, 2))


# ---------------------------------------------------------------------------------------------
# int8 blocks


def int8_roundtrip(key: str, x: torch.Tensor) -> torch.Tensor:
    t = torch.zeros(_formats.int8_nbytes(x.numel()), dtype=torch.uint8)
    _formats.encode(t, key, 0, x.numel(), x)
    return _formats.decode(t, key, 0, x.numel())


def test_int8_m_codes_stay_between_neighbouring_levels() -> None:
    """m (signed, 8 log levels per octave, 127 per sign): each decoded value is within one level
    spacing of the value (2^(1/8) - 1 = 9.05% relative), or, below the lowest level (2^-15.75 of
    the block's largest magnitude), zero or that level; signs kept; a block's largest magnitude
    is stored to float32 rounding (its scale)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64 * _formats.BLOCK, generator=gen) * torch.exp(4 * torch.randn(64 * _formats.BLOCK, generator=gen))
    torch.manual_seed(0)
    dec = int8_roundtrip("exp_avg", x)
    scale = x.abs().view(-1, _formats.BLOCK).amax(dim=1).repeat_interleave(_formats.BLOCK)
    lowest = scale * 2.0 ** (-126 / 8)
    bound = torch.maximum((2 ** (1 / 8) - 1) * x.abs(), lowest) * (1 + 1e-5)
    assert bool(((dec - x).abs() <= bound).all())
    assert bool((torch.sign(dec) * torch.sign(x) >= 0).all())
    top = x.abs().view(-1, _formats.BLOCK).argmax(dim=1) + torch.arange(64) * _formats.BLOCK
    assert torch.allclose(dec[top].abs(), x[top].abs(), rtol=1e-5) or (dec[top] != x[top]).sum() <= 1  # (p = 1e-4 each)
    assert torch.equal(int8_roundtrip("exp_avg", torch.zeros(300)), torch.zeros(300))


def test_int8_v_codes_keep_sqrt_v_within_a_level_and_never_underestimate_tiny_v() -> None:
    """v (sqrt(v) on 256 log levels, 16 per octave): sqrt of each decoded value within 2^(1/16) - 1
    = 4.43% of sqrt(v); values below the lowest level (2^-15.94 of the block's largest sqrt(v))
    read as that level: v over-estimated, never zero (Adam's denominator stays safe)."""
    gen = torch.Generator().manual_seed(1)
    v = torch.exp(6 * torch.randn(64 * _formats.BLOCK, generator=gen))
    torch.manual_seed(0)
    dec = int8_roundtrip("exp_avg_sq", v)
    root = v.sqrt().view(-1, _formats.BLOCK).amax(dim=1).repeat_interleave(_formats.BLOCK)
    lowest = root * 2.0 ** (-255 / 16)
    small = v.sqrt() < lowest
    assert bool(small.any()) and bool((~small).any())
    err = (dec.sqrt() - v.sqrt()).abs()
    assert bool((err[~small] <= (2 ** (1 / 16) - 1) * v.sqrt()[~small] * (1 + 1e-5)).all())
    assert bool((dec[small] >= v[small]).all()) and bool((dec > 0).all())


@pytest.mark.parametrize("key, value", [("exp_avg", -0.3), ("exp_avg_sq", 0.05)])
def test_int8_codes_round_stochastically_without_bias(key: str, value: float) -> None:
    """Blocks of [1, value, value, ...]: the mean of the decoded values is the value within 4
    standard errors (the spacing there over 2 sqrt(n)), where rounding to nearest is off by more."""
    blocks = 200
    x = torch.full((blocks, _formats.BLOCK), value)
    x[:, 0] = 1.0
    torch.manual_seed(0)
    dec = int8_roundtrip(key, x.reshape(-1)).view(blocks, _formats.BLOCK)[:, 1:]
    vals = dec.unique()
    assert len(vals) == 2  # the two neighbouring levels
    spacing = float(vals[1] - vals[0])
    n = dec.numel()
    assert abs(float(dec.double().mean()) - value) < 4 * spacing / 2 / math.sqrt(n)
    assert min(abs(float(v) - value) for v in vals) > 8 * spacing / 2 / math.sqrt(n)  # nearest: biased


@pytest.mark.parametrize("param", [torch.float32, torch.bfloat16])
def test_int8_state_trains_as_well_as_float32_state(param: torch.dtype) -> None:
    """int8 state (most elements in int8 blocks) on a small regression, 3 seeds, 100 steps: final
    loss within 10% (+ 1% of the initial loss) of float32 state's, and D within 10%."""
    for seed in range(3):
        results = {}
        for precision in ("int8", "float32"):
            model = mlp(param, seed=seed, width=320)
            opt = KProdigy(model.parameters(), state_precision=precision, d0=1e-4)
            torch.manual_seed(seed)
            losses = train(model, opt, 100, seed=seed + 1)
            results[precision] = (losses[-1], opt.param_groups[0]["d"], losses[0])
        assert opt.state[model[0].weight]["exp_avg"].dtype == torch.float32
        (q, d_q, first), (f, d_f, _) = results["int8"], results["float32"]
        assert f < 0.5 * first
        assert q <= 1.10 * f + 0.01 * first
        assert abs(d_q - d_f) <= 0.1 * d_f


def test_functional_int8_state_and_betas_raised_from_zero() -> None:
    """The functional step_ on int8 state: a first moment created when betas[0] rises from 0 takes
    the int8 format (not a param-shaped uint8 tensor) and the run trains on."""
    from kprodigy.functional import step_

    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(80, 64, generator=gen), torch.randn(64, generator=gen)]
    target = [torch.randn(p.shape, generator=gen) for p in params]
    hp = Hyperparams(betas=(0.0, 0.999), state_precision="int8", d0=1e-3)
    state = init_state(params, hp)
    assert state.exp_avg is None and state.exp_avg_sq[0].dtype == torch.uint8
    assert state.exp_avg_sq[1].dtype == torch.bfloat16  # 64 elements: under _formats.INT8_MIN
    loss0 = sum(float((x - t).square().sum()) for x, t in zip(params, target))
    for k in range(20):
        if k == 10:
            hp = Hyperparams(betas=(0.9, 0.999), state_precision="int8", d0=1e-3)
        state = step_(params, [2 * (x - t) for x, t in zip(params, target)], state, hp)
    assert state.exp_avg is not None
    assert state.exp_avg[0].dtype == torch.uint8 and state.exp_avg[0].shape == (_formats.int8_nbytes(80 * 64),)
    assert sum(float((x - t).square().sum()) for x, t in zip(params, target)) < 0.5 * loss0


LAYOUT_CASES = {
    "transposed (not contiguous)": lambda: torch.randn(96, 80).t(),
    "channels_last conv weight": lambda: torch.randn(16, 8, 5, 5).contiguous(memory_format=torch.channels_last),
    "zero init (scalar p0)": lambda: torch.zeros(70, 90),
    "0-dim": lambda: torch.tensor(0.5),
    "odd size": lambda: torch.randn(4099),
}


@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"slice_p": 3, "d_update_freq": 2},
        {"maximize": True, "weight_decay": 0.01},
        {"use_bias_correction": True, "safeguard_warmup": True, "growth_rate": 1.5},
        {"betas": (0.0, 0.99), "beta3": 0.9},
    ],
    ids=["defaults", "slice_p+freq", "maximize+wd", "bc+safeguard+growth", "b1=0"],
)
def test_layouts_and_settings_with_compact_state_track_float32_state(precision: str, kw: dict) -> None:
    """Params of every layout the compact kernels handle apart (not contiguous: stepped whole;
    channels_last; a scalar p0; 0-dim; a size that ends in a partial int8 block) in one group,
    under several settings, 8 steps while D grows: each param's movement within 8% of float32
    state's (its norm; measured up to ~2% per step of int8 rounding, which the oscillation of a
    converged quadratic amplifies later), D within 5%; params keep their layout."""
    out = {}
    for prec in (precision, "float32"):
        torch.manual_seed(0)
        params = [make().requires_grad_() for make in LAYOUT_CASES.values()]
        start = [p.detach().clone() for p in params]
        targets = [torch.randn(p.shape) for p in params]
        opt = KProdigy(params, state_precision=prec, d0=1e-3, **kw)
        for _ in range(8):
            for p, t in zip(params, targets):
                p.grad = (p.detach() - t) * 2
            opt.step()
        out[prec] = ([p.detach() - s for p, s in zip(params, start)], float(opt.param_groups[0]["d"]))
        assert params[0].stride() == start[0].stride() and params[1].is_contiguous(memory_format=torch.channels_last)
    (moved, d), (moved32, d32) = out[precision], out["float32"]
    assert abs(d - d32) <= 0.05 * d32
    for name, a, b in zip(LAYOUT_CASES, moved, moved32):
        assert float(b.norm()) > 0, name
        assert float((a - b).norm()) <= 0.08 * float(b.norm()), name


@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
def test_distributed_d_with_compact_state_is_the_one_process_d(precision: str) -> None:
    """State is per rank, D is global: two "ranks" holding one tensor each, whose statistics are
    summed by ``reduce_stats`` (the all-reduce's seam), reach the D of one process holding both."""
    from kprodigy.functional import _engine
    from kprodigy.functional._state import Segment

    hp = Hyperparams(d0=1e-3, state_precision=precision)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(5000, generator=gen), torch.randn(3000, generator=gen)]
    st = init_state(xs, hp)
    assert st.exp_avg_sq[0].dtype == (torch.uint8 if precision == "int8" else torch.bfloat16)
    moves = [0.1 * torch.randn(x.shape, generator=gen) for x in xs]
    xs = [x + dx for x, dx in zip(xs, moves)]  # moved away from p0, and the gradients point back: D grows
    gs = [-dx + 0.05 * torch.randn(x.shape, generator=gen) for x, dx in zip(xs, moves)]

    def seg(idx: list[int]) -> Segment:
        pick = lambda ts: [ts[i] for i in idx]  # noqa: E731
        return Segment(pick(xs), pick(gs), pick(st.exp_avg), pick(st.exp_avg_sq), pick(st.s), pick(st.p0), hp)

    def run(s: Segment, hook):  # type: ignore[no-untyped-def]
        plan = _engine.build([[s]], on_host=False, pure=True)
        (_, (new,)) = _engine.step(plan, [[list(s.grads)]], [st.d], reduce_stats=hook)
        return new

    local: dict[int, torch.Tensor] = {}
    for rank in (0, 1):
        run(seg([rank]), lambda stats, r=rank: local.setdefault(r, stats.clone()))
    total = local[0] + local[1]
    d_ranks = [float(run(seg([rank]), lambda stats: total.to(stats.dtype)).d) for rank in (0, 1)]
    d_one = float(run(seg([0, 1]), None).d)
    assert d_one > 1e-3  # D moved
    assert d_ranks[0] == d_ranks[1]
    assert d_ranks[0] == pytest.approx(d_one, rel=1e-6)


def test_pure_functional_step_keeps_int8_beside_bfloat16_moments() -> None:
    """The pure step copies small params' state into one buffer per key: int8 blocks (a param of
    4096+ elements) beside bfloat16 moments (a smaller one) must not be concatenated (torch.cat
    would promote the int8 bytes to bfloat16 numbers)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(5000, generator=gen), torch.randn(3000, generator=gen)]
    hp = Hyperparams(state_precision="int8", d0=1e-3)
    state = init_state(params, hp)
    for _ in range(3):
        params, state = step(params, [torch.randn(5000, generator=gen), torch.randn(3000, generator=gen)], state, hp)
    assert [t.dtype for t in state.exp_avg_sq] == [torch.uint8, torch.bfloat16]
    assert state.exp_avg_sq[0].shape == (_formats.int8_nbytes(5000),)
    assert all(bool(torch.isfinite(p).all()) for p in params)


def test_torch_func_transforms_keep_float32_state_or_say_why_not() -> None:
    """vmap ensembles of bfloat16 params at "auto" keep float32 state (the compact kernels work in
    place on chunks, which torch.func cannot batch); an explicit compact precision there, or
    compact state met inside a transform, raises a ValueError naming state_precision."""
    from torch.func import grad, vmap

    from kprodigy.functional import init_ensemble_state

    xs = {"w": torch.randn(3, 70, 80).bfloat16(), "b": torch.randn(3, 8).bfloat16()}
    gs = {k: torch.randn_like(v) for k, v in xs.items()}
    hp = Hyperparams(d0=1e-3)
    st = init_ensemble_state(xs, hp)
    assert st.exp_avg["w"].dtype == torch.float32
    new_x, new_st = vmap(lambda x, g, s: step(x, g, s, hp))(xs, gs, st)
    assert new_x["w"].dtype == torch.bfloat16 and not torch.equal(new_x["w"], xs["w"])
    for precision in ("bfloat16", "int8"):
        with pytest.raises(ValueError, match="state_precision"):
            init_ensemble_state(xs, Hyperparams(state_precision=precision))
    x = torch.randn(70, 80).bfloat16()
    state = init_state([x], hp)  # bfloat16 state: "auto" outside a transform
    with pytest.raises(ValueError, match="state_precision"):
        grad(lambda p: step([p], [torch.ones_like(p)], state, hp)[0][0].float().sum())(x)


def test_compiled_functional_step_with_bf16_state() -> None:
    """torch.compile of the functional step with bfloat16 params at "auto" (bfloat16 state) runs
    (graph breaks around the compact kernels) and tracks the eager step; with fullgraph=True it
    raises naming state_precision (the compact kernels cannot be one graph)."""
    gen = torch.Generator().manual_seed(0)
    xs0 = [torch.randn(70, 80, generator=gen).bfloat16(), torch.randn(5000, generator=gen).bfloat16()]
    targets = [torch.randn(x.shape, generator=gen).bfloat16() for x in xs0]
    hp = Hyperparams(d0=1e-2)
    out = {}
    for mode in ("eager", "compiled"):
        run = step if mode == "eager" else torch.compile(lambda x, g, s: step(x, g, s, hp))
        xs, state = [x.clone() for x in xs0], init_state(xs0, hp)
        assert state.exp_avg[0].dtype == torch.bfloat16
        for _ in range(6):
            grads = [(x.float() - t.float()).bfloat16() for x, t in zip(xs, targets)]
            xs, state = step(xs, grads, state, hp) if mode == "eager" else run(xs, grads, state)
        out[mode] = ([x.float() - x0.float() for x, x0 in zip(xs, xs0)], float(state.d.d))
        assert state.exp_avg[0].dtype == torch.bfloat16
    (moved, d), (moved_c, d_c) = out["eager"], out["compiled"]
    assert d > 1e-2 and abs(d_c - d) <= 0.05 * d
    for a, b in zip(moved_c, moved):
        assert float((a - b).norm()) <= 0.05 * float(b.norm())
    full = torch.compile(lambda x, g, s: step(x, g, s, hp), fullgraph=True)
    with pytest.raises(Exception, match="state_precision"):
        full([x.clone() for x in xs0], [torch.ones_like(x) for x in xs0], init_state(xs0, hp))


def test_one_rounding_draw_serves_m_v_and_s_of_a_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """bfloat16 params at the default: each chunk's m, v and s are rounded with ONE draw of random
    bits (``_compact._shared_noise``; ``random_`` was a third of the step), and the result still
    trains: D grows and the params move towards the target."""
    from kprodigy.functional import _robust

    draws: list[int] = []
    original = _robust.rounding_noise
    monkeypatch.setattr(_robust, "rounding_noise", lambda n, device, out=None: draws.append(n) or original(n, device, out))
    p = torch.nn.Parameter(torch.full((300,), 2.0, dtype=torch.bfloat16))
    opt = KProdigy([p], d0=1e-2)  # (steps above bfloat16's spacing at 2.0: the params move)
    for _ in range(30):
        p.grad = (p.detach().float() - 1.0).bfloat16()
        opt.step()
    assert draws == [300] * 30  # one draw per step for the one chunk (3 without sharing)
    assert opt.param_groups[0]["d"] > 2 * opt.param_groups[0]["d0"]
    assert (p.detach().float() - 1.0).abs().max() < 0.9


# ---------------------------------------------------------------------------------------------
# the compact kernels' fast paths (benchmarks/NOTES.md, "bfloat16 params at the defaults")

FAST_SHAPES = [(70, 80), (300,), (5,), (300, 250), (64, 33), (40, 10)]  # small ones in buckets; 2 chunks
FAST_CONFIGS = [
    {},
    {"betas": (0.0, 0.999)},
    {"weight_decay": 0.1},
    {"slice_p": 3},
    {"stochastic_rounding": True},
    {"use_bias_correction": True, "safeguard_warmup": True},
    {"weight_decay": 0.1, "decouple": False, "maximize": True},
]


def compact_run(kw: dict, precision: str = "auto", dtype: torch.dtype = torch.bfloat16) -> tuple[list, list, float]:
    """12 steps of KProdigy (d0 = 1e-3) on ``FAST_SHAPES`` pulled towards targets, the last tensor by
    gradients 1e-6 times smaller (its denominator is the eps floor d * eps), on fixed seeds: the
    params, their state tensors and D."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(dtype) for s in FAST_SHAPES]
    targets = [torch.randn(s, generator=gen) * 2 for s in FAST_SHAPES]
    scales = [1.0] * (len(FAST_SHAPES) - 1) + [1e-6]
    opt = KProdigy(params, d0=1e-3, state_precision=precision, **kw)
    torch.manual_seed(1)
    for _ in range(12):
        for p, t, c in zip(params, targets, scales):
            p.grad = ((p.float() - t) * c).to(dtype)
        opt.step()
    keys = ("exp_avg", "exp_avg_sq", "s")
    state = [opt.state[p][k] for p in params for k in keys if k in opt.state[p]]
    return params, state, opt.param_groups[0]["d"]


def differing(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
    """(fraction of elements not equal, largest ||a_i - b_i|| / ||b_i||) of two lists of tensors."""
    unequal = sum(int((x != y).sum()) for x, y in zip(a, b)) / sum(x.numel() for x in a)
    rel = max(float((x.double() - y.double()).norm() / y.double().norm().clamp(min=1e-30)) for x, y in zip(a, b))
    return unequal, rel


@pytest.mark.filterwarnings("ignore:KProdigy. D of param groups")
@pytest.mark.parametrize("kw", FAST_CONFIGS, ids=lambda kw: ",".join(kw) or "defaults")
def test_fused_adam_chunks_match_the_specification_kernels(kw: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """With D on the host the compact backend steps each float chunk's m, v, x by one call of
    torch._fused_adamw_ (``_compact._adam_kwargs``, as ``_adamw`` maps Prodigy onto it). The same
    run through ``_single``'s kernels (the specification: ``_adam_kwargs`` None), on the same seeds
    (the same rounding draws), ends equal but for the stochastic roundings that an ulp of float32 in
    m tipped (the kernel's EMA is a lerp): under 1% of the bfloat16 elements differ, by under 2e-3
    of a tensor's norm (measured: at most 0.18% and 3e-4), D within 1e-5 (measured 6e-7)."""
    from kprodigy.functional import _compact

    fast = compact_run(kw)
    monkeypatch.setattr(_compact, "_adam_kwargs", lambda *args: None)
    spec = compact_run(kw)
    assert abs(fast[2] - spec[2]) <= 1e-5 * spec[2]
    assert spec[2] > 0.1 or "safeguard_warmup" in kw  # D grew 100x (safeguard_warmup holds it at d0 here)
    for ours, ref in zip(fast[:2], spec[:2]):
        unequal, rel = differing(ours, ref)
        assert unequal < 0.01 and rel < 2e-3


@pytest.mark.parametrize("precision, dtype", [("int8", torch.bfloat16), ("bfloat16", torch.float32)])
def test_fused_adam_chunks_match_the_specification_kernels_beside_int8_and_float32_params(
    precision: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above for int8 m and v (decoded and encoded one by one) and for float32 params with
    bfloat16 state (x stepped in place): params and state within 2e-3 of a tensor's norm (float32
    params differ by float32 roundings everywhere: measured 2e-5), D within 1e-5."""
    from kprodigy.functional import _compact

    fast = compact_run({}, precision, dtype)
    monkeypatch.setattr(_compact, "_adam_kwargs", lambda *args: None)
    spec = compact_run({}, precision, dtype)
    assert abs(fast[2] - spec[2]) <= 1e-5 * spec[2]
    for ours, ref in zip(fast[:2], spec[:2]):
        floats = [(a.float(), b.float()) for a, b in zip(ours, ref) if a.dtype != torch.uint8]
        assert differing(*zip(*floats))[1] < 2e-3  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore:KProdigy. D of param groups")
@pytest.mark.parametrize("kw", [{}, {"slice_p": 3}, {"betas": (0.0, 0.999)}, {"stochastic_rounding": True}], ids=str)
def test_rows_round_as_each_key_alone(kw: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk's bfloat16 m, v, s are loaded as rows of one float32 scratch and rounded by one pair
    of ops (``_compact._load_chunk``, ``_store_chunk``): bit for bit what encoding each one alone
    (``_formats.encode``) with the same shared draw gives (``_compact._row`` False)."""
    from kprodigy.functional import _compact

    rows = compact_run(kw)
    monkeypatch.setattr(_compact, "_row", lambda t: False)
    alone = compact_run(kw)
    assert rows[2] == alone[2]
    for a, b in zip(rows[:2], alone[:2]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_rounding_noise_and_rows_rounding() -> None:
    """``_robust.rounding_noise`` (per element under ``FEW_BITS``, else 16-bit lanes of 64-bit
    draws), each way: every bit set half of the time
    (within 5 standard errors), values in [0, 2^16); ``round_bits_`` of a (3, n) block with one
    draw equals ``stochastic_round`` of each row with it, and keeps each row's mean (a value a
    quarter of the way between two bfloat16 neighbours, within 4 standard errors)."""
    from kprodigy.functional import _robust

    torch.manual_seed(0)
    few = [1, 3] + [_robust.FEW_BITS - 1] * 16  # (one draw per element, ``FEW_BITS``)
    for sizes in (few, [65536, 70001]):
        noise = torch.cat([_robust.rounding_noise(n, torch.device("cpu")) for n in sizes])
        assert noise.dtype == torch.int32 and int(noise.min()) >= 0 and int(noise.max()) < 1 << 16
        for k in range(16):
            assert abs(float(((noise >> k) & 1).double().mean()) - 0.5) < 5 * 0.5 / math.sqrt(noise.numel())
    rows = torch.randn(3, 1000)
    draw = _robust.rounding_noise(1000, torch.device("cpu"))
    expected = torch.stack([_robust.stochastic_round(r, torch.bfloat16, draw) for r in rows])
    assert torch.equal(_robust.round_bits_(rows.clone(), draw).bfloat16(), expected)
    n, value, spacing = 20000, 1.0 + 0.5 * BF16_SPACING, 2 * BF16_SPACING
    rounded = _robust.round_bits_(torch.full((3, n), value), _robust.rounding_noise(n, torch.device("cpu")))
    assert float((rounded.double().mean(dim=1) - value).abs().max()) < 4 * spacing / 2 / math.sqrt(n)


def test_16bit_params_with_float32_state_take_the_compact_fused_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """bfloat16 params with state_precision="float32" at automatic flags step on the compact
    backend's fused chunks (float32 state decodes to views of itself): float32 state kept, and the
    run tracks the per-tensor kernels' (round to nearest: the params differ where a float32 ulp of
    m tips a bfloat16 rounding)."""
    from kprodigy.functional import _compact

    calls = [0]
    original = _compact.update
    monkeypatch.setattr(_compact, "update", lambda *a: calls.__setitem__(0, calls[0] + 1) or original(*a))
    gen = torch.Generator().manual_seed(0)
    shapes = [(300, 256), (64, 32), (32,), (1, 7)]  # chunked and packed
    init = [torch.randn(*s, generator=gen) for s in shapes]
    targets = [torch.randn(*s, generator=gen) for s in shapes]

    def run(**flags: Any) -> tuple[list[torch.nn.Parameter], KProdigy]:
        ps = [torch.nn.Parameter(x.bfloat16()) for x in init]
        opt = KProdigy(ps, state_precision="float32", stochastic_rounding=False, d0=1e-3, **flags)
        for _ in range(15):
            for p, t in zip(ps, targets):
                p.grad = (p.detach().float() - t).bfloat16()
            opt.step()
        return ps, opt

    ours, opt = run()
    assert calls[0] == 15
    ref, ref_opt = run(foreach=False, fused=False)
    assert calls[0] == 15  # (the per-tensor kernels where the flags ask for them)
    d, d_ref = opt.param_groups[0]["d"], ref_opt.param_groups[0]["d"]
    assert d > 30 * 1e-3 and abs(d - d_ref) <= 1e-3 * d_ref
    for p, q, x in zip(ours, ref, init):
        assert opt.state[p]["exp_avg_sq"].dtype == torch.float32
        moved = (q.detach().float() - x).norm()
        assert float((p.detach().float() - q.detach().float()).norm()) <= 0.02 * float(moved)
