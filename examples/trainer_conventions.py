"""The logging and per-parameter stepping conventions trainers use with Prodigy variants, checked on
KProdigy: run ``python examples/trainer_conventions.py`` (CPU, a few seconds).

1. ``effective_lr``: prodigy-plus-schedule-free puts the multiplier of D in this group key, and
   OneTrainer and musubi-tuner log ``d * effective_lr``. KProdigy's ``effective_lr`` is
   ``lr * bias_correction`` of the last step, so that ``d * effective_lr``, with the ``d`` that step
   used, is the step it applied: the group key ``step_size`` and the size of the update, measured
   here from the params themselves. Read after ``step()``, ``group["d"]`` is the D the step
   produced; where that step moved D, ``group["d"] * effective_lr`` is larger than the step
   applied by the ratio of the two Ds (the table shows both).
2. ``step_parameter(p, group, i)`` from the gradient hooks (OneTrainer's fused back pass,
   prodigy-plus-schedule-free, adv_optm), then ``step()``: the same params and D as ``step()``.

Each check prints its largest relative error; the script exits non-zero if one fails.
"""

from __future__ import annotations

import math
import sys

import torch

from kprodigy import KProdigy


def applied_step_sizes(bias_correction: bool, steps: int = 12) -> list[tuple[float, float, float, float]]:
    """Per step: (d before it * effective_lr, step_size, the measured size, group d after it * effective_lr).

    One tensor, betas (0, 0.999) and eps large enough to matter: the update is then exactly
    ``step_size * d_new * g / (sqrt(v) + d_new * eps)``, so its size is measured from the params."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, dtype=torch.float64))
    opt = KProdigy([p], betas=(0.0, 0.999), use_bias_correction=bias_correction)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (k + 1))  # a schedule that moves every step
    rows = []
    for _ in range(steps):
        g = p.detach() - 1.0  # a pull towards 1: D grows
        p.grad = g.clone()
        before, d_before = p.detach().clone(), opt.param_groups[0]["d"]
        opt.step()
        group = opt.param_groups[0]
        v = opt.state[p]["exp_avg_sq"]
        direction = group["d"] * g / (v.sqrt() + group["d"] * group["eps"])
        measured = float(((before - p.detach()) / direction).median())
        rows.append((d_before * group["effective_lr"], group["step_size"], measured, group["d"] * group["effective_lr"]))
        sched.step()
    return rows


def step_parameter_equals_step() -> float:
    """The largest relative difference of params and D between ``step_parameter(p, group, i)`` +
    ``step()`` and ``step()`` alone, over 20 steps of a small MLP in float64."""

    def run(hooks: bool) -> tuple[torch.Tensor, float]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()
        opt = KProdigy([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.5}])
        if hooks:
            for group in opt.param_groups:
                for i, q in enumerate(group["params"]):
                    q.register_post_accumulate_grad_hook(lambda t, group=group, i=i: opt.step_parameter(t, group, i))
        gen = torch.Generator().manual_seed(1)
        X, y = torch.randn(32, 8, generator=gen, dtype=torch.float64), torch.randn(32, 1, generator=gen, dtype=torch.float64)
        for _ in range(20):
            opt.zero_grad()
            ((model(X) - y) ** 2).mean().backward()
            opt.step()
        return torch.cat([q.detach().flatten() for q in model.parameters()]), opt.param_groups[0]["d"]

    (x_a, d_a), (x_b, d_b) = run(True), run(False)
    return max(float((x_a - x_b).norm() / x_b.norm()), abs(d_a - d_b) / d_b)


def main() -> int:
    failed = False
    for bc in (False, True):
        rows = applied_step_sizes(bc)
        err = max(max(abs(a - b) / b, abs(c - b) / b) for a, b, c, _ in rows)
        print(f"use_bias_correction={bc}: d (of the step) * effective_lr == step_size == measured step, "
              f"largest relative error {err:.1e}")
        print("  step  d_of_step*effective_lr  step_size   measured    group['d']*effective_lr (after)")
        for k, (a, b, c, after) in enumerate(rows[:6]):
            print(f"  {k:4d}  {a:.6e}            {b:.6e}  {c:.6e}  {after:.6e}")
        failed |= not err < 1e-9 or not all(math.isfinite(v) for row in rows for v in row)
    err = step_parameter_equals_step()
    print(f"step_parameter(p, group, i) + step() == step(): largest relative difference {err:.1e}")
    failed |= not err < 1e-9
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
