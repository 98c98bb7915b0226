"""The default mode reads the device once per step for all D-groups together (issue 13's target),
on the general kernels, with several D-groups; the native CPU path twice (the skip check before
``s`` is written, then the sums: on CPU a read costs no device sync), whatever the D-groups."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from kprodigy import KProdigy

SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__")


def _count_reads(monkeypatch: pytest.MonkeyPatch, opt: KProdigy, params: list[Tensor], steps: int) -> list[int]:
    """Host reads of tensor values inside each of ``steps`` calls of ``opt.step()``."""
    counts = []
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        n = [0]
        with monkeypatch.context() as patch:
            for name in SYNCS:
                original = getattr(Tensor, name)

                def counted(self: Tensor, *args: Any, _original: Any = original, _n: list[int] = n, **kwargs: Any) -> Any:
                    _n[0] += 1
                    return _original(self, *args, **kwargs)

                patch.setattr(Tensor, name, counted)
            opt.step()
        counts.append(n[0])
    return counts


@pytest.mark.parametrize(
    "flags",
    [{}, {"foreach": True}, {"foreach": False}, {"slice_p": 3, "d_update_freq": 2}, {"foreach": True, "d_ratio_cap": 2.0}],
    ids=["native", "foreach", "per-tensor", "native-slice_p-freq", "foreach-cap"],
)
def test_one_host_read_per_step_for_all_d_groups(monkeypatch: pytest.MonkeyPatch, flags: dict) -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(40, 30), (30,), (300, 300), (7,)]]
    groups = [{"params": params[:2]}, {"params": params[2:3], "lr": 0.5}, {"params": params[3:]}]
    opt = KProdigy(groups, independent_d=True, **flags)  # three D-groups
    counts = _count_reads(monkeypatch, opt, params, 6)
    s_first = not flags  # the native path with slice_p 1 (``_engine._s_first``)
    assert counts[1:] == [2 if s_first else 1] * 5  # (the first step creates the state: it reads each param once)
    assert all(g["k"] == 6 for g in opt.param_groups)
