"""The backend contract, checked on every backend directly (``_single.py`` states it).

- ``statistics`` reads only: no tensor's version counter moves, and its two sums are the
  float64 formulas of DESIGN.md (with D as Python floats, the host form, and as 0-dim tensors);
- ``update(out=None)`` (``PURE`` backends) writes nothing, ``update(out=<the inputs>)`` returns
  the inputs themselves, updated to the same bits as every other backend;
- a finished record with ``ok`` False (the skip folded in, D on the device) makes ``update`` an
  exact no-op even with NaN/inf in the gradient.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from kprodigy.functional import Hyperparams, _adamw, _factored, _foreach, _fused, _layout, _single
from kprodigy.functional._scalars import step_scalars
from kprodigy.functional._state import Segment, SegmentResult, init_d_state

BACKENDS = {"single": _single, "foreach": _foreach, "factored": _factored, "fused": _fused, "adamw": _adamw}
SHAPES = [(300, 300), (7, 3), (5,)]  # with fused: one tensor on the direct path, two packed


def _tensors(seed: int, b1: float, factored: bool = False) -> dict[str, list[Tensor] | None]:
    """Params, gradients and state; with ``factored`` the first param's v is packed [r, c]."""
    gen = torch.Generator().manual_seed(seed)

    def draw(positive: bool = False) -> list[Tensor]:
        ts = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
        return [t.abs() for t in ts] if positive else ts

    xs = draw()
    v = draw(positive=True)
    if factored:
        v[0] = torch.rand(xs[0].shape[0] + xs[0].shape[1], generator=gen, dtype=torch.float64)
    return {
        "xs": xs,
        "gs": draw(),
        "m": draw() if b1 > 0 else None,
        "v": v,
        "s": [t.flatten() for t in draw()],
        "p0": [x.flatten() + 0.1 * t.flatten() for x, t in zip(xs, draw())],
    }


def _scalars(hp: Hyperparams, d: float, on_host: bool):  # type: ignore[no-untyped-def]
    ds = init_d_state(hp, None if on_host else "cpu")
    ds = ds.replace(d=d if on_host else torch.tensor(d, dtype=torch.float64))
    return step_scalars(hp, ds, update_d=True, beta3=hp.beta3_value), ds


def _segment(t: dict[str, list[Tensor] | None], hp: Hyperparams, kernels) -> tuple[Segment, object]:  # type: ignore[no-untyped-def]
    """The tensors as a segment, laid out for the backend (packed where it steps state flat)."""
    seg = Segment(t["xs"], t["gs"], t["m"], t["v"], t["s"], t["p0"], hp)  # type: ignore[arg-type]
    if getattr(kernels, "PACKS", False):
        seg = _layout.pack_segment(seg)
        t.update(m=seg.exp_avg, v=list(seg.exp_avg_sq), s=list(seg.s), p0=list(seg.p0))  # type: ignore[arg-type]
    return seg, kernels.layout(seg)


def _versions(t: dict[str, list[Tensor] | None]) -> list[int]:
    return [x._version for ts in t.values() if ts is not None for x in ts]


@pytest.mark.parametrize("on_host", [True, False])
@pytest.mark.parametrize("name", list(BACKENDS))
def test_statistics_read_only_and_equal_to_the_formulas(name: str, on_host: bool) -> None:
    kernels = BACKENDS[name]
    if name == "adamw" and not on_host:
        pytest.skip("the fused-AdamW backend takes D on the host only (eps is a Python float there)")
    hp = Hyperparams(d0=1e-4, lr=0.5)
    t = _tensors(0, 0.9)
    seg, lay = _segment(t, hp, kernels)
    sc, _ = _scalars(hp, 3e-3, on_host)
    grads = kernels.gradients(seg, lay, t["gs"])
    before = _versions(t)
    num, den = kernels.statistics(seg, lay, grads, sc)
    assert _versions(t) == before  # nothing written
    d, d0, dlr = 3e-3, 1e-4, 3e-3 * 0.5
    want_num = sum(float(torch.dot(g.flatten(), p0 - x.flatten())) for g, x, p0 in zip(t["gs"], t["xs"], t["p0"]))  # type: ignore[arg-type]
    want_den = sum(
        float((hp.beta3_value * s + (d / d0) * dlr * g.flatten()).abs().sum()) for s, g in zip(t["s"], t["gs"])  # type: ignore[arg-type]
    )
    assert float(num) == pytest.approx(want_num, rel=1e-12)  # (the engine applies (d / d0) * dlr)
    assert float(den) == pytest.approx(want_den, rel=1e-12)


def _reference_update(t: dict[str, list[Tensor] | None], hp: Hyperparams, sc) -> SegmentResult:  # type: ignore[no-untyped-def]
    seg = Segment(*(list(v) if v is not None else None for v in t.values()), hp)  # type: ignore[arg-type]
    return _single.update(seg, None, _single.gradients(seg, None, seg.grads), sc, None)


@pytest.mark.parametrize("b1", [0.9, 0.0])
@pytest.mark.parametrize("name", list(BACKENDS))
def test_update_pure_and_in_place_agree_and_a_skip_is_exact(name: str, b1: float) -> None:
    kernels = BACKENDS[name]
    on_host = name == "adamw"
    hp = Hyperparams(d0=1e-4, betas=(b1, 0.999), weight_decay=0.1)
    sc, ds = _scalars(hp, 3e-3, on_host)
    d_new = 4e-3 if on_host else torch.tensor(4e-3, dtype=torch.float64)

    t = _tensors(1, b1, name == "factored")
    seg, lay = _segment(t, hp, kernels)
    grads = kernels.gradients(seg, lay, t["gs"])
    before = _versions(t)
    if kernels.PURE:
        pure = kernels.update(seg, lay, grads, sc.finish(d_new, None), None)
    else:  # in place only: compared with the specification's new tensors (compiled code may fuse ops)
        pure = _reference_update(t, hp, sc.finish(d_new, None))
    assert _versions(t) == before  # out=None: new tensors, the inputs untouched

    dest = SegmentResult(t["xs"], t["m"], t["v"], t["s"])  # type: ignore[arg-type]
    got = kernels.update(seg, lay, grads, sc.finish(d_new, None), dest)
    for field in ("params", "exp_avg", "exp_avg_sq", "s"):
        a, b, c = getattr(got, field), getattr(pure, field), getattr(dest, field)
        if c is None:
            assert a is None and b is None
            continue
        assert all(x is y for x, y in zip(a, c))  # written into the destinations
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0 if kernels.PURE else 1e-10, atol=0)
        assert not any(torch.equal(x, y) for x, y in zip(a, _tensors(1, b1, name == "factored")[{"params": "xs", "exp_avg": "m", "exp_avg_sq": "v", "s": "s"}[field]]))  # type: ignore[arg-type]

    if on_host:
        return  # with D on the host a skipped step writes nothing: the engine does not call update
    t = _tensors(2, b1, name == "factored")
    seg, lay = _segment(t, hp, kernels)
    t["gs"][0][3, 4] = float("nan")  # type: ignore[index]
    t["gs"][1][0, 0] = float("inf")  # type: ignore[index]
    kept = {k: None if v is None else [x.clone() for x in v] for k, v in t.items()}
    skip = sc.finish(d_new, torch.tensor(False))
    dest = SegmentResult(t["xs"], t["m"], t["v"], t["s"])  # type: ignore[arg-type]
    kernels.update(seg, lay, kernels.gradients(seg, lay, t["gs"]), skip, dest)
    for key in ("xs", "m", "v", "s"):
        if t[key] is not None:
            for x, y in zip(t[key], kept[key]):  # type: ignore[arg-type]
                assert torch.equal(x, y), key  # bit-identical: nothing written
