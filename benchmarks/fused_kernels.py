"""The two compiled passes of the fused step on one large tensor, against torch's fused AdamW.

Usage (from the repository root)::

    PYTHONPATH=$PWD python benchmarks/fused_kernels.py [--numel 8388608] [--calls 15]

Times, interleaved in one process (median of ``--calls``): the accumulate pass with and without
the in-loop zeroing of non-finite gradients, the apply pass, both also compiled with static
shapes, one fused AdamW step and one copy of the tensor. Prints a markdown table with each
time's ratio to the AdamW step. Use ``TORCH_LOGS=output_code`` to see the generated loops.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kprodigy.functional import _fused
from kprodigy.functional._scalars import Coefficients


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=4096 * 2048)
    ap.add_argument("--calls", type=int, default=15)
    args = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    x, g, m, v, s, p0 = (torch.randn(args.numel, generator=gen) for _ in range(6))
    v.abs_()

    def scalar(value: float) -> torch.Tensor:
        return torch.tensor(value)

    c = Coefficients(*(scalar(1e-3) for _ in range(5)))
    acc_kw = dict(betas=(scalar(0.9), scalar(0.999)), beta3=scalar(0.9995), d=scalar(1e-3), c=c, slice_p=1)
    app_kw = dict(dlr=scalar(1e-3), d_old=scalar(1e-3), d_new=scalar(1e-3), eps=1e-8, keep=None)
    acc, app = _fused._compiled("accumulate"), _fused._compiled("apply")
    acc_static = torch.compile(_fused._accumulate_1d, fullgraph=True, dynamic=False)
    app_static = torch.compile(_fused._apply_1d, fullgraph=True, dynamic=False)
    def acc_nan_to_num_fn(g: torch.Tensor, *a: torch.Tensor, **kw: object) -> object:  # before change 5
        return _fused._accumulate_1d(x, torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0), *a, **kw)  # type: ignore[arg-type]

    acc_nan_to_num = torch.compile(acc_nan_to_num_fn, fullgraph=True, dynamic=True)
    param = torch.nn.Parameter(x.clone())
    param.grad = g.clone()
    adamw = torch.optim.AdamW([param], lr=1e-3, fused=True)
    runs = {
        "accumulate (skip: zero non-finite g)": lambda: acc(x, g, m, v, s, p0, update_d=True, sanitize=True, **acc_kw),
        "accumulate (skip: nan_to_num, before change 5)": lambda: acc_nan_to_num(g, m, v, s, p0, update_d=True, **acc_kw),
        "accumulate (no skip)": lambda: acc(x, g, m, v, s, p0, update_d=True, **acc_kw),
        "accumulate, static shapes": lambda: acc_static(x, g, m, v, s, p0, update_d=True, sanitize=True, **acc_kw),
        "apply": lambda: app(x, g, m, v, **app_kw),
        "apply, static shapes": lambda: app_static(x, g, m, v, **app_kw),
        "AdamW fused step": adamw.step,
        "copy (2 words)": lambda: m.copy_(v),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():  # compile and warm up
        fn()
        fn()
    for _ in range(args.calls):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[name].append(1e3 * (time.perf_counter() - t))
    ref = statistics.median(times["AdamW fused step"])
    lines = [
        f"# Fused passes on one tensor of {args.numel} float32 elements, {torch.get_num_threads()} threads,"
        f" torch {torch.__version__}",
        "",
        f"Command: `python benchmarks/fused_kernels.py --numel {args.numel} --calls {args.calls}`",
        "",
        "| kernel | ms | / AdamW fused step |",
        "|---|---:|---:|",
    ]
    for name, ts in times.items():
        ms = statistics.median(ts)
        lines.append(f"| {name} | {ms:.2f} | {ms / ref:.2f} |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
