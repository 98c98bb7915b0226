"""Low precision: how closely bfloat16/float16 runs track float32, and what stochastic rounding keeps.

Usage (from the repository root)::

    PYTHONPATH=$PWD nice python benchmarks/low_precision.py     # a few seconds

1. A small MLP (5-64-64-1, MSE on 256 random points) trained 200 steps with lr=1, d0=1e-3 from the
   same initial weights in float32 and in 16-bit variants: final loss, D, and the relative
   distance of the final weights to the float32 run.
2. 4096 weights at 1.0, constant gradient, D pinned at 1e-3 (d_coef=1e-12), b1=0 with bias
   correction so each step moves every weight by 1e-3: the mean after 40 steps in float32,
   bfloat16 with round-to-nearest and bfloat16 with stochastic rounding.
"""

from __future__ import annotations

import platform

import torch

from kprodigy import KProdigy


def mlp_run(dtype: torch.dtype, steps: int = 200, **kwargs) -> tuple[float, float, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)
    )
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(256, 5, generator=gen)
    y = torch.sin(X.sum(1, keepdim=True)) + 0.1 * torch.randn(256, 1, generator=gen)
    model, Xd = model.to(dtype), X.to(dtype)
    opt = KProdigy(model.parameters(), d0=1e-3, **kwargs)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(Xd).float() - y) ** 2).mean()
        loss.backward()
        opt.step()
    weights = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    return loss.item(), opt.param_groups[0]["d"], weights


def small_updates(dtype: torch.dtype, sr: bool, n: int = 4096, steps: int = 40) -> float:
    torch.manual_seed(0)
    x = torch.nn.Parameter(torch.ones(n, dtype=dtype))
    opt = KProdigy([x], betas=(0.0, 0.999), use_bias_correction=True, d0=1e-3, d_coef=1e-12, stochastic_rounding=sr)
    for _ in range(steps):
        x.grad = torch.ones_like(x)
        opt.step()
    return x.detach().float().mean().item()


def main() -> None:
    torch.set_num_threads(1)
    print(f"machine: {platform.machine()} CPU, torch {torch.__version__}\n")
    print("1. MLP, 200 steps: final loss, D, |w - w_fp32| / |w_fp32|")
    ref_loss, ref_d, ref_w = mlp_run(torch.float32)
    print(f"  {'float32':<46s} loss {ref_loss:.5f}  D {ref_d:.4e}")
    for name, dtype, kwargs in (
        ("bfloat16, float32 state", torch.bfloat16, dict(state_precision="float32")),
        ("bfloat16, float32 state, stochastic rounding", torch.bfloat16, dict(state_precision="float32", stochastic_rounding=True)),
        ("bfloat16, bfloat16 state (default)", torch.bfloat16, {}),
        ("float16, float32 state", torch.float16, dict(state_precision="float32")),
    ):
        loss, d, w = mlp_run(dtype, **kwargs)
        dist = ((w - ref_w).norm() / ref_w.norm()).item()
        print(f"  {name:<46s} loss {loss:.5f}  D {d:.4e}  weights off by {dist:.3f}")
    print("\n2. 40 steps of 1e-3 on weights at 1.0: mean weight (float32 moves to 0.96)")
    for name, dtype, sr in (
        ("float32", torch.float32, False),
        ("bfloat16, round to nearest", torch.bfloat16, False),
        ("bfloat16, stochastic rounding", torch.bfloat16, True),
    ):
        print(f"  {name:<46s} {small_updates(dtype, sr):.5f}")


if __name__ == "__main__":
    main()
