"""Smoke run of the multi-component study (``benchmarks/multi_component.py --quick``) and of its
prototype couplings; the study itself is a benchmark, not a test."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("mnist1d")
pytest.importorskip("sklearn")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import multi_component as M  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_quick_writes_labelled_tables_into_a_fresh_folder(tmp_path, monkeypatch) -> None:
    import _output

    if "fell back" in M.T.fashion_data(2000, 2000).note:
        pytest.skip("needs the Debian dataset-fashion-mnist package")
    results = _output.RESULTS_DIR
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*")}
    monkeypatch.setattr(_output, "OUT_ROOT", tmp_path / "out")
    M.main(["--quick", "--studies", "sdxl-finetune,two-component", "--configs", "one D;proto: harmonic mean of Ds"])
    (run_dir,) = (tmp_path / "out").iterdir()
    for study in ("sdxl-finetune", "two-component"):
        md = (run_dir / f"{study}.md").read_text()
        assert "SMOKE TEST" in md and "| one D |" in md and "| proto: harmonic mean of Ds |" in md
        saved = json.loads((run_dir / f"{study}.json").read_text())
        assert saved["quick"] and len(saved["runs"]) == 2 and "kprodigy" in saved["code"]
        for run in saved["runs"]:
            assert math.isfinite(run["te_drift"]) and run["d"] and all(d > 0 for d in run["d"].values())
    again = tmp_path / "again"
    M.main(["--from-json", str(run_dir / "two-component.json"), "--out", str(again)])  # re-render, no training
    assert (again / "two-component.md").read_text() == (run_dir / "two-component.md").read_text()
    assert {p: p.stat().st_mtime_ns for p in results.rglob("*")} == before  # committed results untouched
    with pytest.raises(SystemExit, match="smoke test"):
        M.main(["--quick", "--update-results"])


def _two_groups() -> tuple[nn.Module, nn.Module, list[dict]]:
    torch.manual_seed(0)
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    with torch.no_grad():
        b.weight.mul_(30.0)  # larger params and gradients: the two own Ds part
    return a, b, [{"params": a.parameters()}, {"params": b.parameters()}]


def _steps(opt: torch.optim.Optimizer, a: nn.Module, b: nn.Module, n: int = 20) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(n):
        x = torch.randn(16, 4, generator=gen)
        loss = (a(x) ** 2).mean() + (b(x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("coupling", ["floor", "mean", "hmean", "shared-denom"])
def test_prototype_couplings_set_the_d_the_next_step_uses(coupling: str) -> None:
    a, b, groups = _two_groups()
    opt = M.CoupledKProdigy(groups, coupling=coupling, ratio=1.0)
    _steps(opt, a, b)
    own = [g["d_max"] for g in opt.param_groups]
    ds = [g["d"] for g in opt.param_groups]
    if coupling == "floor":  # ratio 1: no group below the pooled estimate, none lowered
        assert all(d >= o for d, o in zip(ds, own)) and min(ds) >= opt._pool > 0
    elif coupling == "mean":
        assert ds[0] == ds[1] == pytest.approx(sum(own) / 2)
    elif coupling == "hmean":
        assert ds[0] == ds[1] == pytest.approx(2 / (1 / own[0] + 1 / own[1]))
    else:
        assert sum(ds) <= opt._pool * (1 + 1e-9) + 2 * opt.param_groups[0]["d0"]
    _steps(opt, a, b, 1)  # the rewritten D is the one the next step takes
    assert [g["step_size"] for g in opt.param_groups] == pytest.approx(ds)


def test_no_coupling_is_kprodigy_and_the_weight_decay_split_is_hf_trainers() -> None:
    a, b, groups = _two_groups()
    ref_a, ref_b, ref_groups = _two_groups()
    opt, ref = M.CoupledKProdigy(groups), M.KProdigy(ref_groups)
    _steps(opt, a, b)
    _steps(ref, ref_a, ref_b)
    assert torch.equal(a.weight, ref_a.weight) and opt.param_groups[0]["d"] == ref.param_groups[0]["d"]
    split = M.CoupledKProdigy(list(a.parameters()) + list(b.parameters()), wd_split=0.01)
    assert [len(g["params"]) for g in split.param_groups] == [2, 2]
    assert [g["weight_decay"] for g in split.param_groups] == [0.01, 0.0]
    assert all(p.dim() >= 2 for p in split.param_groups[0]["params"])
