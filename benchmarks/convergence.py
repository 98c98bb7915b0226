"""Convergence benchmark: K-Prodigy against prodigyopt, D-Adapt Adam and tuned AdamW.

The main job of the repository: on a fresh machine (CPU, offline)

    python benchmarks/convergence.py                # whole default suite, ~11 min on an idle 2-core CPU
    python benchmarks/convergence.py --quick        # smoke test: tiny budget, about a minute
    python benchmarks/convergence.py --tasks logreg-iris,mnist1d-mlp --seeds 5 --steps 0.5
    python benchmarks/convergence.py --update-results   # refresh the committed benchmarks/results/

trains every task with every optimizer, prints a header (tasks, optimizers, seeds, estimated
time), progress with an ETA, the comparison tables with the best optimizer of each task marked,
and writes markdown tables, plots and raw numbers into a fresh folder
``benchmarks/out/<timestamp>/`` (git-ignored). The committed ``benchmarks/results/`` change only
with ``--update-results`` (refused together with ``--quick``, which is a smoke test, not a result).

Rules that hold for every optimizer in a task: same initialisation (seeded),
same minibatch order (seeded generator), same cosine schedule of the learning
rate (multiplier ``0.5 * (1 + cos(pi * t / T))``, no warm-up), no weight decay
(the convex task has its L2 term inside the objective). AdamW's learning rate
is tuned on a validation split (last 20% of the training part) with seed 0 over
a fixed grid; the grid is printed with the results.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _output  # noqa: E402
import convergence_tasks as T  # noqa: E402

RESULTS_DIR = str(_output.RESULTS_DIR)
ADAMW_GRID = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
ADAMW_GRID_CONVEX = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0]
TWO_COMP_HEAD_LRS = [3e-4, 1e-3, 3e-3]
TWO_COMP_ENC_RATIOS = [1.0, 0.1, 0.01]
# Seconds per training step of each task, measured on the reference machine (the 2-core x86_64
# CPU of benchmarks/results/convergence.md, 1 torch thread, mean over all runs of that run): the
# header's time estimate, with SETUP_SECONDS per task for the rest (data, pretraining, L-BFGS
# optimum, plots): 10.4 min estimated for the 10.7 min full run, 1.3 min for a 1.2 min --quick run.
SECONDS_PER_STEP = {
    "logreg-iris": 5.6e-4, "logreg-wine": 2.4e-3, "logreg-breast_cancer": 9.7e-4, "logreg-digits": 1.8e-3,
    "fmnist-mlp": 8.6e-3, "fmnist-cnn": 9.4e-3, "mnist1d-mlp": 1.7e-3, "mnist1d-cnn": 2.3e-3,
    "two-component": 6.8e-3,
}
SETUP_SECONDS = 6.0


# ---------------------------------------------------------------- optimizers
@dataclass
class OptConfig:
    """One optimizer setting. ``enc_lr`` scales the encoder group's lr (two-component task)."""

    name: str
    kind: str  # "kprodigy" | "prodigyopt" | "dadapt" | "adamw"
    lr: float = 1.0
    enc_lr: float = 1.0
    kwargs: dict = field(default_factory=dict)


def _kprodigy_class() -> type:
    """Import K-Prodigy lazily so the harness also runs while the package is absent."""
    from kprodigy import KProdigy

    return KProdigy


def kprodigy_available() -> bool:
    try:
        _kprodigy_class()
        return True
    except ImportError:
        return False


def make_optimizer(cfg: OptConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """Build the optimizer of ``cfg`` over param groups (dicts with ``params`` and ``lr``)."""
    if cfg.kind == "kprodigy":
        return _kprodigy_class()(groups, lr=cfg.lr, **cfg.kwargs)
    if cfg.kind == "prodigyopt":
        from prodigyopt import Prodigy

        return Prodigy(groups, lr=cfg.lr, **cfg.kwargs)
    if cfg.kind == "dadapt":
        from dadaptation import DAdaptAdam

        return DAdaptAdam(groups, lr=cfg.lr, **cfg.kwargs)
    if cfg.kind == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0, **cfg.kwargs)
    raise ValueError(cfg.kind)


def standard_configs(adamw_lr: float | None) -> list[OptConfig]:
    """Optimizers run on every single-component task."""
    cfgs = [
        OptConfig("kprodigy", "kprodigy"),
        OptConfig("kprodigy-bc", "kprodigy", kwargs={"use_bias_correction": True}),
        OptConfig("kprodigy-f5", "kprodigy", kwargs={"d_update_freq": 5}),
        OptConfig("prodigyopt", "prodigyopt"),
        OptConfig("dadapt-adam", "dadapt"),
    ]
    if adamw_lr is not None:
        cfgs.append(OptConfig("adamw-tuned", "adamw", lr=adamw_lr))
    return cfgs


def two_component_configs(adamw: tuple[float, float] | None) -> list[OptConfig]:
    """Optimizers of the two-component task; param groups are [encoder, head]."""
    cfgs = [
        OptConfig("kprodigy", "kprodigy"),  # defaults: one D shared by the two groups, as prodigyopt
        OptConfig("kprodigy-indep", "kprodigy", kwargs={"independent_d": True}),
        OptConfig("kprodigy-indep-enc0.1", "kprodigy", enc_lr=0.1, kwargs={"independent_d": True}),
        OptConfig("kprodigy-shared-enc0.1", "kprodigy", enc_lr=0.1),
        OptConfig("kprodigy-bc", "kprodigy", kwargs={"use_bias_correction": True}),
        OptConfig("kprodigy-f5", "kprodigy", kwargs={"d_update_freq": 5}),
        OptConfig("prodigyopt", "prodigyopt"),  # same lr in both groups: one shared D
        OptConfig("dadapt-adam", "dadapt"),
    ]
    if adamw is not None:
        cfgs.append(OptConfig("adamw-tuned", "adamw", lr=adamw[0], enc_lr=adamw[1] / adamw[0]))
    return cfgs


def adamw_grid_configs(two_component: bool, convex: bool) -> list[OptConfig]:
    """The AdamW tuning grid (one config per candidate learning rate)."""
    if two_component:
        return [OptConfig(f"adamw h{h:g} e{h * r:g}", "adamw", lr=h, enc_lr=r)
                for h in TWO_COMP_HEAD_LRS for r in TWO_COMP_ENC_RATIOS]
    grid = ADAMW_GRID_CONVEX if convex else ADAMW_GRID
    return [OptConfig(f"adamw lr{lr:g}", "adamw", lr=lr) for lr in grid]


# --------------------------------------------------------------------- tasks
def build_tasks(scale: float = 1.0) -> dict[str, T.Task]:
    """All tasks; ``scale`` multiplies step budgets (and shrinks data when < 1)."""
    small = scale < 0.2
    steps = lambda n: max(5, int(round(n * scale)))  # noqa: E731
    fm = lambda s: T.fashion_data(2000 if small else 12000, 1000 if small else 10000)  # noqa: E731
    m1 = lambda s: T.mnist1d_data(2000 if small else 10000)  # noqa: E731
    tasks = {}
    for name in ("iris", "wine", "breast_cancer", "digits"):
        tasks[f"logreg-{name}"] = T.Task(
            f"logreg-{name}", "logreg", steps(300), None,
            (lambda s, n=name: T.sklearn_data(n)), T.logreg_model, convex=True)
    tasks["fmnist-mlp"] = T.Task("fmnist-mlp", "fmnist-mlp", steps(400), 128, fm, T.mlp_model)
    tasks["fmnist-cnn"] = T.Task("fmnist-cnn", "fmnist-cnn", steps(400), 128, fm, T.SmallCNN)
    tasks["mnist1d-mlp"] = T.Task("mnist1d-mlp", "mnist1d-mlp", steps(1000), 128, m1, T.mlp_model)
    tasks["mnist1d-cnn"] = T.Task("mnist1d-cnn", "mnist1d-cnn", steps(1000), 128, m1, T.SmallCNN)
    tasks["two-component"] = T.Task(
        "two-component", "two-component", steps(600), 128,
        lambda s: T.label_subset(m1(s), [5, 6, 7, 8, 9]), T.mlp_model, two_component=True,
        extra={"pretrain_steps": steps(1500), "old_labels": [0, 1, 2, 3, 4]})
    return tasks


@dataclass
class Pretrained:
    """Encoder and old-task head trained on the original task (one per seed)."""

    encoder: nn.Module
    old_head: nn.Module
    old_data: T.Data
    old_acc: float


_PRETRAINED: dict[tuple[int, int], Pretrained] = {}


def pretrain(task: T.Task, seed: int, scale: float) -> Pretrained:
    """Train encoder + small head on the old labels with AdamW (cached per seed)."""
    key = (seed, int(scale * 1000))
    if key in _PRETRAINED:
        return _PRETRAINED[key]
    old = T.label_subset(T.mnist1d_data(2000 if scale < 0.2 else 10000), task.extra["old_labels"])
    torch.manual_seed(10_000 + seed)
    encoder = T.make_encoder(old.x[0].numel())
    old_head = nn.Linear(64, T.n_classes(old))
    model = nn.Sequential(encoder, old_head)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(10_000 + seed)
    for xb, yb in _batches(old, 128, task.extra["pretrain_steps"], gen):
        loss = T.objective(model, xb, yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    old_acc = T.evaluate(model, old.x_test, old.y_test)[1]
    _PRETRAINED[key] = Pretrained(encoder, old_head, old, old_acc)
    return _PRETRAINED[key]


# ------------------------------------------------------------------ training
def _batches(data: T.Data, batch_size: int | None, steps: int, gen: torch.Generator):
    """Yield ``steps`` minibatches, reshuffling every epoch with ``gen`` (full batch if None)."""
    n = len(data.y)
    perm, pos = torch.randperm(n, generator=gen), 0
    for _ in range(steps):
        if batch_size is None or batch_size >= n:
            yield data.x, data.y
            continue
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        yield data.x[idx], data.y[idx]


def _downsample(xs: list[float], n: int = 200) -> list[float]:
    """Average ``xs`` over at most ``n`` equal windows (for curves in the json)."""
    if len(xs) <= n:
        return list(xs)
    w = len(xs) / n
    return [sum(xs[int(i * w) : int((i + 1) * w)]) / max(1, int((i + 1) * w) - int(i * w)) for i in range(n)]


def cosine_multiplier(t: int, steps: int, warmup: float = 0.0) -> float:
    """The lr factor at step ``t`` of ``steps``: a linear warm-up over ``round(warmup * steps)``
    steps, then cosine to 0 over the rest (``warmup=0``: the suite's plain cosine)."""
    w = int(round(warmup * steps))
    if t < w:
        return (t + 1) / w
    return 0.5 * (1.0 + math.cos(math.pi * (t - w) / max(1, steps - w)))


def train_run(task: T.Task, data: T.Data, cfg: OptConfig, seed: int, steps: int,
              scale: float = 1.0, on_step: Callable[[], None] | None = None, warmup: float = 0.0) -> dict[str, Any]:
    """Train one model with one optimizer and seed; return final metrics and curves. ``warmup``:
    the fraction of the steps given to a linear lr warm-up before the cosine (0 in the suite)."""
    l2 = T.LOGREG_L2 if task.convex else 0.0
    pre = pretrain(task, seed, scale) if task.two_component else None  # before seeding: it uses the RNG
    torch.manual_seed(seed)
    if pre is not None:
        model = T.TwoComponent(copy.deepcopy(pre.encoder), 64, T.n_classes(data))
        enc0 = [p.detach().clone() for p in model.encoder.parameters()]
        groups = [{"params": list(model.encoder.parameters()), "lr": cfg.lr * cfg.enc_lr},
                  {"params": list(model.head.parameters()), "lr": cfg.lr}]
    else:
        model = task.build_model(data).to(data.x.dtype)  # float32 data: unchanged; bfloat16 data: bf16 params
        groups = [{"params": list(model.parameters()), "lr": cfg.lr}]
    opt = make_optimizer(cfg, groups)
    initial_loss = T.evaluate(model, data.x, data.y, l2)[0]
    base_lrs = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(1_000 + seed)
    losses: list[float] = []
    ds: list[list[float]] = []
    diverged = False
    t0 = time.perf_counter()
    for t, (xb, yb) in enumerate(_batches(data, task.batch_size, steps, gen)):
        mult = cosine_multiplier(t, steps, warmup)
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * mult
        loss = T.objective(model, xb, yb, l2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if "d" in opt.param_groups[0]:
            ds.append([float(g["d"]) for g in opt.param_groups])
        if on_step is not None:
            on_step()
        if not math.isfinite(losses[-1]):
            diverged = True
            break
    seconds = time.perf_counter() - t0
    train_loss, train_acc = T.evaluate(model, data.x, data.y, l2)
    if task.convex:  # float64 objective, so tiny suboptimalities are not float32 rounding
        train_loss = T.evaluate(copy.deepcopy(model).double(), data.x.double(), data.y, l2)[0]
    test_loss, test_acc = T.evaluate(model, data.x_test, data.y_test, l2)
    out: dict[str, Any] = {
        "task": task.name, "opt": cfg.name, "seed": seed, "steps": steps, "seconds": seconds,
        "initial_train_loss": initial_loss,
        "train_loss": train_loss if math.isfinite(train_loss) else float("nan"),
        "train_acc": train_acc, "test_loss": test_loss, "test_acc": test_acc,
        "diverged": diverged or not math.isfinite(train_loss),
        "loss_curve": _downsample(losses), "d_curve": [_downsample(list(c)) for c in zip(*ds)] if ds else [],
    }
    if pre is not None:
        with torch.no_grad():
            old_model = nn.Sequential(model.encoder, pre.old_head)
            out["retention_acc"] = T.evaluate(old_model, pre.old_data.x_test, pre.old_data.y_test)[1]
            out["pretrained_old_acc"] = pre.old_acc
            num = sum(((p - p0) ** 2).sum() for p, p0 in zip(model.encoder.parameters(), enc0))
            den = sum((p0 ** 2).sum() for p0 in enc0)
            out["encoder_drift"] = math.sqrt(num / den)
    return out


def safe_run(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """``train_run`` that records an exception instead of stopping the suite."""
    task, _, cfg, seed = args[:4]
    try:
        return train_run(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - reported in the tables
        return {"task": task.name, "opt": cfg.name, "seed": seed, "error": f"{type(exc).__name__}: {exc}",
                "train_loss": float("nan"), "test_acc": float("nan"), "diverged": True}


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are a convenience only
        return None
    return tqdm(total=total, desc=desc, leave=False, disable=not enabled, file=sys.stderr,
                mininterval=0.5, dynamic_ncols=True)


def tune_adamw(task: T.Task, data: T.Data, steps: int, scale: float, progress: bool) -> dict[str, Any]:
    """Pick AdamW's learning rate(s) on a validation split, seed 0.

    Criterion: highest validation accuracy, ties broken by lower validation loss; for the
    convex task the validation objective alone (its validation sets have 23-270 samples,
    where accuracy is mostly ties and noise).
    """
    val = T.split_validation(data)
    grid = adamw_grid_configs(task.two_component, task.convex)
    bar = _progress(len(grid) * steps, f"{task.name} adamw-tuning", progress)
    runs = [safe_run(task, val, cfg, 0, steps, scale, on_step=bar.update if bar else None) for cfg in grid]
    if bar:
        bar.close()

    def ok(r: dict) -> bool:
        return not r["diverged"] and math.isfinite(r.get("test_loss", math.nan))

    def key(i: int) -> tuple[float, float]:
        if not ok(runs[i]):
            return (math.inf, math.inf)
        return (runs[i]["test_loss"], 0.0) if task.convex else (-runs[i]["test_acc"], runs[i]["test_loss"])

    best = min(range(len(grid)), key=key)
    by_train = min(range(len(grid)), key=lambda i: runs[i]["train_loss"] if ok(runs[i]) else math.inf)
    return {"grid": [(c.lr, c.lr * c.enc_lr) for c in grid],
            "criterion": "validation objective" if task.convex else "validation accuracy, ties by validation loss",
            "val_acc": [r.get("test_acc", math.nan) for r in runs],
            "val_loss": [r.get("test_loss", math.nan) if ok(r) else math.inf for r in runs],
            "best_lr": grid[best].lr, "best_enc_lr": grid[best].lr * grid[best].enc_lr,
            "lr_min_train_loss": (grid[by_train].lr, grid[by_train].lr * grid[by_train].enc_lr),
            "at_edge": best in (0, len(grid) - 1) and not task.two_component,
            "runs": [{k: v for k, v in r.items() if not k.endswith("curve")} for r in runs]}


def run_configs(task: T.Task, only: list[str] | None, adamw: tuple[float, float] | None = (1e-3, 1e-3),
                lr_train: float | None = None) -> list[OptConfig]:
    """The configs ``run_task`` trains on ``task`` after tuning (``adamw``: the tuned lr pair)."""
    if task.two_component:
        cfgs = two_component_configs(adamw)
        cfgs += [c for c in adamw_grid_configs(True, False) if adamw is None or (c.lr, c.lr * c.enc_lr) != adamw]
    else:
        cfgs = standard_configs(None if adamw is None else adamw[0])
        if task.convex and lr_train is not None and adamw is not None and lr_train != adamw[0]:
            cfgs.append(OptConfig("adamw-train-tuned", "adamw", lr=lr_train))  # strongest AdamW for the loss
    if not kprodigy_available():
        cfgs = [c for c in cfgs if c.kind != "kprodigy"]
    if only:
        cfgs = [c for c in cfgs if c.name in only or c.name.startswith("adamw-")]
    return cfgs


def run_counts(task: T.Task, n_seeds: int, only: list[str] | None) -> tuple[int, int]:
    """The fewest and the most training runs of ``task`` (tuning included). The two differ only on
    convex tasks, which add one AdamW config when the lr with the lowest training loss is not the
    validation-tuned one; the two-component task always skips the tuned grid pair it already ran."""
    grid = adamw_grid_configs(task.two_component, task.convex)
    tuned = (grid[0].lr, grid[0].lr * grid[0].enc_lr)  # any grid pair: the count is the same
    fewest = len(grid) + len(run_configs(task, only, tuned, tuned[0])) * n_seeds
    most = len(grid) + len(run_configs(task, only, tuned, -1.0)) * n_seeds
    return fewest, most


def plan(tasks: list[T.Task], n_seeds: int, only: list[str] | None) -> dict[str, tuple[int, float]]:
    """Per task: (the most training runs, estimated seconds of training on the reference machine)."""
    out = {}
    for task in tasks:
        n_runs = run_counts(task, n_seeds, only)[1]
        out[task.name] = (n_runs, n_runs * task.steps * SECONDS_PER_STEP.get(task.name, 5e-3))
    return out


def fallbacks(names: list[str]) -> list[str]:
    """What this run will use instead of what it asks for, one sentence each (none: empty)."""
    out = []
    fm = [n for n in names if n.startswith("fmnist")]
    if fm and not T.fashion_available():
        out.append(f"Fashion-MNIST not found under {T.FASHION_DIR}: {', '.join(fm)} train on scikit-learn's digits "
                   "(8x8 images) instead; install Debian's dataset-fashion-mnist for the real task")
    if not kprodigy_available():
        out.append("kprodigy is not importable: the K-Prodigy rows are skipped")
    return out


def _duration(seconds: float) -> str:
    """``'7.5 min'`` or ``'40 s'``."""
    if not math.isfinite(seconds):
        return "?"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


class Progress:
    """One line per finished optimizer: runs done, elapsed time and an ETA (stderr)."""

    def __init__(self, estimates: dict[str, tuple[int, float]], enabled: bool = True) -> None:
        self.estimates, self.enabled = estimates, enabled
        self.total_runs = sum(n for n, _ in estimates.values())
        self.total_est = sum(e for _, e in estimates.values()) + SETUP_SECONDS * len(estimates)
        self.runs, self.done_est, self.t0 = 0, 0.0, time.time()

    def replan(self, task: str, runs: int) -> None:
        """Correct the number of runs of ``task`` once its configs are known (after tuning)."""
        n, est = self.estimates.get(task, (runs, 0.0))
        new = (runs, est * runs / max(n, 1))
        self.total_runs += runs - n
        self.total_est += new[1] - est
        self.estimates[task] = new

    def advance(self, task: str, label: str, runs: int) -> None:
        n, est = self.estimates.get(task, (runs, 0.0))
        self.runs += runs
        self.done_est += est * runs / max(n, 1) + (SETUP_SECONDS if label == "adamw-tuning" else 0.0)
        elapsed = time.time() - self.t0
        left = elapsed * (self.total_est - self.done_est) / self.done_est if self.done_est > 0 else math.nan
        if self.enabled:
            print(f"[{self.runs}/{self.total_runs} runs] {task} {label} done; {_duration(elapsed)} elapsed, "
                  f"ETA {_duration(max(left, 0.0))}", file=sys.stderr, flush=True)


def run_task(task: T.Task, seeds: list[int], scale: float = 1.0, progress: bool = True,
             only: list[str] | None = None, tracker: Progress | None = None) -> dict[str, Any]:
    """Tune AdamW, then run every optimizer with every seed on one task."""
    data = task.build_data(scale)
    steps = task.steps
    tuning = tune_adamw(task, data, steps, scale, progress)
    if tracker is not None:
        tracker.advance(task.name, "adamw-tuning", len(tuning["runs"]))
    cfgs = run_configs(task, only, (tuning["best_lr"], tuning["best_enc_lr"]), tuning["lr_min_train_loss"][0])
    if tracker is not None:
        tracker.replan(task.name, len(tuning["runs"]) + len(cfgs) * len(seeds))
    if not kprodigy_available():
        print(f"[{task.name}] kprodigy is not importable: K-Prodigy rows skipped", file=sys.stderr)
    runs = []
    for cfg in cfgs:
        bar = _progress(len(seeds) * steps, f"{task.name} {cfg.name}", progress)
        for seed in seeds:
            runs.append(safe_run(task, data, cfg, seed, steps, scale, on_step=bar.update if bar else None))
        if bar:
            bar.close()
        if tracker is not None:
            tracker.advance(task.name, cfg.name, len(seeds))
    result = {"task": task.name, "group": task.group, "steps": steps, "batch_size": task.batch_size,
              "data_note": data.note, "n_train": len(data.y), "n_test": len(data.y_test),
              "adamw_tuning": tuning, "runs": runs}
    if task.convex:
        f_star = T.lbfgs_optimum(data)
        result["f_star"] = f_star
        for r in runs:
            r["rel_subopt"] = (r["train_loss"] - f_star) / abs(f_star)
    return result


# ------------------------------------------------------------------ entry point
def code_version() -> str:
    """kprodigy version and the git commit of this checkout (if any)."""
    import subprocess

    try:
        import kprodigy

        version = f"kprodigy {kprodigy.__version__}"
    except ImportError:
        version = "kprodigy not importable"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version}, commit {commit or 'unknown'}"


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    return (f"{os.cpu_count()}-core CPU ({cpu}), {platform.system()}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} torch thread(s)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    tasks = list(build_tasks().keys())
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="all",
                   help=f"comma-separated task names or groups (logreg, ...); choices: {', '.join(tasks)}")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1), default 3")
    p.add_argument("--steps", type=float, default=1.0, help="multiplier of every task's step budget")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny budget (steps x0.05, small data, 2 seeds); its numbers are not results")
    p.add_argument("--opts", default="", help="comma-separated optimizer names to run (AdamW is always tuned)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these sizes)")
    _output.add_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars and ETA lines")
    p.add_argument("--from-json", default="", help="re-render tables and plots from a saved convergence.json")
    return p.parse_args(argv)


def header(names: list[str], tasks: dict[str, T.Task], seeds: list[int], scale: float, quick: bool,
           only: list[str] | None, out: str | None) -> str:
    """What the run will do: tasks, optimizers, seeds, estimated time, where it writes."""
    est = plan([tasks[n] for n in names], len(seeds), only)
    opts: list[str] = []
    for n in names:
        for c in run_configs(tasks[n], only):
            if c.name not in opts and not c.name.startswith("adamw "):
                opts.append(c.name)
    total = sum(e for _, e in est.values()) + SETUP_SECONDS * len(est)
    counts = [run_counts(tasks[n], len(seeds), only) for n in names]
    fewest, most = sum(c[0] for c in counts), sum(c[1] for c in counts)
    n_runs = f"{most}" if fewest == most else (
        f"{fewest} to {most}")
    lines = ["=" * 78]
    if quick:
        lines += ["SMOKE TEST (--quick): 5% of the step budget, small data, at most 2 seeds.",
                  "It checks that every task and optimizer runs; its numbers are NOT results and no",
                  "target is judged. The full run: python benchmarks/convergence.py", "-" * 78]
    lines += [f"Convergence benchmark: {len(names)} task(s), {n_runs} training runs"
              + ("" if fewest == most else " (convex tasks add one AdamW row when the lr with the lowest training "
                 "loss differs from the validation-tuned one)"),
              f"  tasks:      {', '.join(f'{n} ({tasks[n].steps} steps)' for n in names)}",
              f"  optimizers: {', '.join(opts)}; AdamW's lr tuned first on a validation split "
              "(two-component: also the other grid pairs)",
              f"  seeds:      {seeds}; step scale {scale:g}",
              f"  estimated:  {_duration(total)} on the reference machine (idle 2-core x86_64 CPU, 1 thread); "
              "longer on a loaded one",
              f"  writes to:  {out or 'nothing (--out given as an empty string)'}"]
    lines += [f"  FALLBACK:   {f}" for f in fallbacks(names)]
    lines += ["=" * 78]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import convergence_report as R

    args = parse_args(argv)
    if args.quick and args.update_results:
        raise SystemExit("--quick is a smoke test: its numbers must not replace the committed results "
                         "(drop --update-results)")
    if args.from_json:  # no training: tables and plots from saved numbers
        with open(args.from_json) as f:
            saved = json.load(f)
        print(R.summary(saved))
        out = _output.output_dir(args.out, args.update_results)
        if out is not None:
            R.write_all(saved, str(out))
            print(f"results written under {out}")
        return saved
    torch.set_num_threads(args.threads)
    scale, n_seeds = (0.05 * args.steps, min(args.seeds, 2)) if args.quick else (args.steps, args.seeds)
    all_tasks = build_tasks(scale)
    wanted = list(all_tasks) if args.tasks == "all" else args.tasks.split(",")
    names = [n for n in all_tasks if n in wanted or all_tasks[n].group in wanted or n.split("-")[0] in wanted]
    unknown = [w for w in wanted if w != "all" and not any(w in (n, all_tasks[n].group, n.split("-")[0]) for n in all_tasks)]
    if unknown or not names:
        raise SystemExit(f"unknown task(s) {unknown}; choose from {', '.join(all_tasks)}")
    seeds = list(range(n_seeds))
    only = [o for o in args.opts.split(",") if o] or None
    out = _output.output_dir(args.out, args.update_results)
    print(header(names, all_tasks, seeds, scale, args.quick, only, str(out) if out else None), flush=True)
    tracker = Progress(plan([all_tasks[n] for n in names], n_seeds, only), enabled=not args.no_progress)
    t0 = time.time()
    results = {"machine": machine_description(), "code": code_version(), "command": "python benchmarks/convergence.py " + " ".join(
        sys.argv[1:] if argv is None else argv), "seeds": seeds, "step_scale": scale, "quick": bool(args.quick),
        "tasks": {}, "fallbacks": fallbacks(names)}
    for name in names:
        results["tasks"][name] = run_task(all_tasks[name], seeds, scale, not args.no_progress, only, tracker)
        print(R.task_table(results["tasks"][name]), flush=True)
    results["wall_seconds"] = time.time() - t0
    summary = R.summary(results)
    print(summary)
    if out is not None:
        R.write_all(results, str(out))
        print(f"results written under {out}" + (" (a smoke test: not results)" if args.quick else ""))
    return results


if __name__ == "__main__":
    main()
