"""The two compiled passes of the fused step on one large tensor, against torch's fused AdamW.

Usage (from the repository root)::

    PYTHONPATH=$PWD python benchmarks/fused_kernels.py [--numel 8388608] [--calls 15]

Times, interleaved in one process (median of ``--calls``): the statistics pass and the update
pass of the fused step (with the skip's select, and without), the update pass compiled with
static shapes, one fused AdamW step and one copy of the tensor. Prints a markdown table with each
time's ratio to the AdamW step. Use ``TORCH_LOGS=output_code`` to see the generated loops. (The
passes as they were before changes 9 and 5 of benchmarks/NOTES.md are in results/fused_kernels_cpu.md.)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kprodigy.functional import _fused
from kprodigy.functional._scalars import StepScalars


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

    b1, b2 = scalar(0.9), scalar(0.999)
    sc = StepScalars(
        numerator_scale=scalar(1e-3),
        s_scale=scalar(1e-3),
        beta3=scalar(0.9995),
        dlr=scalar(1e-3),
        weight=scalar(1e-3),
        betas=(b1, b2),  # type: ignore[arg-type]  # 0-dim tensors, as the fused path passes them
        decays=(b1, b2),
        keep=None,
        eps=1e-8,
    ).finish(scalar(1e-3), None)
    stats, update = _fused._compiled("statistics"), _fused._compiled("update")
    # this script compiles the update kernel once more (static shapes): more graphs per code
    # object than dynamo's default limit, raised for this process (a script's choice)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    ok = torch.ones((), dtype=torch.bool)  # the skip's decision: the update pass selects by it
    update_static = torch.compile(_fused._update_1d, fullgraph=True, dynamic=False)
    param = torch.nn.Parameter(x.clone())
    param.grad = g.clone()
    adamw = torch.optim.AdamW([param], lr=1e-3, fused=True)
    runs = {
        "statistics pass (4 words)": lambda: stats(x, g, s, p0, sc, 1),
        "update pass (9 words)": lambda: update(x, g, m, v, s, sc, 1, ok),
        "update pass, no skip": lambda: update(x, g, m, v, s, sc, 1, None),
        "update pass, static shapes": lambda: update_static(x, g, m, v, s, sc, 1, ok),
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
