"""Where does ``use_bias_correction=True`` start to pay off? Final loss against run length and
against lr warm-up, with and without ``safeguard_warmup``, over tasks of different model types.

    python benchmarks/bias_correction.py                    # the study: 51 min on the shared 2-core CPU
    python benchmarks/bias_correction.py --quick            # smoke test (seconds): not results
    python benchmarks/bias_correction.py --tasks mnist1d-mlp,lm --seeds 2
    python benchmarks/bias_correction.py --update-results   # benchmarks/results/presets/bias_correction.{md,json}
    python benchmarks/bias_correction.py --tasks mnist1d-mlp-bf16 --name bias_correction_bf16 --update-results
    python benchmarks/bias_correction.py --tasks fmnist-mlp,fmnist-cnn --lengths 3 --warmups 0 --name bias_correction_fmnist_3x

Tasks: from the convergence suite (``convergence.build_tasks``) a convex one (L2-regularised
logistic regression on scikit-learn's digits), two MLPs (Fashion-MNIST, MNIST-1D) and two CNNs
(Fashion-MNIST 2-D, MNIST-1D), and the byte-level transformer LM of ``lm_task.py``. Every run is
K-Prodigy at ``lr=1`` untuned, with the suite's rules (same initialisation and data order for
every setting, no weight decay) and a cosine lr schedule over the run; the four settings are
``use_bias_correction`` off/on times ``safeguard_warmup`` off/on.

Axis 1, run length: 0.1x, 0.3x, 1x and 3x each task's suite budget, each length a separate run
whose cosine spans it; no warm-up. To fit the time on a shared 2-core CPU, the Fashion-MNIST tasks
stop at 1x and the LM (budget 1000 steps) at 0.3x: its 1x runs are those of ``lm_task.py``.
Optional task ``mnist1d-mlp-bf16`` (not in the default list): the MNIST-1D MLP with bfloat16
params and inputs (K-Prodigy keeps its state in float32 by default, ``fp32_state=True``).
Axis 2, warm-up: a linear lr warm-up over 5% and 25% of the run before the cosine, against none,
at 0.3x the budget (where bias correction and ``safeguard_warmup`` act most).
Measured: the final loss: the full training objective for the suite tasks (what the suite
reports), the validation loss for the LM (nats per byte); test accuracy beside it. Reported per
task: mean over seeds, and the ratio with bias correction to without (geometric mean of the
per-seed ratios; below 1 means bias correction helped), with and without ``safeguard_warmup``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _output  # noqa: E402
import convergence as C  # noqa: E402
import lm_task as L  # noqa: E402

TASKS = ("logreg-digits", "fmnist-mlp", "mnist1d-mlp", "fmnist-cnn", "mnist1d-cnn", "lm")
OPTIONAL_TASKS = ("mnist1d-mlp-bf16",)
MODEL_TYPE = {"logreg-digits": "convex (logistic regression)", "fmnist-mlp": "MLP", "mnist1d-mlp": "MLP",
              "fmnist-cnn": "CNN", "mnist1d-cnn": "CNN", "lm": "transformer LM",
              "mnist1d-mlp-bf16": "MLP, bfloat16 params"}
LENGTHS = (0.1, 0.3, 1.0, 3.0)
# shorter grids where the runs are expensive (the time budget of a shared 2-core CPU)
TASK_LENGTHS = {"fmnist-mlp": (0.1, 0.3, 1.0), "fmnist-cnn": (0.1, 0.3, 1.0), "lm": (0.1, 0.3),
                "mnist1d-mlp-bf16": (0.1, 0.3, 1.0)}
WARMUPS = (0.0, 0.05, 0.25)
WARMUP_LENGTH = 0.3  # the warm-up axis runs at 0.3x the budget
SETTINGS: dict[str, dict[str, bool]] = {
    "off": {},
    "bc": {"use_bias_correction": True},
    "sw": {"safeguard_warmup": True},
    "bc+sw": {"use_bias_correction": True, "safeguard_warmup": True},
}


def _base(task: str) -> str:
    """The suite task a variant runs on (``mnist1d-mlp-bf16`` -> ``mnist1d-mlp``)."""
    return task.removesuffix("-bf16")


class Runner:
    """Builds each task's data once and runs one setting on it."""

    def __init__(self, scale: float, quick: bool, text: str | None = None) -> None:
        self.scale, self.quick, self.text = scale, quick, text
        self.suite = C.build_tasks(scale)
        self._data: dict[str, Any] = {}
        self.lm_cfg = L.LMConfig(d_model=32, n_layer=1, context=32, batch=8) if quick else L.LMConfig()
        self.lm_windows = 16 if quick else 256

    def budget(self, task: str) -> int:
        return max(5, int(round(L.BUDGET * self.scale))) if task == "lm" else self.suite[_base(task)].steps

    def data(self, task: str) -> Any:
        if task not in self._data:
            if task == "lm":
                self._data[task] = L.corpus(self.text, max_bytes=200_000 if self.quick else None)
            elif task.endswith("-bf16"):
                d = self.data(_base(task))
                self._data[task] = C.T.Data(d.x.bfloat16(), d.y, d.x_test.bfloat16(), d.y_test, d.note + ", bfloat16")
            else:
                self._data[task] = self.suite[task].build_data(self.scale)
        return self._data[task]

    def note(self, task: str) -> str:
        return self.data(task).note

    def run(self, task: str, setting: str, seed: int, steps: int, warmup: float) -> dict[str, float]:
        kw = SETTINGS[setting]
        if task == "lm":
            r = L.train(self.data(task), "kprodigy", 1.0, kw, seed, steps, "cosine", warmup=warmup,
                        cfg=self.lm_cfg, eval_windows=self.lm_windows)
            e = r["evals"][steps]
            return {"loss": e["val"], "test_acc": math.nan, "d": e["d"], "seconds": r["seconds"]}
        cfg = C.OptConfig(setting, "kprodigy", kwargs=kw)
        r = C.safe_run(self.suite[_base(task)], self.data(task), cfg, seed, steps, self.scale, warmup=warmup)
        d = r.get("d_curve") or [[math.nan]]
        return {"loss": r["train_loss"], "test_acc": r["test_acc"], "d": d[0][-1], "seconds": r.get("seconds", 0.0)}


def plan(runner: Runner, tasks: list[str], lengths: dict[str, tuple[float, ...]], warmups: tuple[float, ...]
         ) -> list[tuple[str, str, float, float]]:
    """(task, axis, length factor, warm-up) of every cell; the 1x/no-warm-up cell is shared."""
    cells = []
    for t in tasks:
        for f in lengths[t]:
            cells.append((t, "length", f, 0.0))
        at = WARMUP_LENGTH if WARMUP_LENGTH in lengths[t] else lengths[t][0]
        for w in warmups:
            if w > 0 or at not in lengths[t]:
                cells.append((t, "warmup", at, w))
    return cells


def run_study(runner: Runner, tasks: list[str], seeds: list[int], lengths: dict[str, tuple[float, ...]],
              warmups: tuple[float, ...], log: Any = print) -> list[dict[str, Any]]:
    rows = []
    t0 = time.time()
    for task in tasks:
        for _, _axis, f, w in [c for c in plan(runner, tasks, lengths, warmups) if c[0] == task]:
            steps = max(5, int(round(runner.budget(task) * f)))
            for setting in SETTINGS:
                for s in seeds:
                    r = runner.run(task, setting, s, steps, w)
                    rows.append({"task": task, "length": f, "steps": steps, "warmup": w, "setting": setting,
                                 "seed": s, **r})
        log(f"  {task}: done ({(time.time() - t0) / 60:.1f} min elapsed)")
    return rows


# --------------------------------------------------------------------- report
def _vals(rows: list[dict], task: str, f: float, w: float, setting: str, key: str = "loss") -> list[float]:
    rs = sorted((r for r in rows if (r["task"], r["length"], r["warmup"], r["setting"]) == (task, f, w, setting)),
                key=lambda r: r["seed"])
    return [float(r[key]) for r in rs]


def ratio(rows: list[dict], task: str, f: float, w: float, a: str, b: str) -> tuple[float, int, int]:
    """Geometric mean over seeds of loss(a) / loss(b), and on how many seeds a was lower (of n)."""
    xa, xb = _vals(rows, task, f, w, a), _vals(rows, task, f, w, b)
    pairs = [(x, y) for x, y in zip(xa, xb) if x > 0 and y > 0 and math.isfinite(x) and math.isfinite(y)]
    if not pairs or len(pairs) < len(xa):
        return math.nan, 0, len(xa)
    g = math.exp(sum(math.log(x / y) for x, y in pairs) / len(pairs))
    return g, sum(x < y for x, y in pairs), len(pairs)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs and all(math.isfinite(x) for x in xs) else math.nan


def _r(rows: list[dict], task: str, f: float, w: float, a: str, b: str) -> str:
    g, k, n = ratio(rows, task, f, w, a, b)
    if not math.isfinite(g):
        return "nan"
    cell = f"{g:.3f} ({k}/{n})"
    return f"**{cell}**" if g < 0.99 and k == n else cell


def length_table(rows: list[dict], task: str, lengths: tuple[float, ...], steps: dict[float, int]) -> str:
    head = "| setting | " + " | ".join(f"{f:g}x ({steps[f]} steps)" for f in lengths) + " |"
    out = [head, "|---|" + "---|" * len(lengths)]
    for s in SETTINGS:
        out.append(f"| {s} | " + " | ".join(f"{_mean(_vals(rows, task, f, 0.0, s)):.4g}" for f in lengths) + " |")
    out.append("| bc / off | " + " | ".join(_r(rows, task, f, 0.0, "bc", "off") for f in lengths) + " |")
    out.append("| bc+sw / sw | " + " | ".join(_r(rows, task, f, 0.0, "bc+sw", "sw") for f in lengths) + " |")
    out.append("| bc+sw / off | " + " | ".join(_r(rows, task, f, 0.0, "bc+sw", "off") for f in lengths) + " |")
    out.append("| sw / off | " + " | ".join(_r(rows, task, f, 0.0, "sw", "off") for f in lengths) + " |")
    return "\n".join(out)


def d_table(rows: list[dict], task: str, lengths: tuple[float, ...], steps: dict[float, int]) -> str:
    """D at the end of each run (mean over seeds), no warm-up; d0 is 1e-6."""
    out = ["| setting | " + " | ".join(f"D at {f:g}x ({steps[f]} steps)" for f in lengths) + " |",
           "|---|" + "---|" * len(lengths)]
    for s in SETTINGS:
        out.append(f"| {s} | " + " | ".join(f"{_mean(_vals(rows, task, f, 0.0, s, 'd')):.3g}" for f in lengths) + " |")
    return "\n".join(out)


def warmup_table(rows: list[dict], task: str, at: float, warmups: tuple[float, ...]) -> str:
    out = ["| setting | " + " | ".join(f"warm-up {w:.0%}" for w in warmups) + " |", "|---|" + "---|" * len(warmups)]
    for s in SETTINGS:
        out.append(f"| {s} | " + " | ".join(f"{_mean(_vals(rows, task, at, w, s)):.4g}" for w in warmups) + " |")
    out.append("| bc / off | " + " | ".join(_r(rows, task, at, w, "bc", "off") for w in warmups) + " |")
    out.append("| bc+sw / sw | " + " | ".join(_r(rows, task, at, w, "bc+sw", "sw") for w in warmups) + " |")
    out.append("| bc+sw / off | " + " | ".join(_r(rows, task, at, w, "bc+sw", "off") for w in warmups) + " |")
    out.append("| sw / off | " + " | ".join(_r(rows, task, at, w, "sw", "off") for w in warmups) + " |")
    return "\n".join(out)


def summary_table(rows: list[dict], tasks: list[str], lengths: dict[str, tuple[float, ...]]) -> str:
    """One row per task: bc / off at every length factor of the suite grid."""
    fs = sorted({f for t in tasks for f in lengths[t]})
    out = ["| task | model type | " + " | ".join(f"bc / off at {f:g}x" for f in fs) + " |",
           "|---|---|" + "---|" * len(fs)]
    for t in tasks:
        cells = [_r(rows, t, f, 0.0, "bc", "off") if f in lengths[t] else "not run" for f in fs]
        out.append(f"| {t} | {MODEL_TYPE.get(t, '')} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def warmup_summary(rows: list[dict], tasks: list[str], lengths: dict[str, tuple[float, ...]],
                   warmups: tuple[float, ...], a: str = "sw", b: str = "off") -> str:
    """One row per task: loss(a) / loss(b) at each warm-up, at the warm-up axis' length."""
    out = ["| task | at | " + " | ".join(f"warm-up {w:.0%}" for w in warmups) + " |",
           "|---|---|" + "---|" * len(warmups)]
    for t in tasks:
        at = WARMUP_LENGTH if WARMUP_LENGTH in lengths[t] else lengths[t][0]
        steps = next(r["steps"] for r in rows if r["task"] == t and r["length"] == at)
        out.append(f"| {t} | {steps} steps | " + " | ".join(_r(rows, t, at, w, a, b) for w in warmups) + " |")
    return "\n".join(out)


def report(results: dict[str, Any]) -> str:
    rows, tasks, lengths = results["rows"], results["tasks"], {t: tuple(v) for t, v in results["lengths"].items()}
    warmups = tuple(results["warmups"])
    out = ["# Bias correction: where it pays off", "", "Generated by `benchmarks/bias_correction.py`; do not edit.", ""]
    if results.get("quick"):
        out += ["**SMOKE TEST (`--quick`)**: tiny budgets and data; these numbers are not results.", ""]
    out += [f"Machine: {results['machine']}. Code: {results['code']}. Wall time: {results['wall_seconds'] / 60:.1f} min.",
            f"Command: `{results['command']}`. Seeds {results['seeds']}.", "",
            "K-Prodigy at `lr=1`, untuned, cosine lr schedule over each run, no weight decay. Settings: `off` = the "
            "defaults; `bc` = `use_bias_correction=True`; `sw` = `safeguard_warmup=True`; `bc+sw` = both. Loss: the "
            "final full training objective (suite tasks) or validation loss in nats per byte (lm), mean over seeds. "
            "Ratios: geometric mean over seeds of the per-seed loss ratio, (k/n) = on how many seeds the first "
            "setting's loss was lower; bold where it is below 0.99 on every seed.", "",
            "## Summary: loss with bias correction / without, by run length (no warm-up)", "",
            summary_table(rows, tasks, lengths), "",
            "## Summary: loss with `safeguard_warmup=True` / without (no bias correction), by lr warm-up", "",
            warmup_summary(rows, tasks, lengths, warmups), "",
            "## Summary: loss with bias correction / without, by lr warm-up", "",
            warmup_summary(rows, tasks, lengths, warmups, "bc", "off"), ""]
    for t in tasks:
        steps = {f: next(r["steps"] for r in rows if r["task"] == t and r["length"] == f) for f in lengths[t]}
        at = WARMUP_LENGTH if WARMUP_LENGTH in lengths[t] else lengths[t][0]
        at_steps = next(r["steps"] for r in rows if r["task"] == t and r["length"] == at)
        out += [f"## {t} ({MODEL_TYPE.get(t, '')}; {results['notes'].get(t, '')})", "",
                "Final loss against run length (no warm-up):", "", length_table(rows, t, lengths[t], steps), "",
                "D at the end of the run (d0 = 1e-6):", "", d_table(rows, t, lengths[t], steps), "",
                f"Final loss against warm-up ({at_steps} steps, warm-up then cosine):", "",
                warmup_table(rows, t, at, warmups), ""]
    return "\n".join(out) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS + OPTIONAL_TASKS)}")
    p.add_argument("--name", default="bias_correction", help="file name of the outputs (NAME.md, NAME.json)")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny budgets and data, 1 seed; not results")
    p.add_argument("--text", default=None, help="the LM's text file (default: Debian's fortunes; see lm_task.py)")
    p.add_argument("--lengths", default="", help="comma-separated run lengths (x the budget) for every task, "
                   "instead of the default grid")
    p.add_argument("--warmups", default="", help="comma-separated warm-up fractions instead of 0,0.05,0.25")
    _output.add_study_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    _output.refuse_smoke_update(args.quick, args.update_results)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in TASKS + OPTIONAL_TASKS]
    if unknown or not tasks:
        raise SystemExit(f"unknown task(s) {unknown}; choose from {', '.join(TASKS + OPTIONAL_TASKS)}")
    if args.from_json:
        return _output.rerender(args.from_json, args.out, args.update_results, args.name, report, "presets")
    torch.set_num_threads(args.threads)
    if args.quick:
        scale, seeds, warmups = 0.05, [0], (0.0, 0.25)
        lengths = {t: (0.3, 1.0) for t in tasks}
    else:
        scale, seeds, warmups = 1.0, list(range(args.seeds)), WARMUPS
        lengths = {t: TASK_LENGTHS.get(t, LENGTHS) for t in tasks}
    if args.lengths:
        lengths = {t: tuple(float(f) for f in args.lengths.split(",")) for t in tasks}
    if args.warmups:
        warmups = tuple(float(w) for w in args.warmups.split(","))
    runner = Runner(scale, args.quick, args.text)
    out = _output.output_dir(args.out, args.update_results, subdir="presets")
    cells = plan(runner, tasks, lengths, warmups)
    print(("SMOKE TEST (--quick): not results\n" if args.quick else "")
          + f"Bias-correction study: tasks {tasks}; {len(cells)} cells x {len(SETTINGS)} settings x {len(seeds)} "
          f"seed(s); writes to {out or 'nothing'}", flush=True)
    t0 = time.time()
    rows = run_study(runner, tasks, seeds, lengths, warmups)
    results = {"machine": C.machine_description(), "code": C.code_version(), "quick": bool(args.quick),
               "command": "python benchmarks/bias_correction.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "tasks": tasks, "seeds": seeds, "lengths": lengths, "warmups": list(warmups),
               "budgets": {t: runner.budget(t) for t in tasks}, "notes": {t: runner.note(t) for t in tasks},
               "wall_seconds": time.time() - t0, "rows": rows}
    _output.write_report(out, args.name, report(results), results)
    return results


if __name__ == "__main__":
    main()
