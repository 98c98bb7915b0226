"""Distributed D: one D across ranks under DDP, ZeRO and FSDP2 (real gloo, 2 CPU processes).

One 2-process run (tests/_dist_worker.py, ~5-15 s) executes every scenario and its single-process
reference; the tests below compare. Single-process tests of the reduction seam come first.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from kprodigy import KProdigy
from kprodigy.functional import Hyperparams, _engine, init_state
from kprodigy.functional._state import Segment

WORKER = Path(__file__).with_name("_dist_worker.py")
RTOL = 1e-12  # float64 runs; the all-reduce only reorders a sum of two partials


def _segments(seed: int, sizes: tuple[int, ...], hp: Hyperparams) -> tuple[list[Segment], Any]:
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, generator=g, dtype=torch.float64) for n in sizes]
    gs = [torch.randn(n, generator=g, dtype=torch.float64) for n in sizes]
    st = init_state(xs, hp)
    return [Segment(xs, gs, st.exp_avg, st.exp_avg_sq, st.s, st.p0, hp)], st.d


def step_d_groups(d_groups, d_states, *, reduce_stats=None, on_host=False):  # type: ignore[no-untyped-def]
    """The engine's pure step of these D-groups: [(results, new D state)] per D-group."""
    plan = _engine.build(d_groups, on_host=on_host, pure=True)
    grads = [[list(seg.grads) for seg in segs] for segs in d_groups]
    results, new = _engine.step(plan, grads, [d.on_host() if on_host else d for d in d_states], reduce_stats=reduce_stats)
    return list(zip(results, new))


def step_d_group(segments, d_state, *, reduce_stats=None):  # type: ignore[no-untyped-def]
    ((results, new),) = step_d_groups([segments], [d_state], reduce_stats=reduce_stats)
    return results, new


def test_step_d_groups_packs_all_groups_into_one_reduce_call() -> None:
    hp = Hyperparams(d0=1e-3)
    groups = [_segments(seed, (5, 3), hp) for seed in range(3)]
    calls: list[torch.Tensor] = []

    def identity(stats: torch.Tensor) -> torch.Tensor:
        calls.append(stats.clone())
        return stats

    outs = step_d_groups([s for s, _ in groups], [d for _, d in groups], reduce_stats=identity)
    assert len(calls) == 1 and calls[0].shape == (6,)  # [num0, den0, num1, den1, num2, den2]
    for (segs, d), (res, new) in zip(groups, outs):
        (ref_res,), ref = step_d_group(segs, d)
        assert torch.equal(new.d, ref.d) and torch.equal(new.d_numerator, ref.d_numerator)
        assert all(torch.equal(a, b) for a, b in zip(res[0].params, ref_res.params))


def _run(hook: Any, steps: int = 3) -> Any:
    """``steps`` pure steps of one D-group with ``reduce_stats=hook``; the final D state."""
    hp = Hyperparams(d0=1e-3, use_bias_correction=False)  # D moves far in 3 steps
    (seg,), d = _segments(0, (7,), hp)
    for _ in range(steps):
        (res,), d = step_d_group([seg], d, reduce_stats=hook)
        seg = Segment(res.params, seg.grads, res.exp_avg, res.exp_avg_sq, res.s, seg.p0, hp)
    return d


def test_reduced_statistics_drive_d() -> None:
    """Doubling num and den (two identical ranks) leaves D; doubling only num changes it."""
    ref = _run(None)
    assert float(ref.d) > 1e-3  # D moved, so the comparisons below can fail
    same = _run(lambda s: 2 * s)
    other = _run(lambda s: s * torch.tensor([2.0, 1.0], dtype=s.dtype))
    torch.testing.assert_close(same.d, ref.d, rtol=1e-14, atol=0)
    assert not torch.allclose(other.d, ref.d, rtol=1e-3, atol=0)


def test_rank_without_tensors_takes_part_and_follows_global_d() -> None:
    """Under a reduction a D-group with no local tensors still calls the hook and updates D."""
    hp = Hyperparams(d0=1e-3)
    segs, d = _segments(0, (7,), hp)
    (_,), full = step_d_group(segs, d, reduce_stats=lambda s: s)
    captured: list[torch.Tensor] = []

    def hook(stats: torch.Tensor) -> torch.Tensor:  # "the other rank" held all the tensors
        captured.append(stats.clone())
        return torch.stack([full.d_numerator, full.d_denom]).to(stats.dtype)

    empty = Segment([], [], [], [], [], [], hp)
    (_,), new = step_d_group([empty], d, reduce_stats=hook)
    assert len(captured) == 1 and torch.equal(captured[0], torch.zeros(2, dtype=captured[0].dtype))
    torch.testing.assert_close(new.d, full.d.to(new.d.dtype), rtol=1e-6, atol=0)
    (_,), alone = step_d_group([empty], d)  # without a reduction nothing happens, k included
    assert torch.equal(alone.d, d.d) and int(alone.k) == 0


def test_no_reduce_call_on_steps_that_do_not_update_d() -> None:
    hp = Hyperparams(d0=1e-3, d_update_freq=2)
    segs, d = _segments(0, (4,), hp)
    calls = []
    # D on the host: k = 1 is known to update nothing (on the device the step is decided there)
    step_d_groups([segs], [d.replace(k=d.k + 1)], reduce_stats=lambda s: calls.append(1) or s, on_host=True)
    assert calls == []
    step_d_groups([segs], [d], reduce_stats=lambda s: calls.append(1) or s)
    assert calls == [1]


def test_single_process_needs_no_process_group() -> None:
    """Forcing the reduction without torch.distributed initialized is a no-op, not an error."""
    assert not dist.is_initialized()
    x = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    runs = []
    for kw in ({}, {"reduce_d_stats": True}, {"fsdp_in_use": True}):
        p = torch.nn.Parameter(x.detach().clone())
        opt = KProdigy([p], **kw)
        for _ in range(3):
            p.grad = p.detach().clone()
            opt.step()
        runs.append((p.detach(), opt.param_groups[0]["d"]))
    assert all(torch.equal(r[0], runs[0][0]) and r[1] == runs[0][1] for r in runs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reduce_d_stats": 1}, "reduce_d_stats"),
        ({"reduce_d_stats": False, "fsdp_in_use": True}, "fsdp_in_use"),
        ({"process_group": "world"}, "process_group"),
    ],
)
def test_bad_distributed_arguments_are_rejected(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KProdigy([torch.nn.Parameter(torch.ones(2))], **kwargs)


# ---- real torch.distributed: 2 processes, gloo, CPU ----


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("dist")
    root = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(rank), "2", str(port), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=120)[0])  # the fused run compiles
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, f"worker failed:\n{log[-3000:]}"
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


def _assert_matches(res: dict[str, Any], ref: dict[str, Any]) -> None:
    torch.testing.assert_close(torch.tensor(res["d"]), torch.tensor(ref["d"]), rtol=RTOL, atol=0)
    for a, b in zip(res["params"], ref["params"], strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-15)


@pytest.mark.parametrize("scheme", ["ddp", "zero", "fsdp2", "fsdp2_sliced", "fsdp2_fused"])
def test_every_rank_matches_the_single_process_run(ranks: list[dict[str, Any]], scheme: str) -> None:
    """D of every D-group and all params equal the single-process run on the whole batch."""
    for rank in ranks:
        _assert_matches(rank[scheme], ranks[0][scheme + "_ref"])
    assert ranks[0][scheme]["d"] == ranks[1][scheme]["d"]  # bit-identical D on all ranks


def test_plain_ddp_pays_no_collective(ranks: list[dict[str, Any]]) -> None:
    assert all(n == 0 for rank in ranks for n in rank["ddp"]["all_reduces"])


@pytest.mark.parametrize("scheme", ["zero", "fsdp2"])
def test_sharded_schemes_pay_one_collective_per_step(ranks: list[dict[str, Any]], scheme: str) -> None:
    """ZeRO runs three D-groups (one with no tensor on rank 0): still one all_reduce per step."""
    assert all(n == 1 for rank in ranks for n in rank[scheme]["all_reduces"])
    if scheme == "zero":
        assert ranks[0]["zero"]["n_local"] == [1, 0, 0] or ranks[1]["zero"]["n_local"] == [1, 0, 0]


@pytest.mark.parametrize("scheme", ["zero_off", "fsdp2_off"])
def test_without_the_reduction_ranks_disagree_on_d(ranks: list[dict[str, Any]], scheme: str) -> None:
    d0, d1 = (torch.tensor(rank[scheme]["d"]) for rank in ranks)
    assert not torch.allclose(d0, d1, rtol=1e-3, atol=0), (d0, d1)
    assert all(n == 0 for rank in ranks for n in rank[scheme]["all_reduces"])


def test_fsdp2_distributed_checkpoint_round_trip(ranks: list[dict[str, Any]]) -> None:
    """dcp.save / dcp.load of get_state_dict restores D and the per-tensor state: resuming is exact."""
    for rank in ranks:
        ck = rank["fsdp2"]["checkpoint"]
        assert ck["saved_d"] == ck["expected"]["d"]
        assert ck["loaded"] == ck["expected"]
        params, d = ck["after"]
        params2, d2 = ck["after_loaded"]
        assert d == d2 and d != ck["expected"]["d"]
        assert all(torch.equal(a, b) for a, b in zip(params, params2, strict=True))
