"""bfloat16 state: stochastic rounding against round-to-nearest, the evidence for "auto" (issue 22).

Run: ``PYTHONPATH=. nice python benchmarks/bf16_rounding.py`` (CPU, 1 thread, several minutes).
bfloat16 params on convergence-suite tasks (``convergence.py``'s ``train_run``, data cast to
bfloat16), 3 seeds: float32 state, bfloat16 state written with stochastic rounding (what "auto"
ships), and bfloat16 state rounded to nearest (``_robust.stochastic_round`` replaced by a cast for
the run: prodigyopt's behaviour with bfloat16 state). Reports the final training loss, its ratio
to float32 state and the final D ratio. With ``--out``/``--update-results`` it writes
``bf16_rounding.md``/``.json`` (``_output``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _output  # noqa: E402
import convergence as C  # noqa: E402

from kprodigy.functional import _robust  # noqa: E402

torch.set_num_threads(1)

TASKS = ("logreg-digits", "fmnist-mlp", "mnist1d-mlp")


def run(task_name: str, kw: dict, nearest: bool, seeds: list[int]) -> list[dict]:
    task = C.build_tasks()[task_name]
    d = task.build_data(1.0)
    data = C.T.Data(d.x.bfloat16(), d.y, d.x_test.bfloat16(), d.y_test, d.note)
    original = _robust.stochastic_round
    if nearest:
        _robust.stochastic_round = lambda x, dtype: x.to(dtype)  # type: ignore[assignment]
    try:
        return [C.train_run(task, data, C.OptConfig("k", "kprodigy", kwargs=dict(kw)), s, task.steps) for s in seeds]
    finally:
        _robust.stochastic_round = original  # type: ignore[assignment]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    _output.add_arguments(parser)
    args = parser.parse_args(argv)
    seeds = list(range(args.seeds))
    configs = [
        ("float32 state", {"state_precision": "float32"}, False),
        ("bfloat16, stochastic rounding (auto)", {}, False),
        ("bfloat16, round to nearest", {}, True),
    ]
    lines = [
        "# bfloat16 params: bfloat16 state with stochastic rounding vs round-to-nearest",
        "",
        f"Final training loss, mean over seeds {seeds} (ratio to float32 state; final D ratio). "
        f"torch {torch.__version__}, 1 thread.",
        "",
        "| task | " + " | ".join(c[0] for c in configs) + " |",
        "|---|" + "---:|" * len(configs),
    ]
    results: dict = {}
    for name in TASKS:
        cells, base = [], None
        for label, kw, nearest in configs:
            runs = run(name, kw, nearest, seeds)
            loss = statistics.mean(r["train_loss"] for r in runs)
            dd = statistics.mean(r["d_curve"][0][-1] for r in runs)
            results[f"{name}/{label}"] = {"train_loss": [r["train_loss"] for r in runs], "final_d": [r["d_curve"][0][-1] for r in runs]}
            if base is None:
                base = (loss, dd)
                cells.append(f"{loss:.4g}")
            else:
                cells.append(f"{loss:.4g} ({loss / base[0]:.3f}; D {dd / base[1]:.3f})")
            print(name, label, cells[-1], flush=True)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    _output.write_report(_output.output_dir(args.out, args.update_results), "bf16_rounding", "\n".join(lines), results)


if __name__ == "__main__":
    main()
