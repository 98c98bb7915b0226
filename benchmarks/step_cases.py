"""Step time on cases beside the standard workloads, K-Prodigy against prodigyopt, one process.

Cases: the convergence suite's 2-tensor logistic regression (iris: a 3x4 weight and a bias), a
ConvNet of ~1.2M params (8 conv weights, batch-norm-sized vectors, a linear head) with its conv
weights contiguous and in channels_last (as timm's ``--channels-last`` lays them), and a group of
24 tensors of which one has transposed strides. Timed as ``small_models.bench`` times its
workloads (a quadratic pull plus fixed noise laid as the params, recomputed outside the timed
region; shuffled rounds, the first a warm-up; the per-step median).

Usage (from the repository root)::

    PYTHONPATH=$PWD python benchmarks/step_cases.py              # [--rounds N] [--threads T]
    PYTHONPATH=$PWD python benchmarks/step_cases.py --update-results
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import _output
import convergence as C  # code_version, machine_description: the header every benchmark writes
import prodigyopt
import small_models
import torch

from kprodigy import KProdigy

Case = Callable[[torch.Generator], list[torch.Tensor]]


def _logreg(gen: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(3, 4, generator=gen), torch.randn(3, generator=gen)]


def _convnet(channels_last: bool) -> Case:
    def make(gen: torch.Generator) -> list[torch.Tensor]:
        out, c = [], 3
        for w in (32, 64, 128, 256):
            for shape in ((w, c, 3, 3), (w,), (w,), (w, w, 3, 3), (w,), (w,)):
                x = torch.randn(shape, generator=gen) * 0.05
                out.append(x.to(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x)
            c = w
        return out + [torch.randn(10, 256, generator=gen) * 0.05, torch.randn(10, generator=gen)]

    return make


def _one_transposed(gen: torch.Generator) -> list[torch.Tensor]:
    xs = [torch.randn((256, 256) if i % 3 else (256,), generator=gen) for i in range(24)]
    xs[1] = xs[1].t().contiguous().t()  # (a 256x256 one) the same values with transposed strides
    assert not xs[1].is_contiguous()
    return xs


CASES: dict[str, Case] = {
    "logistic regression (2 tensors, 15 params)": _logreg,
    "ConvNet, contiguous (1.18M params)": _convnet(False),
    "ConvNet, channels_last conv weights": _convnet(True),
    "24 tensors, one with transposed strides": _one_transposed,
}
OPTIMIZERS = {"kprodigy": KProdigy, "prodigyopt": prodigyopt.Prodigy}


def time_case(label: str, case: Case, rounds: int) -> dict[str, float]:
    """Median microseconds per step of each optimizer on ``case`` (``small_models.bench``'s rounds)."""
    base = case(torch.Generator().manual_seed(0))
    steps = 200 if sum(x.numel() for x in base) < 10_000 else 5
    makers = {name: (lambda ps, cls=cls: cls(ps, lr=1.0)) for name, cls in OPTIMIZERS.items()}
    res = small_models.bench(label, rounds, steps, makers, base=base)
    return {name: res[name] * 1e3 for name in OPTIMIZERS}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    _output.add_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = [
        "# Step time on other cases: K-Prodigy against prodigyopt",
        "",
        f"{C.code_version()}; {C.machine_description()}; median us per step over "
        f"{args.rounds} shuffled rounds (`python benchmarks/step_cases.py`)",
        "",
        "| case | kprodigy us | prodigyopt us | prodigyopt / kprodigy |",
        "|---|---:|---:|---:|",
    ]
    results = {}
    for label, case in CASES.items():
        med = time_case(label, case, args.rounds)
        results[label] = med
        lines.append(
            f"| {label} | {med['kprodigy']:.1f} | {med['prodigyopt']:.1f} | {med['prodigyopt'] / med['kprodigy']:.2f}x |"
        )
        print(lines[-1], flush=True)
    _output.write_report(_output.output_dir(args.out, args.update_results), "step_cases_cpu", "\n".join(lines), results)


if __name__ == "__main__":
    main()
