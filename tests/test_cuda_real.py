"""On a CUDA device only (skipped elsewhere; ``benchmarks/gpu_check.sh`` runs it): every path's
steps on CUDA against the same steps on CPU, and the device syncs of a steady CUDA step counted by
torch's sync debug mode: one per step for all D-groups by default, none with ``capturable=True``.
Written without a GPU: not yet run on one (``tests/test_cuda_fake.py`` runs the CUDA branches on
fake tensors here)."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

from kprodigy import KProdigy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SHAPES = [(40, 30), (30,), (300, 300), (7,)]  # small (packed state), a large one (sliced buckets)
PATHS: dict[str, dict[str, Any]] = {
    "native": {},
    "native slice_p d_update_freq": {"slice_p": 3, "d_update_freq": 2},
    "native betas0=0 coupled": {"betas": (0.0, 0.999), "weight_decay": 0.01, "decouple": False},
    "foreach": {"foreach": True},
    "per-tensor": {"foreach": False},
    "factored": {"factored": True},
    "d_ratio_cap": {"d_ratio_cap": 2.0},
    "capturable": {"capturable": True},
    "fused": {"fused": True},
}


def _opt(device: str, dtype: torch.dtype, flags: dict[str, Any]) -> tuple[KProdigy, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype).to(device)) for s in SHAPES]
    groups = [{"params": ps[:2]}, {"params": ps[2:3], "lr": 0.5}, {"params": ps[3:]}]
    return KProdigy(groups, independent_d=True, **flags), ps


def _run(device: str, dtype: torch.dtype, flags: dict[str, Any], steps: int = 12) -> tuple[list[Any], list[float]]:
    """Params and D of three D-groups after ``steps`` steps on a quadratic (D grows)."""
    opt, ps = _opt(device, dtype, flags)
    gen = torch.Generator().manual_seed(1)
    targets = [torch.randn(p.shape, generator=gen, dtype=dtype).to(device) for p in ps]
    for _ in range(steps):
        for p, t in zip(ps, targets):
            p.grad = p.detach() - t
        opt.step()
    return [p.detach().cpu() for p in ps], [float(g["d"]) for g in opt.param_groups]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", list(PATHS))
def test_cuda_steps_match_cpu(name: str, dtype: torch.dtype) -> None:
    """The same steps on CUDA and on CPU agree (sums in another order: float rounding only)."""
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    xs_cuda, d_cuda = _run("cuda", dtype, PATHS[name])
    xs_cpu, d_cpu = _run("cpu", dtype, PATHS[name])
    torch.testing.assert_close(d_cuda, d_cpu, rtol=tol, atol=0)
    for a, b in zip(xs_cuda, xs_cpu):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))


@pytest.mark.parametrize("name", ["native", "foreach", "per-tensor", "factored", "capturable"])
def test_cuda_syncs_per_step(name: str) -> None:
    """Syncs of steady steps (torch.cuda's sync debug mode warns at each): one per step for all
    three D-groups, none with ``capturable``."""
    opt, ps = _opt("cuda", torch.float32, PATHS[name])
    grads = [torch.randn_like(p) for p in ps]
    for p, g in zip(ps, grads):
        p.grad = g
    opt.step()  # creates the state (reads each param once)
    torch.cuda.synchronize()
    counts = []
    for _ in range(3):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(len([w for w in record if "synchroniz" in str(w.message)]))
    assert counts == [0 if name == "capturable" else 1] * 3
