"""Worker for tests/test_distributed.py: one rank of a 2-process gloo run on CPU.

Usage: python tests/_dist_worker.py RANK WORLD PORT OUT_DIR. Runs every scenario (DDP, ZeRO,
FSDP2, each with and without the D all-reduce) and its single-process reference, and saves the
results to OUT_DIR/rank{RANK}.pt for the test to compare. float64 throughout, so that "equal to
the single-process run" can be checked to ~1e-12.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kprodigy import KProdigy as _KProdigy


class KProdigy(_KProdigy):
    """No bias correction: D then grows far within the few steps these runs take."""

    def __init__(self, params: Any, **kw: Any) -> None:
        kw.setdefault("use_bias_correction", False)
        super().__init__(params, **kw)


STEPS = 6
BATCH = 4  # per rank


def make_model(seed: int = 0) -> nn.Module:
    """Every shard of every tensor has an even element count on 2 ranks (slice_p=2 stays exact)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 4)).double()


def data(step: int, rank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s batch of this step; None: the whole batch of all ranks (the reference)."""
    g = torch.Generator().manual_seed(1000 + step)
    x, y = (
        torch.randn(2 * BATCH, 8, generator=g, dtype=torch.float64),
        torch.randn(2 * BATCH, 4, generator=g, dtype=torch.float64),
    )
    if rank is None:
        return x, y
    return x[rank * BATCH : (rank + 1) * BATCH], y[rank * BATCH : (rank + 1) * BATCH]


def fsdp2_model(seed: int = 0) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = make_model(seed)
    fully_shard(model[0])
    fully_shard(model[2])
    return fully_shard(model)


def groups_of(model: nn.Module) -> list[dict[str, Any]]:
    """Three param groups (three independent D); the last holds one tensor, so one ZeRO rank owns none of it."""
    return [
        {"params": [model[0].weight, model[0].bias]},
        {"params": [model[2].weight], "lr": 0.5},
        {"params": [model[2].bias]},
    ]


def train(model: nn.Module, opt: Any) -> None:
    for step in range(STEPS):
        x, y = data(step, None)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def d_values(opt: Any) -> list[float]:
    return [g["d"] for g in opt.param_groups]


def full(model: nn.Module) -> list[torch.Tensor]:
    out = []
    for p in model.parameters():
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        out.append(p.detach().clone())
    return out


def reference(kind: str, **kw: Any) -> dict[str, Any]:
    """The single-process run on the whole batch."""
    model = make_model()
    opt = KProdigy(groups_of(model) if kind == "zero" else model.parameters(), **kw)
    train(model, opt)
    return {"d": d_values(opt), "params": full(model)}


def run(rank: int, world: int, out: str) -> dict[str, Any]:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    calls = [0]
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real_all_reduce(*args, **kwargs)

    results: dict[str, Any] = {}

    def record(name: str, model: nn.Module, opt: Any) -> None:
        per_step = []
        for step in range(STEPS):
            x, y = data(step, rank)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            calls[0] = 0
            dist.all_reduce = counting_all_reduce  # counts the optimizer's collectives only
            try:
                opt.step()
            finally:
                dist.all_reduce = real_all_reduce
            per_step.append(calls[0])
        results[name] = {
            "d": d_values(opt if not hasattr(opt, "optim") else opt.optim),
            "params": full(model),
            "all_reduces": per_step,
        }

    # DDP: replicated params, averaged grads: no reduction, nothing paid
    model = make_model()
    record("ddp", DDP(model), KProdigy(model.parameters()))
    results["ddp_ref"] = reference("ddp")

    # ZeRO stage 1 over three D-groups (one of them empty on one rank)
    for name, kw in (("zero", {}), ("zero_off", {"reduce_d_stats": False})):
        model = make_model()
        ddp = DDP(model)
        opt = ZeroRedundancyOptimizer(groups_of(model), optimizer_class=KProdigy, **kw)
        record(name, ddp, opt)
        results[name]["n_local"] = [len(g["params"]) for g in opt.optim.param_groups]
    results["zero_ref"] = reference("zero")

    # FSDP2 fully_shard (DTensor params); slice_p=2 on shards of even size samples what one process does
    fsdp2_runs: tuple[tuple[str, dict[str, Any]], ...] = (
        ("fsdp2", {}),
        ("fsdp2_off", {"reduce_d_stats": False}),
        ("fsdp2_sliced", {"slice_p": 2}),
        ("fsdp2_fused", {"fused": True}),  # compiled kernels on the local shards
    )
    for name, kw in fsdp2_runs:
        model = fsdp2_model()
        opt = KProdigy(model.parameters(), **kw)
        record(name, model, opt)
        if name == "fsdp2":
            results[name]["checkpoint"] = fsdp2_checkpoint(model, opt, rank, out)
    results["fsdp2_ref"] = reference("fsdp2")
    results["fsdp2_sliced_ref"] = reference("fsdp2", slice_p=2)
    results["fsdp2_fused_ref"] = results["fsdp2_ref"]
    return results


def fsdp2_checkpoint(model: nn.Module, opt: KProdigy, rank: int, out: str) -> dict[str, Any]:
    """Save with torch.distributed.checkpoint, load into a fresh copy; one more step on both."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt)
    saved_d = [g["d"] for g in osd["param_groups"]]
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=f"{out}/ckpt")
    model2 = fsdp2_model(seed=1)
    opt2 = KProdigy(model2.parameters())
    msd2, osd2 = get_state_dict(model2, opt2)
    dcp.load({"model": msd2, "optim": osd2}, checkpoint_id=f"{out}/ckpt")
    set_state_dict(model2, opt2, model_state_dict=msd2, optim_state_dict=osd2)
    loaded = {key: [g[key] for g in opt2.param_groups] for key in ("d", "d_max", "d_numerator", "k")}
    expected = {key: [g[key] for g in opt.param_groups] for key in ("d", "d_max", "d_numerator", "k")}
    for m, o in ((model, opt), (model2, opt2)):
        x, y = data(STEPS, rank)
        o.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()
        o.step()
    return {
        "saved_d": saved_d,
        "loaded": loaded,
        "expected": expected,
        "after": (full(model), d_values(opt)),
        "after_loaded": (full(model2), d_values(opt2)),
    }


def main() -> None:
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = run(rank, world, out)
    finally:
        dist.destroy_process_group()
    torch.save(results, f"{out}/rank{rank}.pt")


if __name__ == "__main__":
    main()
