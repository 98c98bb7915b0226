"""The example outputs of docs/trainers-logging.md: ``diagnostics()`` and ``log_dict`` after 100
steps of a 16-64-1 MLP with a weight group at lr 1.0 and a bias group at lr 0.5 (one D, no bias
correction), and a bfloat16 run with bias correction whose D stays at d0 (60 steps).
Run: ``python examples/diagnostics_output.py`` (CPU, seconds)."""

from __future__ import annotations

import torch

import kprodigy
from kprodigy import KProdigy


def mlp_run(steps: int, dtype: torch.dtype = torch.float32, **kwargs: object) -> KProdigy:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)).to(dtype)
    X = torch.randn(256, 16).to(dtype)
    y = torch.sin(X.float() @ torch.randn(16, 1)).to(dtype)
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = KProdigy([{"params": weights}, {"params": biases, "lr": 0.5}], **kwargs)  # type: ignore[arg-type]
    for _ in range(steps):
        opt.zero_grad()
        ((model(X) - y) ** 2).mean().backward()
        opt.step()
    return opt


if __name__ == "__main__":
    opt = mlp_run(100)
    print(opt.diagnostics())
    print(repr(opt.diagnostics()[0]))
    for key, value in kprodigy.log_dict(opt).items():
        print(f"{key}: {value:g}")
    print(mlp_run(60, torch.bfloat16, use_bias_correction=True).diagnostics())
