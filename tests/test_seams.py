"""Bugs at the seams between the shell and the core (issue 12, section 3).

Every test compares two paths that must agree (a skipped step against no step, the fused path
against the per-tensor one, ``step_parameter`` against ``step``, a loaded optimizer against a
fresh one), never hard-coded numbers, so they hold whatever the kernels' arithmetic is.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from kprodigy import KProdigy
from kprodigy.functional import _fused

# ---------------------------------------------------------------------------------------------
# d_steps: the freeze follows the step count that advanced


def test_d_steps_freeze_counts_only_steps_that_advanced() -> None:
    """A NaN-skipped step at the last adapting step neither advances k nor frees s/p0."""
    w, ref_w = (torch.nn.Parameter(torch.linspace(-1, 1, 5)) for _ in range(2))
    opt, ref = KProdigy([w], d_steps=2), KProdigy([ref_w], d_steps=2)
    grads = [torch.linspace(0.5, 1.5, 5) * (i + 1) for i in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skip warning
        for i, g in enumerate(grads):
            w.grad = g.clone()
            if i == 1:  # a skipped step first, then the same gradient again
                w.grad[2] = float("nan")
                opt.step()
                assert opt.param_groups[0]["k"] == 1 and "s" in opt.state[w] and "p0" in opt.state[w]
                assert not opt.param_groups[0]["d_frozen"]
                assert "s" in ref.state[ref_w]  # (a read normalizes the scaled state: in both runs)
                w.grad = g.clone()
            opt.step()
            ref_w.grad = g.clone()
            ref.step()
    assert torch.equal(w, ref_w)
    for key in ("d", "k", "d_frozen"):
        assert opt.param_groups[0][key] == ref.param_groups[0][key]
    assert opt.param_groups[0]["skipped_steps"] == 1 and opt.param_groups[0]["k"] == 4
    assert opt.state[w].keys() == ref.state[ref_w].keys() and "s" not in opt.state[w]


# ---------------------------------------------------------------------------------------------
# the fused path: any stride combination of param, gradient and state


@pytest.fixture
def small_flat_max(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_fused, "FLAT_MAX", 100)  # (16, 17) runs on a flat view, (5, 6) is packed


def _layout(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The same values, contiguous or laid out transposed (a non-contiguous view)."""
    return t.t().contiguous().t() if transposed else t.clone(memory_format=torch.contiguous_format)


@pytest.mark.parametrize("param_t", [False, True])
@pytest.mark.parametrize("grad_t", [False, True])
def test_fused_step_takes_any_strides_and_equals_the_per_tensor_path(
    small_flat_max: None, param_t: bool, grad_t: bool
) -> None:
    """Param and gradient each contiguous or transposed; after two steps the param's layout
    flips under its state (``p.data = ...``, like ``model.to(memory_format=...)``); step 3 is
    skipped (NaN). The fused optimizer equals the per-tensor one."""
    gen = torch.Generator().manual_seed(0)
    inits = [torch.randn(16, 17, generator=gen, dtype=torch.float64), torch.randn(5, 6, generator=gen, dtype=torch.float64)]
    ps = [torch.nn.Parameter(_layout(t, param_t)) for t in inits]
    qs = [torch.nn.Parameter(_layout(t, param_t)) for t in inits]
    opt = KProdigy(ps, fused=True, d0=1e-3)
    ref = KProdigy(qs, fused=False, foreach=False, d0=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skip warning
        for step in range(6):
            if step == 2:
                for p, q in zip(ps, qs):
                    p.data, q.data = _layout(p.data, not param_t), _layout(q.data, not param_t)
            for p, q in zip(ps, qs):
                g = _layout(torch.randn(p.shape, generator=gen, dtype=p.dtype), grad_t)
                if step == 3:
                    g[1, 1] = float("nan")
                p.grad, q.grad = g.clone(), g.clone()
            opt.step()
            ref.step()
    assert opt.param_groups[0]["skipped_steps"] == ref.param_groups[0]["skipped_steps"] == 1
    assert opt.param_groups[0]["d"] == pytest.approx(ref.param_groups[0]["d"], rel=1e-10)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=0.0)
        for key in ("exp_avg", "exp_avg_sq", "s"):
            torch.testing.assert_close(opt.state[p][key], ref.state[q][key], rtol=1e-10, atol=0.0)


def test_fused_step_after_a_channels_last_model_goes_contiguous(small_flat_max: None) -> None:
    """State created for channels_last conv weights, then the model back in contiguous format."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.Conv2d(8, 2, 1)).double()
    twin = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.Conv2d(8, 2, 1)).double()
    twin.load_state_dict(model.state_dict())
    opt = KProdigy(model.parameters(), fused=True, d0=1e-3)
    ref = KProdigy(twin.parameters(), fused=False, foreach=False, d0=1e-3)
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        fmt = torch.channels_last if step < 2 else torch.contiguous_format
        x = torch.randn(2, 4, 6, 6, generator=gen, dtype=torch.float64).to(memory_format=fmt)
        for m, o in ((model, opt), (twin, ref)):
            m.to(memory_format=fmt)
            m.zero_grad()
            m(x).square().mean().backward()
            o.step()
    assert opt.param_groups[0]["d"] == pytest.approx(ref.param_groups[0]["d"], rel=1e-10)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=0.0)


# ---------------------------------------------------------------------------------------------
# step_parameter on large params writes s and follows step(), whatever fused says


@pytest.mark.parametrize("fused", [None, True, False])
def test_step_parameter_equals_step_on_a_large_param(monkeypatch: pytest.MonkeyPatch, fused: bool | None) -> None:
    """A 1024x1025 quadratic (fused=True takes the compiled kernels there for step(); None the
    native path on CPU): step_parameter + finalize_step follows step(), with the eager kernels
    (the compiled update pass would keep the gradient alive until finalize_step)."""
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(1024, 1025, generator=gen, dtype=torch.float64)  # float64: paths agree to round-off
    w, u = (torch.nn.Parameter(torch.zeros(1024, 1025, dtype=torch.float64)) for _ in range(2))
    opt, ref = KProdigy([w], fused=fused, d0=1e-5), KProdigy([u], fused=fused, d0=1e-5)
    calls: dict[str, int] = {"n": 0}
    accumulate = _fused.statistics

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return accumulate(*args, **kwargs)

    monkeypatch.setattr(_fused, "statistics", counting)
    for _ in range(8):
        w.grad = w.detach() - target
        before = calls["n"]
        opt.step_parameter(w)
        w.grad = None  # freed at once, as a fused backward does
        opt.finalize_step()
        assert calls["n"] == before  # eager kernels
        u.grad = u.detach() - target
        before = calls["n"]
        ref.step()
        assert (calls["n"] > before) == (fused is True)
    assert ref.param_groups[0]["d"] > 5 * 1e-5  # D grew: the statistics are exercised
    assert opt.param_groups[0]["d"] == pytest.approx(ref.param_groups[0]["d"], rel=1e-10)
    torch.testing.assert_close(opt.state[w]["s"], ref.state[u]["s"], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(w, u, rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# load_state_dict makes the checkpoint authoritative over pending step_parameter work


def test_load_state_dict_drops_pending_step_parameter_work() -> None:
    gen = torch.Generator().manual_seed(0)
    w, u = torch.nn.Parameter(torch.randn(6, generator=gen)), torch.nn.Parameter(torch.zeros(6))
    opt = KProdigy([w])
    for _ in range(3):
        w.grad = torch.randn(6, generator=gen)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())  # state_dict() holds the live tensors, as torch's does
    w.grad = torch.randn(6, generator=gen)
    opt.step_parameter(w)  # pending: D not yet updated
    opt.load_state_dict(copy.deepcopy(saved))
    with torch.no_grad():
        u.copy_(w)
    ref = KProdigy([u])
    ref.load_state_dict(copy.deepcopy(saved))
    g = torch.randn(6, generator=gen)
    w.grad, u.grad = g.clone(), g.clone()
    opt.step()
    ref.step()
    assert opt.param_groups[0]["k"] == opt.state[w]["step"] == 4
    assert torch.equal(w, u)
    after, expected = opt.state_dict(), ref.state_dict()
    assert after["param_groups"] == expected["param_groups"]
    for key, value in expected["state"][0].items():
        assert torch.equal(after["state"][0][key], value) if torch.is_tensor(value) else after["state"][0][key] == value


# ---------------------------------------------------------------------------------------------
# no process-wide side effects: scratch buffers go with the optimizer, dynamo's limit is untouched


def test_scratch_buffers_go_with_the_optimizer_and_dynamo_settings_are_left_alone() -> None:
    import gc
    import weakref

    from kprodigy.functional import _scratch

    limit = torch._dynamo.config.recompile_limit
    p = torch.nn.Parameter(torch.randn(512, 512))  # 1 MiB temporaries: the eager kernels reuse buffers
    opt = KProdigy([p], foreach=False, fused=False)
    for _ in range(2):
        p.grad = torch.randn_like(p)
        opt.step()
    store = opt.__dict__["_scratch_store"]
    assert store and getattr(_scratch._LOCAL, "store", None) is None  # held by the optimizer, not the thread
    buffers = [weakref.ref(t) for t in store.values()]
    del opt, store
    gc.collect()
    assert all(ref() is None for ref in buffers)  # freed with the optimizer
    q = torch.nn.Parameter(torch.randn(64, 64))
    opt = KProdigy([q], fused=True)  # the compiled kernels raise dynamo's recompile limit during their calls only
    q.grad = torch.randn_like(q)
    opt.step()
    assert torch._dynamo.config.recompile_limit == limit
