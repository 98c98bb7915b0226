"""Cost of the non-finite skip (``skip_nonfinite``) and of the low-precision options, as ratios.

Usage (from the repository root)::

    PYTHONPATH=$PWD nice python benchmarks/skip_cost.py            # ~1 minute on 2 CPU cores
    PYTHONPATH=$PWD python benchmarks/skip_cost.py --rounds 2 --steps 3 --scale 0.25   # smoke test

Every configuration gets its own copy of the params and a fixed gradient; ``--rounds`` rounds run
each configuration ``--steps`` steps in a shuffled order (interleaved, so that load from other
processes hits every configuration alike) and the per-step median over all rounds is reported,
relative to the same path with ``skip_nonfinite=False``. Single-threaded (``torch.set_num_threads(1)``).

What the skip adds per step (words of memory traffic per parameter): one read of every gradient
for the max-norm check, one read and one write for ``where(ok, g, 0)``; the rest is scalar work.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

import torch

from kprodigy import KProdigy


def workloads(scale: float) -> dict[str, list[tuple[int, ...]]]:
    """Name -> parameter shapes: many small tensors (launch-bound) and a few large ones (memory-bound)."""
    n_small, big = max(1, int(200 * scale)), max(8, int(1024 * scale))
    return {"200 x (64, 64)": [(64, 64)] * n_small, "4 x (1024, 1024)": [(big, 1024)] * 4}


CONFIGS = {
    # name: (param dtype, KProdigy kwargs)
    "fp32 foreach, no check": (torch.float32, dict(foreach=True, skip_nonfinite=False)),
    "fp32 foreach, skip_nonfinite": (torch.float32, dict(foreach=True, skip_nonfinite=True)),
    "fp32 for-loop, no check": (torch.float32, dict(foreach=False, skip_nonfinite=False)),
    "fp32 for-loop, skip_nonfinite": (torch.float32, dict(foreach=False, skip_nonfinite=True)),
    "fp32 foreach, d_update_freq=4, no check": (torch.float32, dict(d_update_freq=4, skip_nonfinite=False)),
    "fp32 foreach, d_update_freq=4, skip_nonfinite": (torch.float32, dict(d_update_freq=4, skip_nonfinite=True)),
    "bf16 foreach, bf16 state": (torch.bfloat16, dict(state_precision="bfloat16", skip_nonfinite=False)),
    "bf16 foreach, fp32 state": (torch.bfloat16, dict(state_precision="float32", skip_nonfinite=False)),
    "bf16 foreach, fp32 state + stochastic rounding": (
        torch.bfloat16,
        dict(state_precision="float32", skip_nonfinite=False, stochastic_rounding=True),
    ),
}
BASELINE = {  # each configuration is reported relative to this one
    "fp32 foreach, skip_nonfinite": "fp32 foreach, no check",
    "fp32 for-loop, skip_nonfinite": "fp32 for-loop, no check",
    "fp32 foreach, d_update_freq=4, skip_nonfinite": "fp32 foreach, d_update_freq=4, no check",
    "bf16 foreach, fp32 state": "bf16 foreach, bf16 state",
    "bf16 foreach, fp32 state + stochastic rounding": "bf16 foreach, bf16 state",
}


def micro(n: int, repeats: int) -> None:
    """Time candidate finiteness checks and sanitizers on one float32 tensor of ``n`` elements."""
    g = torch.randn(n)
    ok = torch.tensor(True)
    candidates = {
        "check: linalg.vector_norm(g, inf)": lambda: torch.linalg.vector_norm(g, float("inf")),
        "check: _foreach_norm([g], inf)": lambda: torch._foreach_norm([g], float("inf")),
        "check: aminmax(g)": lambda: torch.aminmax(g),
        "check: isfinite(g).all()": lambda: torch.isfinite(g).all(),
        "sanitize: where(ok, g, 0)": lambda: torch.where(ok, g, 0.0),
        "sanitize: nan_to_num(g, 0, 0, 0)": lambda: torch.nan_to_num(g, 0.0, 0.0, 0.0),
        "reference: g.clone()": lambda: g.clone(),
    }
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name in random.sample(list(candidates), len(candidates)):
            t0 = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - t0)
    print(f"\nmicro: one float32 tensor of {n / 1e6:.1f}M elements, median ms over {repeats}")
    for name, ts in times.items():
        print(f"  {name:<40s} {statistics.median(ts) * 1e3:8.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the workloads (smoke tests)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {platform.machine()} CPU ({torch.get_num_threads()} thread), torch {torch.__version__}")
    micro(int(4 * 2**20 * args.scale), repeats=10 * args.rounds)
    for wname, shapes in workloads(args.scale).items():
        n = sum(torch.Size(s).numel() for s in shapes)
        runs = {}
        for name, (dtype, kwargs) in CONFIGS.items():
            gen = torch.Generator().manual_seed(0)
            params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            opt = KProdigy(params, **kwargs)
            opt.step()  # creates the state
            runs[name] = (opt, [])
        order = list(runs)
        for _ in range(args.rounds):
            random.shuffle(order)
            for name in order:
                opt, times = runs[name]
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    opt.step()
                    times.append(time.perf_counter() - t0)
        print(
            f"\n{wname}: {len(shapes)} tensors, {n / 1e6:.2f}M params; median ms/step over {args.rounds}x{args.steps}"
        )
        medians = {name: statistics.median(times) for name, (_, times) in runs.items()}
        for name, med in medians.items():
            base = BASELINE.get(name)
            ratio = f"{med / medians[base]:.3f}x of '{base}'" if base else ""
            print(f"  {name:<50s} {med * 1e3:8.2f} ms  {ratio}")


if __name__ == "__main__":
    main()
