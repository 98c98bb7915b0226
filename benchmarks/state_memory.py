"""Optimizer state per parameter for every ``state_precision`` option, and what it costs in loss.

Run: ``PYTHONPATH=. nice python benchmarks/state_memory.py`` (CPU, 1 thread). Two tables:

1. bytes of optimizer state per parameter, counted from the storages behind ``optimizer.state``
   (each storage once) after one step, on a stand-in of a transformer (an embedding, 4 blocks of
   attention and MLP weights, biases and norms: 4.2M params), for float32 and bfloat16 params x
   ``state_precision`` x ``slice_p`` (1, 11) x ``factored``, beside prodigyopt 1.1.2. Exact and
   machine-free.
2. (``--loss``) final training loss and final D relative to float32 state on convergence-suite
   tasks (``convergence.py``'s ``train_run``: its data, models, cosine schedule and seeds), for
   float32 params and for bfloat16 params (the task's data cast to bfloat16, as
   ``bias_correction.py`` does), 3 seeds; prodigyopt beside them.

With ``--out``/``--update-results`` it writes ``state_memory.md``/``.json`` (``_output``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _output  # noqa: E402

from kprodigy import KProdigy  # noqa: E402

torch.set_num_threads(1)

PRECISIONS = ("float32", "bfloat16", "int8", "auto")
LOSS_TASKS = ("logreg-digits", "fmnist-mlp", "mnist1d-mlp", "mnist1d-cnn")
NO_BF16 = ("mnist1d-cnn", "fmnist-cnn")  # SmallCNN's forward mixes a float32 bias into bfloat16 inputs


def stand_in(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    d, blocks = 256, 4
    layers: list[nn.Module] = [nn.Embedding(4096, d)]
    for _ in range(blocks):
        layers += [nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d), nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)]
    return nn.Sequential(*layers).to(dtype)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    seen: dict[int, int] = {}
    for st in opt.state.values():
        for t in st.values():
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def bytes_per_param(dtype: torch.dtype, make: type, **kw: object) -> float:
    model = stand_in(dtype)
    opt = make(model.parameters(), **kw)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    return state_bytes(opt) / sum(p.numel() for p in model.parameters())


def memory_table() -> tuple[list[str], dict]:
    import prodigyopt

    rows, results = [], {}
    n = sum(p.numel() for p in stand_in(torch.float32).parameters())
    for dtype, name in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):
        for slice_p in (1, 11):
            theirs = bytes_per_param(dtype, prodigyopt.Prodigy, slice_p=slice_p)
            results[f"{name}/prodigyopt/slice_p={slice_p}"] = theirs
            rows.append(f"| {name} | prodigyopt 1.1.2 | {slice_p} | - | {theirs:.2f} |")
            for precision in PRECISIONS:
                for factored in (False, True):
                    b = bytes_per_param(dtype, KProdigy, state_precision=precision, slice_p=slice_p, factored=factored)
                    results[f"{name}/{precision}/slice_p={slice_p}/factored={factored}"] = b
                    rows.append(f"| {name} | `{precision}` | {slice_p} | {'yes' if factored else 'no'} | {b:.2f} |")
    head = [
        f"State bytes per parameter (storages behind `optimizer.state`, after one step; {n:,} params: "
        "an embedding and 4 transformer blocks of width 256).",
        "",
        "| params | state | slice_p | factored | B/param |",
        "|---|---|---:|---|---:|",
    ]
    return head + rows, results


def loss_table(tasks: list[str], seeds: list[int], scale: float) -> tuple[list[str], dict]:
    import convergence as C

    all_tasks = C.build_tasks(scale)
    settings = {
        "float32": [
            ("float32 state", "kprodigy", {"state_precision": "float32"}),
            ("bfloat16", "kprodigy", {"state_precision": "bfloat16"}),
            ("int8", "kprodigy", {"state_precision": "int8"}),
            ("prodigyopt", "prodigyopt", {}),
            ("float32 state, slice_p=11", "kprodigy", {"state_precision": "float32", "slice_p": 11}),
            ("int8, slice_p=11", "kprodigy", {"state_precision": "int8", "slice_p": 11}),
        ],
        "bfloat16": [
            ("float32 state", "kprodigy", {"state_precision": "float32"}),
            ("auto (bfloat16)", "kprodigy", {}),
            ("prodigyopt", "prodigyopt", {}),
            ("float32 state, slice_p=11", "kprodigy", {"state_precision": "float32", "slice_p": 11}),
            ("int8, slice_p=11", "kprodigy", {"state_precision": "int8", "slice_p": 11}),
        ],
    }
    results: dict = {}
    lines = []
    for dtype_name, configs in settings.items():
        lines += [
            "",
            f"{dtype_name} params: final training loss, mean over seeds {seeds} (ratio to float32 state with the "
            "same slice_p; final D ratio)",
            "",
            "| task | " + " | ".join(c[0] for c in configs) + " |",
            "|---|" + "---:|" * len(configs),
        ]
        for name in tasks:
            if dtype_name == "bfloat16" and name in NO_BF16:
                continue
            task = all_tasks[name]
            data = task.build_data(scale)
            if dtype_name == "bfloat16":
                data = C.T.Data(data.x.bfloat16(), data.y, data.x_test.bfloat16(), data.y_test, data.note)
            cells: list[str] = []
            bases: dict[int, tuple[float, float]] = {}  # slice_p -> float32 state's (loss, D)
            for label, kind, kw in configs:
                runs = []
                t0 = time.perf_counter()
                for seed in seeds:
                    r = C.train_run(task, data, C.OptConfig(label, kind, kwargs=dict(kw)), seed, task.steps, scale)
                    runs.append(r)
                loss = statistics.mean(r["train_loss"] for r in runs)
                d = statistics.mean(r["d_curve"][0][-1] for r in runs) if runs[0]["d_curve"] else math.nan
                results[f"{dtype_name}/{name}/{label}"] = {
                    "train_loss": [r["train_loss"] for r in runs], "final_d": [r["d_curve"][0][-1] for r in runs],
                    "d_curve": [r["d_curve"][0] for r in runs], "seconds": time.perf_counter() - t0,
                }
                base, base_d = bases.setdefault(int(kw.get("slice_p", 1)), (loss, d))
                if label.startswith("float32 state"):
                    cells.append(f"{loss:.4g}")
                else:
                    cells.append(f"{loss:.4g} ({loss / base:.3f}; D {d / base_d:.3f})")
                print(dtype_name, name, label, cells[-1], flush=True)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines, results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", action="store_true", help="also train the convergence tasks (minutes)")
    parser.add_argument("--tasks", default=",".join(LOSS_TASKS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="step budget multiplier (< 1: a smoke run)")
    _output.add_arguments(parser)
    args = parser.parse_args(argv)
    lines, results = memory_table()
    results = {"bytes_per_param": results, "torch": torch.__version__}
    if args.loss:
        more, losses = loss_table(args.tasks.split(","), list(range(args.seeds)), args.scale)
        lines += more
        results["losses"] = losses
    text = "\n".join(["# Optimizer state per parameter, and final loss by state_precision", "", *lines])
    _output.write_report(_output.output_dir(args.out, args.update_results), "state_memory", text, results)


if __name__ == "__main__":
    main()
