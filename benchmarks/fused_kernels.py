"""The two compiled passes of the fused step on one large tensor, against torch's fused AdamW.

Usage (from the repository root)::

    PYTHONPATH=$PWD python benchmarks/fused_kernels.py [--numel 8388608] [--calls 15]

Times, interleaved in one process (median of ``--calls``): the statistics pass and the update
pass of the fused step (the skip's zeroing of non-finite gradients on), the update pass compiled
with static shapes, the passes as they were before changes 9 and 5 of benchmarks/NOTES.md, one
fused AdamW step and one copy of the tensor. Prints a markdown table with each
time's ratio to the AdamW step. Use ``TORCH_LOGS=output_code`` to see the generated loops.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from kprodigy.functional import _fused, _single
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
    app_kw = dict(dlr=scalar(1e-3), d_new=scalar(1e-3), eps=1e-8, keep=None)
    stats, update = _fused._compiled("statistics"), _fused._compiled("update")
    # this script compiles the same kernels several more ways (static shapes, older variants): more
    # graphs per code object than dynamo's default limit, raised for this process (a script's choice)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    ok = torch.ones((), dtype=torch.bool)  # the skip's decision: the update pass selects by it
    def old_acc_fn(g: torch.Tensor, *a: torch.Tensor, **kw: object) -> object:  # before change 9 (after 5)
        zeroed = torch.where(torch.abs(g) < math.inf, g, 0.0)  # the skip's zeroing of non-finite g
        return _fused._accumulate_1d(x, zeroed, *a, **kw)  # type: ignore[arg-type]

    old_acc = torch.compile(old_acc_fn, fullgraph=True, dynamic=True)

    def old_apply_fn(x: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, **kw: object) -> None:
        _single.apply([x], [g], [m], [v], inplace=True, **kw)  # type: ignore[arg-type]

    def acc_nan_to_num_fn(g: torch.Tensor, *a: torch.Tensor, **kw: object) -> object:  # before change 5
        return _fused._accumulate_1d(x, torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0), *a, **kw)  # type: ignore[arg-type]

    old_apply = torch.compile(old_apply_fn, fullgraph=True, dynamic=True)
    acc_nan_to_num = torch.compile(acc_nan_to_num_fn, fullgraph=True, dynamic=True)
    update_static = torch.compile(_fused._update_1d, fullgraph=True, dynamic=False)
    param = torch.nn.Parameter(x.clone())
    param.grad = g.clone()
    adamw = torch.optim.AdamW([param], lr=1e-3, fused=True)
    runs = {
        "statistics pass (4 words)": lambda: stats(x, g, None, None, s, p0, update_d=True, write=False, **acc_kw),
        "update pass (9 words)": lambda: update(x, g, m, v, s, update_d=True, ok=ok, **acc_kw, **app_kw),
        "update pass, no skip": lambda: update(x, g, m, v, s, update_d=True, **acc_kw, **app_kw),
        "update pass, static shapes": lambda: update_static(x, g, m, v, s, update_d=True, ok=ok, **acc_kw, **app_kw),
        "before change 9: accumulate (11 words)": lambda: old_acc(g, m, v, s, p0, update_d=True, **acc_kw),
        "before change 9: apply (4 words)": lambda: old_apply(x, g, m, v, **app_kw),
        "before change 5: accumulate with nan_to_num": lambda: acc_nan_to_num(g, m, v, s, p0, update_d=True, **acc_kw),
        "AdamW fused step (7 words)": adamw.step,
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
    ref = statistics.median(times["AdamW fused step (7 words)"])
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
