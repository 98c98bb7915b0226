"""Tables, target checks and plots for ``convergence.py`` results."""

from __future__ import annotations

import json
import math
import os
import statistics

STANDARD = ["kprodigy", "kprodigy-bc", "kprodigy-f5", "prodigyopt", "dadapt-adam", "adamw-tuned"]
D_PLOT_TWO_COMPONENT = ["kprodigy", "kprodigy-indep", "kprodigy-indep-enc0.1", "kprodigy-shared-enc0.1"]
PAIRS = ["logreg", "fmnist-mlp", "fmnist-cnn", "mnist1d-mlp", "mnist1d-cnn", "two-component"]
LOSS_TOL = 0.01  # K-Prodigy defaults may be at most 1% (relative) above tuned AdamW's train loss
ACC_TOL = 0.05  # ... and at most 5% (relative) below its test accuracy
PRODIGY_TOL = 0.01  # "as good as prodigyopt": mean train loss at most 1% above (float-order noise)


# ------------------------------------------------------------------ numbers
def _vals(runs: list[dict], opt: str, key: str) -> list[float]:
    """Per-seed values of ``key`` for ``opt``, ordered by seed; NaN for failed runs."""
    rs = sorted((r for r in runs if r["opt"] == opt), key=lambda r: r["seed"])
    return [float(r.get(key, math.nan)) if not r.get("error") else math.nan for r in rs]


def mean(xs: list[float]) -> float:
    """Mean that is NaN as soon as one value is NaN (NaN never passes)."""
    return sum(xs) / len(xs) if xs and all(math.isfinite(x) for x in xs) else math.nan


def sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 and all(math.isfinite(x) for x in xs) else math.nan


def fmt(x: float, digits: int = 4) -> str:
    if not math.isfinite(x):
        return "nan"
    return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.3e}"


def pm(xs: list[float], digits: int = 4, pct: bool = False) -> str:
    k = 100.0 if pct else 1.0
    m, s = mean(xs) * k, sd(xs) * k
    if not math.isfinite(m):
        return "nan"
    return f"{m:.{2 if pct else digits}f} ± {s:.{2 if pct else digits}f}" if pct else f"{fmt(m, digits)} ± {fmt(s, 2)}"


def best(task: dict, key: str, lowest: bool, among: list[str] | None = None) -> str | None:
    """The optimizer with the best mean ``key`` over seeds (runs with a failed seed never win)."""
    scored = [(mean(_vals(task["runs"], o, key)), o) for o in (among or opts_of(task))]
    scored = [(v, o) for v, o in scored if math.isfinite(v)]
    if not scored:
        return None
    return (min(scored) if lowest else max(scored, key=lambda vo: vo[0]))[1]


def is_smoke(results: dict) -> bool:
    """A ``--quick`` run: a smoke test whose numbers are not results."""
    return bool(results.get("quick"))


SMOKE_BANNER = ("**SMOKE TEST (`--quick`)**: 5% of the step budget, small data, at most 2 seeds. It shows that "
                "every task and optimizer runs; the numbers below are not results, and no target is judged. "
                "The results are those of the full run (`python benchmarks/convergence.py`).")


def opts_of(task: dict) -> list[str]:
    seen: list[str] = []
    for r in task["runs"]:
        if r["opt"] not in seen:
            seen.append(r["opt"])
    return seen


# ------------------------------------------------------------------- tables
def task_table(task: dict) -> str:
    """Markdown table of one task: every optimizer, mean ± sd over seeds, per-seed ratio to AdamW."""
    runs, conv, two = task["runs"], "f_star" in task, task["group"] == "two-component"
    tun = task["adamw_tuning"]
    head = ["optimizer", "final train loss", "train acc %", "test acc %"]
    if conv:
        head.insert(2, "rel. suboptimality")
    if two:
        head += ["old-task acc % (retention)", "encoder drift ‖Δθ‖/‖θ₀‖"]
    head += ["train loss ÷ AdamW, per seed", "s/run"]
    lines = [f"### {task['task']}", "",
             f"{task['data_note'] or ''} {task['n_train']} train / {task['n_test']} test samples, "
             f"{task['steps']} steps, batch {task['batch_size'] or 'full'}.".strip()]
    if two:
        lines.append("Param groups [encoder, head]. AdamW tuned per component: "
                     f"head lr {tun['best_lr']:g}, encoder lr {tun['best_enc_lr']:g} "
                     f"(grid {len(tun['grid'])} pairs × 1 seed on a validation split, by {tun['criterion']}; "
                     "the pair with the lowest training loss there was "
                     f"head {tun['lr_min_train_loss'][0]:g} / encoder {tun['lr_min_train_loss'][1]:g}).")
        old = mean(_vals(runs, runs[0]["opt"], "pretrained_old_acc"))
        lines.append(f"Old-task test accuracy of the pretrained encoder before fine-tuning: {100 * old:.2f}%.")
    else:
        edge = " **(best lr at the edge of the grid)**" if tun["at_edge"] else ""
        lines.append(f"AdamW lr {tun['best_lr']:g} tuned on a validation split over "
                     f"{[g[0] for g in tun['grid']]} (1 seed, same steps, by {tun['criterion']}){edge}; "
                     f"the lr with the lowest training loss there was {tun['lr_min_train_loss'][0]:g}.")
    if conv:
        lines.append(f"L-BFGS optimum of the training objective: {task['f_star']:.6g}.")
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = _vals(runs, "adamw-tuned", "train_loss")
    best_loss = best(task, "train_loss", lowest=True)
    for opt in opts_of(task):
        loss = _vals(runs, opt, "train_loss")
        row = [f"**{opt}** (best)" if opt == best_loss else opt, pm(loss)]
        if conv:
            row.append(pm(_vals(runs, opt, "rel_subopt"), 3))
        row += [pm(_vals(runs, opt, "train_acc"), pct=True), pm(_vals(runs, opt, "test_acc"), pct=True)]
        if two:
            row += [pm(_vals(runs, opt, "retention_acc"), pct=True), pm(_vals(runs, opt, "encoder_drift"), 3)]
        ratios = [a / b if b > 0 else math.nan for a, b in zip(loss, ref)]
        row.append(" / ".join(fmt(x, 3) for x in ratios) if ref else "")
        row.append(f"{mean(_vals(runs, opt, 'seconds')):.2f}")
        errors = {r["error"] for r in runs if r["opt"] == opt and r.get("error")}
        if errors:
            row[0] += f" (error: {'; '.join(errors)[:120]})"
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"(best) marks the lowest mean final training loss of the task: {best_loss}."]
    if two:
        lines += ["", pareto_text(task)]
    return "\n".join(lines) + "\n"


def pareto(task: dict) -> list[tuple[str, float, float, bool]]:
    """(optimizer, new-task test acc, retention acc, on the Pareto front) for every optimizer."""
    pts = [(o, mean(_vals(task["runs"], o, "test_acc")), mean(_vals(task["runs"], o, "retention_acc")))
           for o in opts_of(task)]
    pts = [p for p in pts if math.isfinite(p[1]) and math.isfinite(p[2])]
    out = []
    for o, a, r in pts:
        dominated = any(a2 >= a and r2 >= r and (a2 > a or r2 > r) for _, a2, r2 in pts)
        out.append((o, a, r, not dominated))
    return out


def pareto_text(task: dict) -> str:
    front = sorted((p for p in pareto(task) if p[3]), key=lambda p: -p[1])
    items = ", ".join(f"{o} ({100 * a:.2f}% new / {100 * r:.2f}% old)" for o, a, r, _ in front)
    return f"Pareto front of (new-task test acc, old-task retention), means over seeds: {items}."


def first_divergence(task: dict, a: str, b: str, rel: float = 1e-3) -> float:
    """First step (seed 0, curve resolution) where the loss curves of ``a`` and ``b`` differ by > ``rel``."""
    ra = next((r for r in task["runs"] if r["opt"] == a and r["seed"] == 0 and r.get("loss_curve")), None)
    rb = next((r for r in task["runs"] if r["opt"] == b and r["seed"] == 0 and r.get("loss_curve")), None)
    if ra is None or rb is None:
        return math.nan
    ca, cb = ra["loss_curve"], rb["loss_curve"]
    for i, (x, y) in enumerate(zip(ca, cb)):
        if not abs(x - y) <= rel * abs(y):
            return task["steps"] * i / len(cb)
    return math.inf


def _step_text(step: float) -> str:
    return "never" if step == math.inf else fmt(step, 4)


def paired_noise(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error of the per-seed log ratios log(a/b)."""
    logs = [math.log(x / y) for x, y in zip(a, b) if x > 0 and y > 0]
    if len(logs) != len(a) or not logs:
        return math.nan, math.nan
    m = sum(logs) / len(logs)
    se = statistics.stdev(logs) / math.sqrt(len(logs)) if len(logs) > 1 else math.nan
    return m, se


def targets(results: dict) -> tuple[str, dict]:
    """Check the issue's targets; return a markdown table and the verdicts per pair.

    In a smoke test (``--quick``) the ratios are shown but no verdict is given."""
    smoke = is_smoke(results)
    rows, verdict = [], {p: {"loss": True, "acc": True, "prodigy": True, "noise": True, "present": False}
                         for p in PAIRS}
    head = ["task", "K-Prodigy ÷ AdamW train loss", "≤ 1.01", "K-Prodigy vs AdamW test acc (rel.)", "≥ −5%",
            "K-Prodigy ÷ prodigyopt train loss, per seed", "test acc Δ vs prodigyopt (pts)", "as good",
            "paired log-ratio ± s.e.", "curves part at step"]
    for name, task in results["tasks"].items():
        runs, grp = task["runs"], task["group"]
        present = {r["opt"] for r in runs}
        if not {"kprodigy", "adamw-tuned", "prodigyopt"} <= present:
            continue
        same = "kprodigy"  # the defaults: like-for-like with prodigyopt (one shared D) on every task
        kl, al = mean(_vals(runs, "kprodigy", "train_loss")), mean(_vals(runs, "adamw-tuned", "train_loss"))
        ka, aa = mean(_vals(runs, "kprodigy", "test_acc")), mean(_vals(runs, "adamw-tuned", "test_acc"))
        sl, pl = _vals(runs, same, "train_loss"), _vals(runs, "prodigyopt", "train_loss")
        sa, pa = mean(_vals(runs, same, "test_acc")), mean(_vals(runs, "prodigyopt", "test_acc"))
        lr, ar = kl / al if al > 0 else math.nan, ka / aa - 1 if aa > 0 else math.nan
        ok_loss = math.isfinite(lr) and lr <= 1 + LOSS_TOL
        ok_acc = math.isfinite(ar) and ar >= -ACC_TOL
        pr = [a / b if b > 0 else math.nan for a, b in zip(sl, pl)]
        ok_p = (bool(pr) and math.isfinite(mean(sl)) and mean(sl) <= mean(pl) * (1 + PRODIGY_TOL)
                and math.isfinite(sa) and sa >= pa - 0.01)
        m, se = paired_noise(sl, pl)
        within_noise = ok_p or (math.isfinite(m) and math.isfinite(se) and m <= 2 * se)
        v = verdict[grp]
        v["present"] = True
        v["loss"] &= ok_loss
        v["acc"] &= ok_acc
        v["prodigy"] &= ok_p
        v["noise"] &= within_noise
        yn = lambda b: "n/a" if smoke else "yes" if b else "**no**"  # noqa: E731
        rows.append([name + (f" (prodigyopt vs {same})" if same != "kprodigy" else ""), fmt(lr, 4), yn(ok_loss),
                     f"{100 * ar:+.2f}%", yn(ok_acc), " / ".join(fmt(x, 4) for x in pr),
                     f"{100 * (sa - pa):+.2f}", yn(ok_p), f"{m:+.3f} ± {se:.3f}",
                     _step_text(first_divergence(task, same, "prodigyopt"))])
    present = [p for p in PAIRS if verdict[p]["present"]]
    if not present:
        return "(targets need kprodigy, prodigyopt and adamw-tuned runs)\n", verdict
    n_loss = sum(verdict[p]["loss"] for p in present)
    n_acc = sum(verdict[p]["acc"] for p in present)
    n_prod = sum(verdict[p]["prodigy"] for p in present)
    n_noise = sum(verdict[p]["noise"] for p in present)
    text = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    if smoke:
        text += ["", f"Task/model pairs run: {len(present)} of {len(PAIRS)}. Targets are not judged in a smoke test "
                 "(`--quick`): its budget is too small for its numbers to mean anything."]
        return "\n".join(text) + "\n", verdict
    text += ["", f"Task/model pairs run: {len(present)} of {len(PAIRS)} "
             "(logreg counts as one pair and meets a target only if all its data sets do). "
             "K-Prodigy means defaults (one D shared by all param groups, as prodigyopt).",
             f"- Train loss within 1% of tuned AdamW or better: **{n_loss}/{len(present)}** "
             f"(target ≥ 4 of 6): {'met' if n_loss >= 4 else 'MISSED'}.",
             f"- Test accuracy never more than 5% worse: **{n_acc}/{len(present)}**: "
             f"{'met' if n_acc == len(present) else 'MISSED'}.",
             f"- At least as good as prodigyopt (mean train loss ≤ +1%, test acc ≥ −1 pt, same seeds): "
             f"**{n_prod}/{len(present)}**: {'met' if n_prod == len(present) else 'MISSED'}. "
             f"Where not, the paired per-seed log-ratio is within 2 standard errors of 0 on "
             f"{n_noise}/{len(present)} pairs (difference not distinguishable from seed noise); "
             "'curves part at step' is where the seed-0 loss curves first differ by more than 0.1%."]
    return "\n".join(text) + "\n", verdict


def grid_table(results: dict, key: str, pct: bool = False, lowest: bool = True) -> str:
    """Tasks × standard optimizers, mean ± sd of ``key``; the best of each row in bold."""
    head = ["task"] + STANDARD
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, task in results["tasks"].items():
        top = best(task, key, lowest, among=STANDARD)
        cells = [pm(_vals(task["runs"], o, key), pct=pct) for o in STANDARD]
        cells = [f"**{c}**" if o == top else c for o, c in zip(STANDARD, cells)]
        lines.append("| " + " | ".join([name] + cells) + " |")
    return "\n".join(lines) + "\n"


def best_table(results: dict) -> str:
    """Per task, over every optimizer run: the lowest final train loss and the highest test accuracy."""
    lines = ["| task | lowest train loss | highest test acc % |", "|---|---|---|"]
    for name, task in results["tasks"].items():
        bl, ba = best(task, "train_loss", lowest=True), best(task, "test_acc", lowest=False)
        loss = f"{bl} ({fmt(mean(_vals(task['runs'], bl, 'train_loss')))})" if bl else "nan"
        acc = f"{ba} ({100 * mean(_vals(task['runs'], ba, 'test_acc')):.2f})" if ba else "nan"
        lines.append(f"| {name} | {loss} | {acc} |")
    return "\n".join(lines) + "\n"


def defaults_table(results: dict) -> str:
    """Evidence for the contested defaults: each variant against K-Prodigy defaults, per task."""
    variants = [("kprodigy-bc", "use_bias_correction=True"), ("kprodigy-f5", "d_update_freq=5")]
    head = ["task"] + [f"{v} ({d}) loss ÷ default" for v, d in variants] + \
           [f"{v} test acc Δ (pts)" for v, _ in variants] + ["s/run default / bc / f5"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    tally = {v: [0, 0, 0] for v, _ in variants}  # wins, ties (±1%), losses on mean train loss
    logs: dict[str, list[float]] = {v: [] for v, _ in variants}
    accs: dict[str, list[float]] = {v: [] for v, _ in variants}
    for name, task in results["tasks"].items():
        runs = task["runs"]
        base_l, base_a = mean(_vals(runs, "kprodigy", "train_loss")), mean(_vals(runs, "kprodigy", "test_acc"))
        ratios, dacc = [], []
        for v, _ in variants:
            r = mean(_vals(runs, v, "train_loss")) / base_l if base_l > 0 else math.nan
            da = mean(_vals(runs, v, "test_acc")) - base_a
            ratios.append(fmt(r, 4))
            dacc.append(f"{100 * da:+.2f}")
            accs[v].append(da)
            logs[v].append(math.log(r) if r > 0 else math.inf)
            tally[v][0 if r < 1 - LOSS_TOL else 2 if not r <= 1 + LOSS_TOL else 1] += 1
        secs = " / ".join(f"{mean(_vals(runs, o, 'seconds')):.2f}" for o in ["kprodigy", "kprodigy-bc", "kprodigy-f5"])
        lines.append("| " + " | ".join([name] + ratios + dacc + [secs]) + " |")
    lines.append("")
    for v, d in variants:
        gm = math.exp(sum(logs[v]) / len(logs[v])) if logs[v] else math.nan
        w, t, lo = tally[v]
        lines.append(f"- `{d}` against the default: lower mean train loss on {w} tasks, within ±1% on {t}, "
                     f"higher on {lo}; geometric-mean loss ratio {fmt(gm, 4)} (< 1 favours the variant); "
                     f"mean test acc Δ {100 * mean(accs[v]):+.2f} pts.")
    return "\n".join(lines) + "\n"


def summary(results: dict) -> str:
    tgt, _ = targets(results)
    out = ["## Convergence benchmark summary", ""]
    if is_smoke(results):
        out += [SMOKE_BANNER, ""]
    out += [f"Machine: {results['machine']}. Seeds: {results['seeds']}. "
           f"Step scale: {results['step_scale']:g}. Wall time: {results.get('wall_seconds', 0) / 60:.1f} min.",
           f"Command: `{results['command'].strip()}` ({results.get('code', 'code version not recorded')}).", ""]
    out += [f"**FALLBACK**: {f}." for f in results.get("fallbacks", [])] + ([""] if results.get("fallbacks") else [])
    out += [
           "### Final training loss (mean ± sd over seeds; lowest of each task in bold)", "",
           grid_table(results, "train_loss"),
           "### Test accuracy % (mean ± sd over seeds; highest of each task in bold)", "",
           grid_table(results, "test_acc", pct=True, lowest=False),
           "### Best per task (every optimizer run, means over seeds)", "", best_table(results),
           "### Targets", "", tgt, "### Defaults evidence", "", defaults_table(results)]
    return "\n".join(out)


# ---------------------------------------------------------------- writing
def _plot_task(task: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for opt in opts_of(task):
        if opt.startswith("adamw ") or any(r.get("error") for r in task["runs"] if r["opt"] == opt):
            continue
        curves = [r["loss_curve"] for r in task["runs"] if r["opt"] == opt and r.get("loss_curve")]
        n = min(len(c) for c in curves)
        avg = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
        xs = [task["steps"] * (i + 0.5) / n for i in range(n)]
        ax1.plot(xs, avg, label=opt)
        seed0 = next(r for r in task["runs"] if r["opt"] == opt)
        if task["group"] == "two-component" and opt not in D_PLOT_TWO_COMPONENT:
            continue
        for gi, dc in enumerate(seed0.get("d_curve") or []):
            lab = opt if len(seed0["d_curve"]) == 1 else f"{opt} [{['encoder', 'head'][gi]}]"
            ax2.plot([task["steps"] * (i + 0.5) / len(dc) for i in range(len(dc))], dc, label=lab,
                     linestyle="-" if gi == len(seed0["d_curve"]) - 1 else "--")
    ax1.set(yscale="log", xlabel="step", ylabel="minibatch training loss (mean over seeds)", title=task["task"])
    ax2.set(yscale="log", xlabel="step", ylabel="D (seed 0)", title=f"{task['task']}: D over steps")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_overview(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"].values())
    cols = min(3, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for opt in STANDARD:
            curves = [r["loss_curve"] for r in task["runs"] if r["opt"] == opt and r.get("loss_curve")]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            ax.plot([task["steps"] * (i + 0.5) / n for i in range(n)],
                    [sum(c[i] for c in curves) / len(curves) for i in range(n)], label=opt, lw=1)
        ax.set(yscale="log", title=task["task"], xlabel="step")
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Minibatch training loss, mean over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _plot_pareto(task: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for o, a, r, front in pareto(task):
        ax.scatter(100 * r, 100 * a, marker="o" if o.startswith("kprodigy") else "s",
                   color="C3" if front else ("C0" if o.startswith("kprodigy") else "C7"))
        ax.annotate(o, (100 * r, 100 * a), fontsize=7)
    ax.set(xlabel="old-task accuracy % after fine-tuning (retention)", ylabel="new-task test accuracy %",
           title="two-component: red = Pareto front (means over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_all(results: dict, out_dir: str) -> None:
    """Markdown tables, plots and raw json under ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    parts = [summary(results), "## Per-task results", ""]
    for name, task in results["tasks"].items():
        parts.append(task_table(task))
        png = f"convergence_{name}.png"
        _plot_task(task, os.path.join(out_dir, png))
        parts.append(f"![{name}]({png})\n")
        if task["group"] == "two-component":
            _plot_pareto(task, os.path.join(out_dir, "convergence_two_component_pareto.png"))
            parts.append("![pareto](convergence_two_component_pareto.png)\n")
    _plot_overview(results, os.path.join(out_dir, "convergence_overview.png"))
    with open(os.path.join(out_dir, "convergence.md"), "w") as f:
        f.write("# Convergence benchmark results\n\nGenerated by `benchmarks/convergence.py`; do not edit.\n\n")
        if is_smoke(results):
            f.write(SMOKE_BANNER + "\n\n")
        f.write("\n".join(parts))
    with open(os.path.join(out_dir, "convergence.json"), "w") as f:
        json.dump(_rounded_curves(results), f, default=float)


def _rounded_curves(results: dict) -> dict:
    """Copy of ``results`` with curves rounded to 5 significant digits (keeps the json small)."""
    r5 = lambda x: float(f"{x:.5g}")  # noqa: E731
    out = {**results, "tasks": {}}
    for name, task in results["tasks"].items():
        runs = [{**r, "loss_curve": [r5(x) for x in r.get("loss_curve", [])],
                 "d_curve": [[r5(x) for x in c] for c in r.get("d_curve", [])]} for r in task["runs"]]
        out["tasks"][name] = {**task, "runs": runs}
    return out
