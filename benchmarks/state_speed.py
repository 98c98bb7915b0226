"""Step time by ``state_precision``, as a ratio to the float32-state step (issue 22).

Run: ``PYTHONPATH=. nice python benchmarks/state_speed.py`` (CPU, 1 thread, a few minutes).
``step_speed.py``'s workloads (``--size full`` as there; the default ``medium`` is a smaller copy
of each: 300 x 64x64, a GPT-like stack of width 256, 4 x 1024x1024) for float32 and bfloat16
params; per optimizer the median step over ``--rounds`` rounds of ``--steps`` steps, run
interleaved in a shuffled order in one process, so that only ratios are compared. With
``--out``/``--update-results`` it writes ``state_speed_cpu.md``/``.json`` (``_output``).
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _output  # noqa: E402
import step_speed  # noqa: E402

from kprodigy import KProdigy  # noqa: E402

torch.set_num_threads(1)


def sizes(size: str) -> dict[str, list[tuple[int, ...]]]:
    if size != "medium":
        return step_speed.workloads(size)
    return {
        "300 small": [(64, 64)] * 300,
        "GPT-like": step_speed._gpt(vocab=4096, d=256, layers=4),
        "4 large": [(1024, 1024)] * 4,
    }


def optimizers(dtype: torch.dtype) -> dict[str, object]:
    opts: dict[str, object] = {
        "float32 state": lambda ps: KProdigy(ps, state_precision="float32"),
        "bfloat16 state": lambda ps: KProdigy(ps, state_precision="bfloat16"),
        "int8 state": lambda ps: KProdigy(ps, state_precision="int8"),
        "int8 state, slice_p=11": lambda ps: KProdigy(ps, state_precision="int8", slice_p=11),
    }
    try:
        import prodigyopt

        opts["prodigyopt"] = lambda ps: prodigyopt.Prodigy(ps, lr=1.0)
    except ImportError:
        pass
    return opts


def run(shapes: list[tuple[int, ...]], dtype: torch.dtype, rounds: int, steps: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
    built = {}
    for name, factory in optimizers(dtype).items():
        params = [torch.nn.Parameter(b.to(dtype)) for b in base]
        for p, g in zip(params, grads):
            p.grad = g.to(dtype)
        opt = factory(params)  # type: ignore[operator]
        opt.step()
        opt.step()
        built[name] = opt
    times: dict[str, list[float]] = {name: [] for name in built}
    order = list(built)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            for _ in range(steps):
                t = time.perf_counter()
                built[name].step()
                times[name].append(time.perf_counter() - t)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="medium", choices=["tiny", "medium", "full"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    _output.add_arguments(parser)
    args = parser.parse_args(argv)
    results: dict = {}
    lines = [
        "# Step time by state_precision (ratio to the float32-state step of the same params)",
        "",
        f"CPU ({platform.machine()}), torch {torch.__version__}, 1 thread; size {args.size}, median of "
        f"{args.rounds} x {args.steps} steps per optimizer, interleaved. Absolute ms are for this shared machine only.",
        "",
    ]
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        cols = list(optimizers(dtype))
        lines += [f"{name} params:", "", "| workload | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        for wl, shapes in sizes(args.size).items():
            ms = run(shapes, dtype, args.rounds, args.steps)
            results[f"{name}/{wl}"] = ms
            base = ms["float32 state"]
            lines.append(f"| {wl} | " + " | ".join(f"{ms[c]:.1f} ms ({ms[c] / base:.2f}x)" for c in cols) + " |")
            print(lines[-1], flush=True)
        lines.append("")
    _output.write_report(_output.output_dir(args.out, args.update_results), "state_speed_cpu", "\n".join(lines), results)


if __name__ == "__main__":
    main()
