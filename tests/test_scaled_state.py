"""The default CPU step keeps m, v and s scaled between steps (``functional/_adamw.py``: m = A M,
v = B V, s = C T): every read of ``optimizer.state`` (and ``state_dict``, pickling, a copy) sees
prodigyopt's values, a checkpoint taken mid-run continues bit for bit, and the ``s`` scale is reset
before it underflows. Each test runs where D grows by orders of magnitude."""

from __future__ import annotations

import copy
import io

import prodigyopt
import pytest
import torch

from kprodigy import KProdigy
from kprodigy.optim import _plan

SHAPES = [(300, 256), (64, 32), (32,), (1, 7)]  # a sliced tensor and packed small ones


def _params(dtype: torch.dtype = torch.float64) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*s, generator=gen, dtype=dtype)) for s in SHAPES]


def _grads(ps: list[torch.nn.Parameter], k: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + k)
    return [(p.detach() - 0.5) * 0.1 + 0.01 * torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in ps]


def _step(opt: torch.optim.Optimizer, ps: list[torch.nn.Parameter], k: int) -> None:
    for p, g in zip(ps, _grads(ps, k)):
        p.grad = g
    opt.step()


def _scales(opt: KProdigy) -> list[list[float]]:
    """The scales of the kept plan's fused-AdamW parts (internal: that the state is scaled)."""
    kept = opt._kept
    assert kept is not None
    return [list(part.lay.scales) for ms in kept.plan.d_groups for m in ms for part in m.parts]


def test_state_reads_show_prodigyopt_values_while_the_step_keeps_them_scaled() -> None:
    ours, theirs = _params(), _params()
    opt, ref = KProdigy(ours), prodigyopt.Prodigy(theirs, lr=1.0)
    for k in range(25):
        _step(opt, ours, k)
        _step(ref, theirs, k)
        assert all(s != [1.0, 1.0, 1.0] for s in _scales(opt))  # scaled between steps
        if k % 6 == 5:  # a read mid-run: prodigyopt's numbers (then the run goes on scaled)
            for p, q in zip(ours, theirs):
                for key in ("exp_avg", "exp_avg_sq", "s"):
                    a, b = opt.state[p][key], ref.state[q][key]
                    assert float((a - b).norm()) <= 1e-10 * float(b.norm()), key
            assert all(s == [1.0, 1.0, 1.0] for s in _scales(opt))
    assert opt.param_groups[0]["d"] > 1e3 * 1e-6  # D grew
    assert opt.param_groups[0]["d"] == pytest.approx(ref.param_groups[0]["d"], rel=1e-10)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("how", ["state_dict", "deepcopy", "pickle"])
def test_a_checkpoint_mid_run_continues_bit_for_bit(how: str) -> None:
    """float32: the saved state holds the moments themselves (the live optimizer normalized them
    too), so the loaded optimizer and the original take the identical next steps."""
    ps = _params(torch.float32)
    opt = KProdigy(ps)
    for k in range(8):
        _step(opt, ps, k)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    if how == "state_dict":
        other = KProdigy(twin)
        other.load_state_dict(copy.deepcopy(opt.state_dict()))
    else:
        if how == "deepcopy":
            copied = copy.deepcopy({"opt": opt, "ps": ps})
        else:
            buffer = io.BytesIO()
            torch.save({"opt": opt, "ps": ps}, buffer)
            buffer.seek(0)
            copied = torch.load(buffer, weights_only=False)
        other, twin = copied["opt"], copied["ps"]
    for k in range(8, 16):
        _step(opt, ps, k)
        _step(other, twin, k)
    for p, q in zip(ps, twin):
        assert torch.equal(p.detach(), q.detach())
        for key in ("exp_avg", "exp_avg_sq", "s"):
            assert torch.equal(opt.state[p][key], other.state[q][key]), key
    assert opt.param_groups[0]["d"] == other.param_groups[0]["d"] > 1e2 * 1e-6


@pytest.mark.parametrize("beta3", [0.0, 0.3])
def test_the_s_scale_is_reset_before_it_underflows(beta3: float) -> None:
    """beta3 0.3 takes C below ``_adamw.S_FLOOR`` every dozen steps, beta3 0 at once (then ``s``
    is written unscaled): float32 stays finite (without the reset s / C overflows), and float64
    agrees with the per-tensor kernels."""
    for dtype in (torch.float32, torch.float64):
        ours, theirs = _params(dtype), _params(dtype)
        opt, ref = KProdigy(ours, beta3=beta3), KProdigy(theirs, beta3=beta3, foreach=False, fused=False)
        floor_hits = 0
        for k in range(80):
            _step(opt, ours, k)
            _step(ref, theirs, k)
            floor_hits += any(s[2] == 1.0 for s in _scales(opt))
            raw = [t for p in ours for t in _plan.raw_state(opt)[p].values() if isinstance(t, torch.Tensor)]
            assert all(torch.isfinite(t).all() for t in raw)
        assert floor_hits >= 5
        tol = 1e-12 if dtype == torch.float64 else 1e-4
        assert opt.param_groups[0]["d"] == pytest.approx(ref.param_groups[0]["d"], rel=tol)
        assert opt.param_groups[0]["d"] > 10 * 1e-6
        for p, q in zip(ours, theirs):
            s, s_ref = opt.state[p]["s"], ref.state[q]["s"]
            assert float((s - s_ref).norm()) <= 10 * tol * float(s_ref.norm())  # (an axpy of s / C)


def test_per_parameter_steps_between_scaled_steps() -> None:
    """step() (scaled) and step_parameter()/finalize_step() (on the state as prodigyopt holds it)
    alternate on one optimizer: float64 equal to the same alternation on the per-tensor kernels."""

    def run(**flags: bool) -> tuple[list[torch.nn.Parameter], KProdigy]:
        ps = _params()
        opt = KProdigy(ps, **flags)
        for k in range(16):
            if k % 4 == 3:
                for p, g in zip(ps, _grads(ps, k)):
                    p.grad = g
                    opt.step_parameter(p)
                opt.finalize_step()
            else:
                _step(opt, ps, k)
        return ps, opt

    ours, opt = run()
    ref, ref_opt = run(foreach=False, fused=False)
    assert opt.param_groups[0]["d"] == pytest.approx(ref_opt.param_groups[0]["d"], rel=1e-10)
    assert opt.param_groups[0]["d"] > 1e2 * 1e-6
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-10, atol=1e-12)
        for key in ("exp_avg", "exp_avg_sq", "s"):
            a, b = opt.state[p][key], ref_opt.state[q][key]
            assert float((a - b).norm()) <= 1e-10 * float(b.norm()), key
