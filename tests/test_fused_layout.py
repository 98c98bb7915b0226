"""Fused path layout: small params' state packed into one buffer, gathered params/grads, re-packing.

The packing is bookkeeping (values never change), so every test compares the fused optimizer
with the per-tensor eager path, or with an uninterrupted fused run, under the layouts that
matter: params without a gradient at some step, params whose state starts late, a compact p0,
two param groups (two gathers alive at once), a skipped non-finite step, a checkpoint reload.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import pytest
import torch

from kprodigy.functional import _fused, _layout
from kprodigy.optim import KProdigy

SHAPES = [(6, 5), (40,), (3, 3, 2), (200,), (7,), (5, 9)]  # (200,) is "large" with FLAT_MAX = 100


@pytest.fixture(autouse=True)
def small_flat_max(monkeypatch):
    monkeypatch.setattr(_fused, "FLAT_MAX", 100)


def _params(seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in SHAPES]
    with torch.no_grad():
        ps[2].zero_()  # compact (0-dim) p0 at init
    return ps


def _grads(step: int, params: list[torch.nn.Parameter]) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        late = i == 4 and step < 2  # param 4 gets its first gradient at step 2
        gap = i == 1 and step == 3  # param 1 has no gradient at step 3
        p.grad = None if late or gap else g
    if step == 4:
        params[0].grad[1, 1] = float("nan")  # a skipped step


def _groups(params):
    return [{"params": params[:3]}, {"params": params[3:], "lr": 0.5}]


def _assert_same(opt_a, opt_b, pa, pb, rtol):
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, rtol=rtol, atol=0.0)
        for key, value in opt_b.state[b].items():
            if torch.is_tensor(value):
                got = opt_a.state[a][key]  # a compact (0-dim) p0 is expanded when packed
                torch.testing.assert_close(got, torch.broadcast_to(value, got.shape), rtol=rtol, atol=0.0)
    for ga, gb in zip(opt_a.param_groups, opt_b.param_groups):
        assert ga["d"] == pytest.approx(gb["d"], rel=rtol)
        assert ga["k"] == gb["k"] and ga["skipped_steps"] == gb["skipped_steps"]


def test_fused_packed_layout_matches_the_per_tensor_path():
    fused_ps, eager_ps = _params(0), _params(0)
    fused = KProdigy(_groups(fused_ps), fused=True, d0=1e-2)
    eager = KProdigy(_groups(eager_ps), foreach=False, d0=1e-2)
    for k in range(7):
        _grads(k, fused_ps)
        _grads(k, eager_ps)
        with pytest.warns(UserWarning, match="skipped") if k == 4 else _no_warning():
            fused.step()
            eager.step()
    assert fused.param_groups[0]["skipped_steps"] == 1
    _assert_same(fused, eager, fused_ps, eager_ps, rtol=1e-12)
    # the small params of each group (param 4 included, though its state started late) share a buffer
    for idx in ([0, 1, 2], [4, 5]):
        for key in ("exp_avg", "exp_avg_sq", "s", "p0"):
            if key == "p0" and idx[-1] == 2:
                continue
            assert _layout.flat_span([fused.state[fused_ps[i]][key] for i in idx]) is not None, key
    assert fused.state[fused_ps[2]]["p0"].dim() == 0  # the all-zero param keeps its compact p0


def test_reloaded_checkpoint_is_repacked_and_continues_exactly():
    ps, ref_ps = _params(1), _params(1)
    opt, ref = KProdigy(_groups(ps), fused=True, d0=1e-2), KProdigy(_groups(ref_ps), fused=True, d0=1e-2)
    for k in range(3):
        for p_list, o in ((ps, opt), (ref_ps, ref)):
            _grads(k, p_list)
            o.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    resumed_ps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    resumed = KProdigy(_groups(resumed_ps), fused=True, d0=1e-2)
    saved = torch.load(buf, weights_only=True)  # torch.save keeps the packed buffers: clone apart
    for st in saved["state"].values():
        st.update({k: v.clone() for k, v in st.items() if torch.is_tensor(v)})
    resumed.load_state_dict(saved)
    assert _layout.flat_span([resumed.state[resumed_ps[i]]["exp_avg"] for i in (0, 1, 2)]) is None
    for k in range(3, 6):
        for p_list, o in ((resumed_ps, resumed), (ref_ps, ref)):
            _grads(k, p_list)
            with pytest.warns(UserWarning, match="skipped") if k == 4 else _no_warning():
                o.step()
    assert _layout.flat_span([resumed.state[resumed_ps[i]]["exp_avg"] for i in (0, 1, 2)]) is not None
    _assert_same(resumed, ref, resumed_ps, ref_ps, rtol=0.0)


def test_flat_span_accepts_only_back_to_back_views_in_order():
    parts = _layout.pack([torch.arange(6.0).view(2, 3), torch.arange(4.0), torch.ones(2, 2)])
    span = _layout.flat_span(parts)
    assert span is not None
    torch.testing.assert_close(span, torch.cat([p.reshape(-1) for p in parts]))
    assert span.data_ptr() == parts[0].data_ptr()
    assert _layout.flat_span(parts[1:]) is not None  # a tail run of the buffer is one too
    assert _layout.flat_span(parts[::-1]) is None  # out of order
    assert _layout.flat_span([parts[0], parts[2]]) is None  # a gap
    assert _layout.flat_span([torch.zeros(3), torch.zeros(3)]) is None  # two buffers
    assert _layout.flat_span([parts[0].t()]) is None  # not contiguous
    assert _layout.flat_span([parts[1], parts[2].to(torch.float64)]) is None  # two dtypes
    assert _layout.flat_span([]) is None


def test_pack_copies_values_and_keeps_shapes():
    ts = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 1, 2)]
    packed = _layout.pack(ts)
    for a, b in zip(packed, ts):
        assert a.shape == b.shape and a.data_ptr() != b.data_ptr()
        torch.testing.assert_close(a, b, rtol=0.0, atol=0.0)


@contextlib.contextmanager
def _no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        yield


def test_mixed_dtype_group_matches_the_per_tensor_path():
    """One param group of float32 and float64 params: the fused path steps each dtype apart."""

    def make():
        gen = torch.Generator().manual_seed(3)
        shapes = [(6, 5), (40,), (7,), (200,)]
        dtypes = [torch.float64, torch.float32, torch.float64, torch.float32]
        return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dt)) for s, dt in zip(shapes, dtypes)]

    fused_ps, eager_ps = make(), make()  # b.grad below copies a.grad: the same gradients
    fused = KProdigy(fused_ps, fused=True, d0=1e-4, use_bias_correction=False)
    eager = KProdigy(eager_ps, fused=False, d0=1e-4, use_bias_correction=False)
    for k in range(4):
        gen = torch.Generator().manual_seed(50 + k)
        for a, b in zip(fused_ps, eager_ps):
            a.grad = a.detach() + 0.1 * torch.randn(a.shape, generator=gen).to(a.dtype)  # loss |x|^2 / 2
            b.grad = a.grad.clone()
        fused.step()
        eager.step()
    assert fused.param_groups[0]["d"] > 1e-4  # D moved
    # the float32 params' statistics are summed in another order by the compiled kernel (D then
    # differs by ~1e-7 relative per step, 4e-6 after these 4 steps, as D grows 13x); states of
    # near-cancelling entries follow at up to ~5e-4 relative. A layout error (a tensor stepped
    # with another's state or dtype) is O(1).
    assert fused.param_groups[0]["d"] == pytest.approx(eager.param_groups[0]["d"], rel=1e-5)
    _assert_same(fused, eager, fused_ps, eager_ps, rtol=2e-3)
