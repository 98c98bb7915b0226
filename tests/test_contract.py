"""The kernel contract, checked on every backend directly (``_single.py`` states it).

- ``statistics`` reads only: no tensor's version counter moves, and its two sums are the
  float64 formulas of DESIGN.md;
- ``update(out=None)`` writes nothing and ``update(out=<the inputs>)`` returns the inputs
  themselves, updated to the same bits;
- a finished record with ``ok`` False (the skip folded in) makes ``update`` an exact no-op even
  with NaN/inf in the gradient.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from kprodigy.functional import Hyperparams, _factored, _foreach, _fused, _single
from kprodigy.functional._scalars import step_scalars
from kprodigy.functional._state import SegmentResult, init_d_state

BACKENDS = {"single": _single, "foreach": _foreach, "factored": _factored, "fused": _fused}
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
        v[0] = torch.rand(_factored.init_factored_v(xs[0]).shape, generator=gen, dtype=torch.float64)
    return {
        "xs": xs,
        "gs": draw(),
        "m": draw() if b1 > 0 else None,
        "v": v,
        "s": [t.flatten() for t in draw()],
        "p0": [x.flatten() + 0.1 * t.flatten() for x, t in zip(xs, draw())],
    }


def _scalars(hp: Hyperparams, d: float, ok: Tensor | None = None):  # type: ignore[no-untyped-def]
    ds = init_d_state(hp, "cpu", torch.float64).replace(d=torch.tensor(d, dtype=torch.float64))
    return step_scalars(hp, ds, update_d=True, beta3=hp.beta3_value), ds


def _versions(t: dict[str, list[Tensor] | None]) -> list[int]:
    return [x._version for ts in t.values() if ts is not None for x in ts]


@pytest.mark.parametrize("name", list(BACKENDS))
def test_statistics_read_only_and_equal_to_the_formulas(name: str) -> None:
    kernels = BACKENDS[name]
    hp = Hyperparams(d0=1e-4, lr=0.5)
    t = _tensors(0, 0.9)
    sc, _ = _scalars(hp, 3e-3)
    before = _versions(t)
    num, den = kernels.statistics(t["xs"], t["gs"], t["s"], t["p0"], sc=sc, slice_p=1)
    assert _versions(t) == before  # nothing written
    d, d0, dlr = 3e-3, 1e-4, 3e-3 * 0.5
    want_num = sum(float(torch.dot(g.flatten(), p0 - x.flatten())) for g, x, p0 in zip(t["gs"], t["xs"], t["p0"]))  # type: ignore[arg-type]
    want_den = sum(
        float((hp.beta3_value * s + (d / d0) * dlr * g.flatten()).abs().sum()) for s, g in zip(t["s"], t["gs"])  # type: ignore[arg-type]
    )
    assert float(num) == pytest.approx((d / d0) * dlr * want_num, rel=1e-12)
    assert float(den) == pytest.approx(want_den, rel=1e-12)


@pytest.mark.parametrize("b1", [0.9, 0.0])
@pytest.mark.parametrize("name", list(BACKENDS))
def test_update_pure_and_in_place_agree_and_a_skip_is_exact(name: str, b1: float) -> None:
    kernels = BACKENDS[name]
    hp = Hyperparams(d0=1e-4, betas=(b1, 0.999), weight_decay=0.1)
    sc, ds = _scalars(hp, 3e-3)
    d_new = torch.tensor(4e-3, dtype=torch.float64)

    t = _tensors(1, b1, name == "factored")
    before = _versions(t)
    pure = kernels.update(t["xs"], t["gs"], t["m"], t["v"], t["s"], sc=sc.finish(d_new, None), slice_p=1, out=None)
    assert _versions(t) == before  # out=None: new tensors, the inputs untouched

    dest = SegmentResult(t["xs"], t["m"], t["v"], t["s"])  # type: ignore[arg-type]
    got = kernels.update(t["xs"], t["gs"], t["m"], t["v"], t["s"], sc=sc.finish(d_new, None), slice_p=1, out=dest)
    for field in ("params", "exp_avg", "exp_avg_sq", "s"):
        a, b, c = getattr(got, field), getattr(pure, field), getattr(dest, field)
        if c is None:
            assert a is None and b is None
            continue
        assert all(x is y for x, y in zip(a, c))  # written into the destinations
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
        assert not any(torch.equal(x, y) for x, y in zip(a, _tensors(1, b1, name == "factored")[{"params": "xs", "exp_avg": "m", "exp_avg_sq": "v", "s": "s"}[field]]))  # type: ignore[arg-type]

    t = _tensors(2, b1, name == "factored")
    t["gs"][0][3, 4] = float("nan")  # type: ignore[index]
    t["gs"][1][0, 0] = float("inf")  # type: ignore[index]
    kept = {k: None if v is None else [x.clone() for x in v] for k, v in t.items()}
    skip = sc.finish(d_new, torch.tensor(False))
    dest = SegmentResult(t["xs"], t["m"], t["v"], t["s"])  # type: ignore[arg-type]
    kernels.update(t["xs"], t["gs"], t["m"], t["v"], t["s"], sc=skip, slice_p=1, out=dest)
    for key in ("xs", "m", "v", "s"):
        if t[key] is not None:
            for x, y in zip(t[key], kept[key]):  # type: ignore[arg-type]
                assert torch.equal(x, y), key  # bit-identical: nothing written
