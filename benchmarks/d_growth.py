"""How D grows over a run: the evidence behind KProdigy's "D stuck" and "D still growing" warnings.

    python benchmarks/d_growth.py            # convergence tasks + two pathological runs, ~3 min on 2 cores
    python benchmarks/d_growth.py --quick    # smoke run

For every convergence task (``convergence.build_tasks``, seed 0, its step budget) K-Prodigy is
trained with the options of both default sets (``use_bias_correction`` False / True, one D), under
the suite's cosine schedule and under a constant lr, and D is recorded after every step. Printed
per run: D/d0 after 10 and 50 steps, and the growth of D over the second half of the steps taken
so far, d(k) / d(k/2), at k = 128, 256, 512, 1024 (the ratio the late-growth warning measures).
Two runs where D keeps growing by design of the problem are the candidate positive cases:
logistic regression on separable data without L2 (no finite minimizer), and a linear regression
whose targets move 100x farther at step 300 (a late change of scale).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import convergence as C  # noqa: E402
import convergence_tasks as T  # noqa: E402

from kprodigy import KProdigy  # noqa: E402

MARKS = (128, 256, 512, 1024, 2048)


def trajectory(model: nn.Module, batches, steps: int, loss_fn, schedule: str, **kwargs) -> tuple[list[float], list[float]]:
    opt = KProdigy(model.parameters(), independent_d=False, **kwargs)
    ds, steps_ = [], []
    for t, (xb, yb) in enumerate(batches):
        if schedule == "cosine":
            opt.param_groups[0]["lr"] = 0.5 * (1.0 + math.cos(math.pi * t / steps))
        loss = loss_fn(model, xb, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ds.append(float(opt.param_groups[0]["d"]))
        steps_.append(float(opt.param_groups[0]["d"]) * opt.param_groups[0]["lr"])
    return ds, steps_


def summary(ds: list[float], dlrs: list[float], d0: float = 1e-6) -> dict[str, float]:
    out = {"steps": len(ds), "g10": ds[min(9, len(ds) - 1)] / d0, "g50": ds[min(49, len(ds) - 1)] / d0,
           "final": ds[-1] / d0}
    for k in MARKS:
        if k <= len(ds):
            out[f"half{k}"] = round(ds[k - 1] / ds[k // 2 - 1], 3)
            out[f"dlr{k}"] = round(dlrs[k - 1] / dlrs[k // 2 - 1], 3)  # the same for d * lr (the step size)
    for key in ("g10", "g50", "final"):
        out[key] = float(f"{out[key]:.4g}")
    return out


def separable_logreg(steps: int):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 10, generator=gen)
    y = (x[:, 0] > 0).long()  # linearly separable: the loss has no minimizer (weights -> infinity)
    torch.manual_seed(0)
    model = nn.Linear(10, 2)
    return model, [(x, y)] * steps, lambda m, a, b: nn.functional.cross_entropy(m(a), b)


def late_shift(steps: int, shift_at: int = 300):
    """Linear regression whose targets move 100x farther at step ``shift_at`` (a late change of scale,
    like unfreezing layers or switching on a loss term): the D it needs grows late."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 10, generator=gen)
    w_true = torch.randn(10, 1, generator=gen)
    torch.manual_seed(0)
    model = nn.Linear(10, 1)
    batches = [(x, x @ w_true * (1.0 if t < shift_at else 100.0)) for t in range(steps)]
    return model, batches, lambda m, a, b: ((m(a) - b) ** 2).mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default="")
    parser.add_argument("--only", choices=["tasks", "pathological"], default=None)
    args = parser.parse_args()
    scale = 0.1 if args.quick else 1.0
    tasks = C.build_tasks(scale)
    rows = []
    t0 = time.perf_counter()
    for name, task in tasks.items() if args.only != "pathological" else ():
        if task.two_component:
            continue  # its pretraining runs 1500 AdamW steps: covered by the independent-D rows of convergence.py
        data = task.build_data(scale)
        for schedule in ("cosine", "constant"):
            for bc in (False, True):
                torch.manual_seed(0)
                model = task.build_model(data)
                l2 = T.LOGREG_L2 if task.convex else 0.0
                gen = torch.Generator().manual_seed(1_000)
                batches = C._batches(data, task.batch_size, task.steps, gen)
                ds, dlrs = trajectory(model, batches, task.steps, lambda m, a, b, l2=l2: T.objective(m, a, b, l2), schedule,
                                      use_bias_correction=bc)
                rows.append({"run": name, "schedule": schedule, "bc": bc, **summary(ds, dlrs)})
                print(json.dumps(rows[-1]), flush=True)
    steps = 200 if args.quick else 2048
    pathological = (("separable-logreg", separable_logreg), ("late-shift", late_shift))
    for name, build in pathological if args.only != "tasks" else ():
        for bc in (False, True):
            for schedule in ("constant", "cosine"):
                model, batches, loss_fn = build(steps)
                ds, dlrs = trajectory(model, batches, steps, loss_fn, schedule, use_bias_correction=bc)
                rows.append({"run": name, "schedule": schedule, "bc": bc, **summary(ds, dlrs)})
                print(json.dumps(rows[-1]), flush=True)
    print(f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
