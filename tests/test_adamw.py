"""The native path (``functional/_adamw.py``): taken at the defaults, equal to the per-tensor
reference kernels, large (sliced) tensors included, with the NaN skip exact and p.grad unread-only."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

from kprodigy import KProdigy
from kprodigy.functional import _adamw, _engine, _single

SHAPES = [(300, 256), (64, 32), (32,), (1, 7)]  # one tensor above _adamw.SMALL (a slice), small ones (packed)


def _params(dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(*s, generator=gen, dtype=dtype)) for s in SHAPES]
    ps[3].data.zero_()  # an all-zero param: compact p0
    return ps


def _grads(ps: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + k)
    # a quadratic pull towards 0.5 plus noise: D grows, then settles
    return [(p.detach() - 0.5) * 0.1 + 0.01 * torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in ps]


def _count_updates(mp: pytest.MonkeyPatch) -> list[int]:
    """Count the calls of ``_adamw.update`` (one per param group and native step) while ``mp``
    is active: ``[count]``."""
    calls = [0]
    original = _adamw.update

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls[0] += 1
        return original(*args, **kwargs)

    mp.setattr(_adamw, "update", counted)
    return calls


def _run(dtype: torch.dtype, flags: dict, groups: list[dict], steps: int, nan_at: int | None, count: list[int]):
    ps = _params(dtype)
    pgs = [dict(params=ps[:2], **groups[0]), dict(params=ps[2:], **groups[1])]
    opt = KProdigy(pgs, **flags)
    history = []
    for k in range(steps):
        for p, g in zip(ps, _grads(ps, k)):
            p.grad = g
        if k == nan_at:
            ps[0].grad[3, 5] = float("nan")
        before = [p.grad.clone() for p in ps]
        opt.step()
        assert all(torch.equal(p.grad, b) or torch.isnan(b).any() for p, b in zip(ps, before))
        history.append(opt.param_groups[0]["d"])
    return ps, opt, history


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "groups",
    [[{}, {}], [{"weight_decay": 0.1}, {"lr": 0.25}], [{"use_bias_correction": True}, {"use_bias_correction": True}]],
    ids=["defaults", "wd_lr_multiplier", "bias_correction"],
)
def test_native_equals_per_tensor(dtype: torch.dtype, groups: list[dict], monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_updates(monkeypatch)
    steps, nan_at = 30, 11
    ours, opt, d_ours = _run(dtype, {}, groups, steps, nan_at, calls)
    ref, ropt, d_ref = _run(dtype, {"foreach": False, "fused": False}, groups, steps, nan_at, calls)
    assert calls[0] == 2 * (steps - 1)  # native for every step of the default run (2 segments), none skipped
    assert d_ours[-1] > 100 * 1e-6  # D grew
    assert opt.param_groups[0]["skipped_steps"] == ropt.param_groups[0]["skipped_steps"] == 1
    assert opt.param_groups[0]["k"] == ropt.param_groups[0]["k"] == steps - 1
    # float32: both runs round differently (summation order, host float64 scalars) and a D that
    # grows 1e5x amplifies it; moments agreed to ~1e-4 relative when this was written
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for a, b in zip(d_ours, d_ref):
        assert abs(a - b) <= tol * abs(b)
    for p, q, p_init in zip(ours, ref, _params(dtype)):
        delta, ref_delta = p.detach() - p_init.detach(), q.detach() - p_init.detach()
        assert float((delta - ref_delta).norm() / ref_delta.norm()) <= 10 * tol
    for p, q in zip(ours, ref):
        for key in ("exp_avg", "exp_avg_sq", "s"):
            a, b = opt.state[p][key], ropt.state[q][key]
            assert float((a - b).norm() / b.norm()) <= 100 * tol, key


def test_not_taken_where_ineligible(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("native path taken")

    monkeypatch.setattr(_adamw, "update", fail)
    for kwargs in (
        {"foreach": True},
        {"fused": False},
        {"capturable": True},
        {"stochastic_rounding": True},
    ):
        p = torch.nn.Parameter(torch.randn(8, 4))
        opt = KProdigy([p], **kwargs)
        for _ in range(3):
            p.grad = torch.randn(8, 4)
            opt.step()
    p = torch.nn.Parameter(torch.randn(8, 4, dtype=torch.bfloat16))
    opt = KProdigy([p])
    p.grad = torch.randn(8, 4, dtype=torch.bfloat16)
    opt.step()


def test_native_takes_beta3_from_the_d_groups_first_group_even_when_frozen() -> None:
    """beta3=None resolves from the D-group's first group (DESIGN.md, and the other kernels), also
    when that group is frozen (lr=0) and a later group has other betas."""
    groups = [{"lr": 0.0, "betas": (0.9, 0.999)}, {"betas": (0.9, 0.9)}]  # sqrt(0.999) vs sqrt(0.9)
    ours, opt, d_ours = _run(torch.float64, {}, groups, 20, None, [0])
    ref, ropt, d_ref = _run(torch.float64, {"foreach": False, "fused": False}, groups, 20, None, [0])
    assert d_ours[-1] > 100 * 1e-6
    for a, b in zip(d_ours, d_ref):
        assert abs(a - b) <= 1e-12 * abs(b)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14)


def test_native_buckets_equal_per_tensor() -> None:
    """A group over the CPU bucket sizes: a large tensor in several slices (the last one short),
    small tensors in several packed buckets, a compact (all-zero) p0 among them, and params
    without gradients between for the first steps (then the plan is laid out again); float64, D grows, a NaN step is skipped exactly, p.grad unread-only."""
    shapes = [(700, 400)] + [(64, 64)] * 80 + [(5,), (1, 7), (3, 3)]
    assert 700 * 400 > 2 * _adamw.SLICE and 80 * 64 * 64 > _adamw.PACK_MAX

    def run(flags: dict) -> tuple[list[torch.nn.Parameter], KProdigy, list[float]]:
        gen = torch.Generator().manual_seed(3)
        ps = [torch.nn.Parameter(torch.randn(*s, generator=gen, dtype=torch.float64)) for s in shapes]
        ps[-2].data.zero_()  # compact p0
        opt = KProdigy(ps, weight_decay=0.05, **flags)
        ds = []
        for k in range(12):
            for i, (p, g) in enumerate(zip(ps, _grads(ps, k))):
                p.grad = None if i % 17 == 5 and k < 8 else g  # some params without gradients, at first
            if k == 6:
                ps[0].grad[699, 399] = float("inf")
            before = [None if p.grad is None else p.grad.clone() for p in ps]
            opt.step()
            assert all(b is None or torch.equal(p.grad, b) for p, b in zip(ps, before))
            ds.append(opt.param_groups[0]["d"])
        return ps, opt, ds

    with pytest.MonkeyPatch.context() as mp:
        calls = _count_updates(mp)
        ours, opt, d_ours = run({})
    assert calls[0] == 11  # every step but the skipped one
    ref, ropt, d_ref = run({"foreach": False, "fused": False})
    assert d_ours[-1] > 100 * 1e-6
    assert opt.param_groups[0]["skipped_steps"] == ropt.param_groups[0]["skipped_steps"] == 1
    for a, b in zip(d_ours, d_ref):
        assert abs(a - b) <= 1e-12 * abs(b)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14)
        for key in ("exp_avg", "exp_avg_sq", "s"):
            # (the default path keeps m, v, s scaled: an entry where b1 m and (1 - b1) d g cancel
            # rounds apart relative to itself, not to the tensor's scale)
            b = ropt.state[q][key]
            torch.testing.assert_close(opt.state[p][key], b, rtol=1e-10, atol=1e-12 * float(b.abs().max()))


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"betas": (0.0, 0.999)},
        {"betas": (0.0, 0.999), "weight_decay": 0.05},
        {"slice_p": 3},
        {"slice_p": 11, "weight_decay": 0.05},
        {"d_update_freq": 3},
        {"d_steps": 8},
        {"independent_d": True, "d_ratio_cap": 1.5},
        {"weight_decay": 0.05, "decouple": False},
        {"maximize": True, "weight_decay": 0.05, "decouple": False, "slice_p": 3},
        {"maximize": True, "weight_decay": 0.05, "decouple": False},
    ],
    ids=[
        "defaults",
        "betas0_0",
        "betas0_0_wd",
        "slice_p3",
        "slice_p11_wd",
        "d_update_freq3",
        "d_steps8",
        "d_ratio_cap",
        "coupled_wd",
        "maximize_coupled_slice_p3",
        "maximize_coupled",  # (slice_p 1: s written once, the effective gradient made three times)
    ],
)
def test_native_settings_equal_per_tensor(settings: dict) -> None:
    """The settings beyond the defaults that the native path takes, over the CPU bucket layout
    (a large tensor in slices whose length is no multiple of slice_p, packed small ones, a compact
    p0): equal to the per-tensor kernels in float64 on every step (D, params, state), the native
    update used on every step that is not skipped, a NaN step skipped exactly (one that updates D
    and, with d_update_freq, one that does not), D grown."""
    shapes = [(700, 401)] + [(64, 63)] * 70 + [(5,), (1, 7), (3, 3)]
    assert 700 * 401 > 2 * _adamw.SLICE and 70 * 64 * 63 > _adamw.PACK_MAX
    # a NaN at k=4 (d_update_freq=3: a step that does not update D; d_steps=8: before D froze) and
    # at loop step 10 (k=9: one that updates D; D frozen), on a small tensor (slice_p: unsampled)
    steps, nan_at = 14, [4, 10]

    def run(flags: dict) -> tuple[list[torch.nn.Parameter], KProdigy, list[list[float]]]:
        nonlocal path
        gen = torch.Generator().manual_seed(5)
        ps = [torch.nn.Parameter(torch.randn(*s, generator=gen, dtype=torch.float64)) for s in shapes]
        ps[-2].data.zero_()  # compact p0
        groups = [dict(params=ps[:40]), dict(params=ps[40:], lr=0.5)]  # two groups: one D unless independent
        opt = KProdigy(groups, **settings, **flags)
        ds = []
        for k in range(steps):
            for p, g in zip(ps, _grads(ps, k)):
                p.grad = g * 10 ** (k % 3)  # the gradient scale changes: D grows, the cap binds
            if k in nan_at:
                ps[1 + k].grad[0, 1] = float("nan")  # element 1: not among the slice_p-th
            before, x_before = [p.grad.clone() for p in ps], [p.detach().clone() for p in ps]
            opt.step()
            assert all(torch.equal(p.grad, b) or torch.isnan(b).any() for p, b in zip(ps, before))
            ds.append([g["d"] for g in opt.param_groups])
            path = [a + float((p - x).norm()) for a, p, x in zip(path, ps, x_before)]
        return ps, opt, ds

    path = [0.0] * len(shapes)  # per param, the sum of its moves' norms (the last run's: the reference)

    with pytest.MonkeyPatch.context() as mp:
        calls = _count_updates(mp)
        ours, opt, d_ours = run({})
    ref, ropt, d_ref = run({"foreach": False, "fused": False})
    skips = [g["skipped_steps"] for g in opt.param_groups]
    assert skips == [g["skipped_steps"] for g in ropt.param_groups] and skips[0] == len(nan_at)
    assert calls[0] == sum(steps - n for n in skips)  # native on every step a group was not skipped
    assert max(d_ours[-1]) > 10 * 1e-6
    if "d_ratio_cap" in settings:
        assert any(max(ds) == pytest.approx(1.5 * min(ds), rel=1e-12) for ds in d_ref)  # the cap bound
    for a, b in zip(d_ours, d_ref):
        assert a == pytest.approx(b, rel=1e-12)
    # float64 rounding, relative to the params and to their moves: betas[0] == 0 moves them by O(1)
    # a step, and elements near the minimum amplify rounding (the sign of g flips: measured 4e-14
    # of the path with D bit-identical); a wrong factor would be O(1) of it
    for p, q, length in zip(ours, ref, path):
        assert torch.isfinite(p).all()
        assert float((p - q).norm()) <= 1e-12 * float(q.norm()) + 1e-12 * length
        for key in ("exp_avg", "exp_avg_sq", "s"):
            if key in ropt.state[q]:
                a, b = opt.state[p][key], ropt.state[q][key]
                assert float((a - b).norm()) <= 1e-11 * float(b.norm()), key
            else:
                assert key not in opt.state[p]


def test_native_without_skip_on_steps_without_statistics() -> None:
    """skip_nonfinite=False with d_update_freq and slice_p: the steps without statistics gather
    the packed gradients by themselves (no skip check); equal to the per-tensor kernels."""
    shapes = [(700, 401)] + [(64, 63)] * 5 + [(5,)]

    def run(flags: dict) -> tuple[list[torch.nn.Parameter], KProdigy]:
        gen = torch.Generator().manual_seed(9)
        ps = [torch.nn.Parameter(torch.randn(*s, generator=gen, dtype=torch.float64)) for s in shapes]
        opt = KProdigy(ps, skip_nonfinite=False, d_update_freq=2, slice_p=2, **flags)
        for k in range(9):
            for p, g in zip(ps, _grads(ps, k)):
                p.grad = g
            opt.step()
        return ps, opt

    with pytest.MonkeyPatch.context() as mp:
        calls = _count_updates(mp)
        ours, opt = run({})
    ref, ropt = run({"foreach": False, "fused": False})
    assert calls[0] == 9 and opt.param_groups[0]["d"] > 10 * 1e-6
    assert opt.param_groups[0]["d"] == pytest.approx(ropt.param_groups[0]["d"], rel=1e-12)
    for p, q in zip(ours, ref):
        assert float((p - q).norm()) <= 1e-12 * float(q.norm())
        for key in ("exp_avg", "exp_avg_sq", "s"):
            assert float((opt.state[p][key] - ropt.state[q][key]).norm()) <= 1e-11 * float(ropt.state[q][key].norm())


def test_kept_plan_follows_settings_changed_between_steps() -> None:
    """A scheduler may change a group's settings between steps: betas[0] raised from 0 (an
    exp_avg appears) steps as the per-tensor kernels do; a changed slice_p raises as the full step
    does (the plan laid out for the old values is not used)."""

    def run(flags: dict) -> tuple[torch.nn.Parameter, KProdigy]:
        p = torch.nn.Parameter(torch.randn(20, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
        opt = KProdigy([p], betas=(0.0, 0.999), weight_decay=0.1, **flags)
        for k in range(8):
            if k == 4:
                opt.param_groups[0]["betas"] = (0.9, 0.999)
                opt.param_groups[0]["weight_decay"] = 0.0
            p.grad = _grads([p], k)[0]
            opt.step()
        return p, opt

    (p, opt), (q, ref) = run({}), run({"foreach": False, "fused": False})
    assert opt.param_groups[0]["d"] == pytest.approx(ref.param_groups[0]["d"], rel=1e-12)
    assert float((p - q).norm()) <= 1e-12 * float(q.norm())
    torch.testing.assert_close(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"], rtol=1e-10, atol=1e-300)
    opt.param_groups[0]["slice_p"] = 2
    p.grad = torch.ones_like(p)
    before = p.detach().clone()
    with pytest.raises(ValueError, match="slice_p cannot change"):
        opt.step()
    assert torch.equal(p.detach(), before)


def test_kept_plan_raises_when_d_steps_is_raised_after_d_froze() -> None:
    """D frozen (s and p0 freed), then d_steps raised: the settings' ValueError naming d_steps,
    not a step of the plan laid out without statistics, and nothing changes."""
    p = torch.nn.Parameter(torch.randn(20, 20))
    opt = KProdigy([p], d_steps=2)
    for _ in range(4):
        p.grad = torch.randn(20, 20)
        opt.step()
    opt.param_groups[0]["d_steps"] = 100
    p.grad = torch.randn(20, 20)
    before = p.detach().clone()
    with pytest.raises(ValueError, match="Invalid d_steps: 100.*cannot be raised"):
        opt.step()
    assert torch.equal(p.detach(), before) and opt.param_groups[0]["k"] == 4


def _snapshot(opt: KProdigy, ps: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [t.clone() for p in ps for t in (p.detach(), *opt.state[p].values()) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("independent_d", [False, True])
def test_s_written_once_skips_exactly_when_the_last_part_is_non_finite(
    independent_d: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``s`` is written in the statistics (``_engine._s_first``) only after every part's dots
    decided the skip: a NaN in the LAST group's gradient leaves every group of its D-group as it
    was (s included), and with one D per group the other D-group steps as without the NaN."""
    monkeypatch.setattr(_engine, "S_FIRST_MIN", 0)  # (the second group alone is small)
    norms = []
    original = _adamw.norms
    monkeypatch.setattr(_adamw, "norms", lambda *a: norms.append(1) or original(*a))

    def run(nan: bool) -> tuple[KProdigy, list[torch.nn.Parameter], list[torch.Tensor]]:
        ps = _params(torch.float32)
        opt = KProdigy([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.5}], independent_d=independent_d)
        for k in range(4):
            for p, g in zip(ps, _grads(ps, k)):
                p.grad = g
            if k == 3:  # (in both runs: reading the state normalizes it, which rounds)
                if nan:
                    ps[3].grad[0, 6] = float("nan")
                before = _snapshot(opt, ps)
            opt.step()
        return opt, ps, before

    opt, ps, before = run(nan=True)
    assert len(norms) == (4 + 3 if independent_d else 2 * 3)  # one call per part and step, none on the NaN step
    ref_opt, ref_ps, _ = run(nan=False)
    after = _snapshot(opt, ps)
    n_first = len(_snapshot(opt, ps[:2]))
    skipped = after[n_first:] if independent_d else after
    assert all(torch.equal(a, b) for a, b in zip(skipped, before[len(after) - len(skipped) :]))
    assert opt.param_groups[1]["skipped_steps"] == 1
    if independent_d:  # the first D-group stepped as in the run without the NaN
        assert opt.param_groups[0]["skipped_steps"] == 0
        assert all(torch.equal(a, b) for a, b in zip(after[:n_first], _snapshot(ref_opt, ref_ps[:2])))
    else:
        assert not any(torch.equal(a, b) for a, b in zip(after[:1], _snapshot(ref_opt, ref_ps)[:1]))


def test_an_overflowing_s_scale_raises_with_nothing_written() -> None:
    """float32 params and a D so large that the ``s`` step's scale overflows float32: torch raises
    (as in prodigyopt), and the state is as it was (the skip check and the overflow check come
    before ``s`` is written)."""
    ps = _params(torch.float32)
    assert sum(p.numel() for p in ps) >= _engine.S_FIRST_MIN
    opt = KProdigy(ps)
    for k in range(2):
        for p, g in zip(ps, _grads(ps, k)):
            p.grad = g
        opt.step()
    opt.param_groups[0].update(d=1e30, d_max=1e30)
    before = _snapshot(opt, ps)
    with pytest.raises(RuntimeError, match="overflow"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(opt, ps), before))


def _stepped(
    init: list[torch.Tensor], grads: Any, steps: int, **kwargs: Any
) -> tuple[list[torch.nn.Parameter], KProdigy]:
    """``KProdigy(**kwargs)`` over params made from ``init`` (their layout kept), ``steps`` steps on
    ``grads(params, k)`` (the one-time skip warning silenced)."""
    ps = [torch.nn.Parameter(x.clone(memory_format=torch.preserve_format)) for x in init]
    opt = KProdigy(ps, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for k in range(steps):
            for p, g in zip(ps, grads(ps, k)):
                p.grad = g
            opt.step()
    return ps, opt


def test_channels_last_params_take_the_native_path_and_equal_per_tensor() -> None:
    """Dense params whose dim 0 is outermost in memory (channels_last conv weights; a small one and
    one in several row slices) step on the fused-AdamW backend beside contiguous ones, with their
    statistics in logical order (the order of ``p0`` and ``s``, as prodigyopt flattens): the class
    and the functional steps equal the per-tensor kernels (float64, D grows; a NaN step in the
    strided tensor skipped exactly; the state read back in prodigyopt's layout)."""
    import kprodigy.functional as F

    shapes = [(8, 4, 3, 3), (8,), (64, 40, 9, 9), (300, 400)]
    assert 40 * 9 * 9 * 64 > _adamw.SLICE  # (the large one in several row slices)
    gen = torch.Generator().manual_seed(2)
    init = [torch.randn(*s, generator=gen, dtype=torch.float64) for s in shapes]
    init = [x.to(memory_format=torch.channels_last) if x.dim() == 4 else x for x in init]
    pulls = [torch.randn(*s, generator=gen, dtype=torch.float64) for s in shapes]

    def grads(xs: list[torch.Tensor], k: int) -> list[torch.Tensor]:
        gs = [(x.detach() - t + 0.01 * k).clone(memory_format=torch.preserve_format) for x, t in zip(xs, pulls)]
        if k == 5:
            gs[2][3, 1, 2, 4] = float("nan")
        return gs

    ours, opt = _stepped(init, grads, 12)
    assert {part.backend for d in opt._kept.plan.d_groups for m in d for part in m.parts} == {_adamw}
    ref, ropt = _stepped(init, grads, 12, foreach=False, fused=False)
    assert opt.param_groups[0]["skipped_steps"] == 1 and ropt.param_groups[0]["d"] > 100 * 1e-6
    assert opt.param_groups[0]["d"] == pytest.approx(ropt.param_groups[0]["d"], rel=1e-12)
    for p, q in zip(ours, ref):
        assert p.stride() == q.stride()
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-10, atol=1e-10)
        for key in ("exp_avg", "exp_avg_sq", "s", "p0"):
            b = ropt.state[q][key]
            torch.testing.assert_close(opt.state[p][key], b, rtol=1e-9, atol=1e-11 * float(b.abs().max()))
    hp = F.Hyperparams()
    for pure in (True, False):
        xs = [x.clone(memory_format=torch.preserve_format) for x in init]
        state = F.init_state(xs, hp)
        for k in range(12):
            if pure:
                xs, state = F.step(xs, grads(xs, k), state, hp)
            else:
                state = F.step_(xs, grads(xs, k), state, hp)
        for x, q in zip(xs, ref):
            torch.testing.assert_close(x, q.detach(), rtol=1e-10, atol=1e-10)


def test_a_param_the_native_path_cannot_take_leaves_it_the_others() -> None:
    """A transposed param (neither contiguous nor in rows) among others: it alone takes the
    per-tensor kernels, the rest of its group the fused-AdamW backend (before, one such param
    sent the whole group to the per-tensor kernels); the class and the pure functional step equal
    the per-tensor kernels (float64, D grows)."""
    import kprodigy.functional as F

    gen = torch.Generator().manual_seed(4)
    init = [
        torch.randn(40, 30, generator=gen, dtype=torch.float64).t(),
        torch.randn(30, generator=gen, dtype=torch.float64),
        torch.randn(8, 4, 3, 3, generator=gen, dtype=torch.float64).to(memory_format=torch.channels_last),
        torch.randn(300, 300, generator=gen, dtype=torch.float64),
        torch.randn(7, generator=gen, dtype=torch.float64),
    ]
    pulls = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in init]

    def grads(xs: list[torch.Tensor], k: int) -> list[torch.Tensor]:
        return [(x.detach() - t - 0.01 * k).clone(memory_format=torch.preserve_format) for x, t in zip(xs, pulls)]

    ours, opt = _stepped(init, grads, 10, weight_decay=0.01)
    parts = [(part.backend, part.index) for d in opt._kept.plan.d_groups for m in d for part in m.parts]
    assert parts == [(_adamw, [1, 2, 3, 4]), (_single, [0])]
    ref, ropt = _stepped(init, grads, 10, weight_decay=0.01, foreach=False, fused=False)
    assert ropt.param_groups[0]["d"] > 100 * 1e-6
    assert opt.param_groups[0]["d"] == pytest.approx(ropt.param_groups[0]["d"], rel=1e-12)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-10, atol=1e-10)
    hp = F.Hyperparams(weight_decay=0.01)
    xs = [x.clone(memory_format=torch.preserve_format) for x in init]
    state = F.init_state(xs, hp)
    for k in range(10):
        xs, state = F.step(xs, grads(xs, k), state, hp)
    for x, q in zip(xs, ref):
        torch.testing.assert_close(x, q.detach(), rtol=1e-10, atol=1e-10)
