"""Does ``safeguard_warmup`` help a transformer LM on top of bias correction? Two model sizes, three
lr schedules, two run lengths, 3 seeds, against AdamW tuned per budget.

    python benchmarks/lm_presets.py                    # the study: 150 min of training on a shared 2-core CPU
    python benchmarks/lm_presets.py --quick            # smoke test (seconds): its numbers are not results
    python benchmarks/lm_presets.py --update-results   # write benchmarks/results/presets/lm_presets.{md,json}

Why: docs/presets.md advised, for a transformer LM with a warm-up/cosine schedule,
``use_bias_correction=True`` plus ``safeguard_warmup=True`` for runs of 300+ steps, from one 0.12M
parameter LM (``lm_task.py``); a held-out char-level LM (cosine without warm-up, 800 steps, one seed)
lost 0.10 nats with ``safeguard_warmup`` added. This study re-measures that choice on more than one
LM.

Text, model, batches and the AdamW baseline are ``lm_task.py``'s (Debian's ``fortunes``, or
``--text FILE``; a byte-level GPT; no weight decay; AdamW with a 5% linear warm-up then cosine, its
lr chosen per (size, length) over ``ADAMW_GRID`` by the validation loss of seed 0, then run with
every seed). Axes:

- sizes (``SIZES``): ``S``, lm_task.py's model (2 layers, d_model 64, context 64, 0.12M
  parameters) and ``M`` (2 layers, d_model 128, context 64, 0.43M parameters); batch 16 for both;
- lengths (``LENGTHS``): separate runs of 300 and 1000 steps (the schedule spans the run);
- lr schedules: ``cosine`` (to 0, no warm-up) and ``warmup+cosine`` (5% linear warm-up, then
  cosine to 0); a constant lr is ``lm_task.py``'s;
- K-Prodigy presets (``PRESETS``), untuned, ``lr=1``: the defaults (prodigyopt's),
  ``use_bias_correction=True``, and both options (size M: the last two only, ``SIZE_PRESETS``; its
  AdamW grid 3e-4..1e-2, ``SIZE_GRID``: both for time on a shared CPU);
- seeds 0, 1, 2.

Reported: test loss (nats per byte, a split used for no choice) and validation loss, mean ± sd over
seeds; the paired effect of adding ``safeguard_warmup`` to bias correction (the ratio of losses and
on how many seeds it was lower); D at the end. Each finished run is appended to
``lm_presets_runs.jsonl`` as it ends (in the output folder, or a fresh ``benchmarks/out/`` folder with
``--update-results``; removed once the report is written), so an interrupted study keeps what it
measured.
"""

from __future__ import annotations

import argparse
import json
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

SIZES: dict[str, L.LMConfig] = {
    "S": L.LMConfig(d_model=64, n_layer=2, n_head=4, context=64, batch=16),
    "M": L.LMConfig(d_model=128, n_layer=2, n_head=4, context=64, batch=16),
}
LENGTHS = (300, 1000)
SCHEDULES = ("cosine", "warmup+cosine")  # constant lr: lm_task.py
WARMUP = 0.05  # warm-up fraction of "warmup+cosine" (AdamW always uses it)
ADAMW_GRID = (1e-3, 3e-3, 1e-2, 3e-2)
# for time, M's grid drops 3e-2 (S chose 3e-3 at both lengths) and adds 3e-4 (M chose 1e-3, the edge of the first grid)
SIZE_GRID: dict[str, tuple[float, ...]] = {"M": (3e-4, 1e-3, 3e-3, 1e-2)}
PRESETS: dict[str, dict[str, bool]] = {
    "defaults": {},
    "bias_correction": {"use_bias_correction": True},
    "bc+safeguard": {"use_bias_correction": True, "safeguard_warmup": True},
}
# the presets run per size (all where absent): the larger model runs only the two compared, for time
SIZE_PRESETS: dict[str, tuple[str, ...]] = {"M": ("bias_correction", "bc+safeguard")}


def _run(c: L.Corpus, cfg: L.LMConfig, kind: str, lr: float, kw: dict, seed: int, steps: int, schedule: str,
         eval_at: tuple[int, ...] = (), windows: int = 256) -> dict[str, Any]:
    sched = "constant" if schedule == "constant" else "cosine"
    warm = WARMUP if schedule == "warmup+cosine" else 0.0
    return L.train(c, kind, lr, kw, seed, steps, sched, warmup=warm, eval_at=eval_at, cfg=cfg, eval_windows=windows)


def run_study(c: L.Corpus, sizes: dict[str, L.LMConfig], lengths: tuple[int, ...], seeds: list[int],
              windows: int = 256, log: Any = print, jsonl: Any = None,
              previous: list[dict[str, Any]] | None = None, only: list[str] | None = None) -> dict[str, Any]:
    """Every run of the study; ``previous``: rows of an interrupted run of the same study (its
    progress file), reused instead of training those runs again; ``only``: these presets only (a
    study split over processes, merged afterwards with ``--resume``)."""
    rows: list[dict[str, Any]] = []
    tuning: dict[str, dict[str, Any]] = {}
    t0 = time.time()
    done = {(r["size"], r["optimizer"], r["schedule"], r["seed"], r["budget"]): r for r in previous or []}

    def add(size: str, name: str, schedule: str, lr: float, seed: int, budget: int, e: dict[str, float],
            sec: float) -> None:
        row = {"size": size, "optimizer": name, "schedule": schedule, "lr": lr, "seed": seed, "budget": budget,
               "seconds": sec, **{k: e[k] for k in ("val", "test", "train_batch", "d")}}
        rows.append(row)
        if jsonl is not None:
            jsonl.write(json.dumps(row) + "\n")
            jsonl.flush()

    def measure(size: str, cfg: L.LMConfig, name: str, kind: str, lr: float, kw: dict, seed: int, steps: int,
                schedule: str, at: tuple[int, ...]) -> None:
        """Train once (or reuse a previous run) and add a row for each step count in ``at``."""
        old = [done.get((size, name, schedule, seed, b)) for b in at]
        if all(old):
            for b, row in zip(at, old):
                add(size, name, schedule, lr, seed, b, row, row["seconds"])
            return
        r = _run(c, cfg, kind, lr, kw, seed, steps, schedule, eval_at=at, windows=windows)
        for b in at:
            add(size, name, schedule, lr, seed, b, r["evals"][b], r["seconds"] * b / steps)

    for size, cfg in sizes.items():
        grid = SIZE_GRID.get(size, ADAMW_GRID)
        for b in lengths:  # AdamW: the grid with the first seed, scored on validation
            for lr in grid:
                measure(size, cfg, f"adamw lr={lr:g}", "adamw", lr, {}, seeds[0], b, "warmup+cosine", (b,))
            scores = {lr: next(r["val"] for r in rows if r["size"] == size and r["optimizer"] == f"adamw lr={lr:g}"
                               and r["budget"] == b) for lr in grid}
            scores = {lr: v if math.isfinite(v) else math.inf for lr, v in scores.items()}
            best = min(grid, key=lambda lr: scores[lr])
            tuning[f"{size}/{b}"] = {"val_loss": {f"{k:g}": v for k, v in scores.items()}, "best_lr": best,
                                     "at_edge": best in (grid[0], grid[-1])}
            for s in seeds:
                if s == seeds[0]:
                    e = next(r for r in rows if r["size"] == size and r["optimizer"] == f"adamw lr={best:g}"
                             and r["budget"] == b)
                    add(size, "adamw-tuned", "warmup+cosine", best, s, b, e, e["seconds"])
                    continue
                measure(size, cfg, "adamw-tuned", "adamw", best, {}, s, b, "warmup+cosine", (b,))
            log(f"  {size}: AdamW, {b} steps: lr {best:g} chosen on validation ({time.time() - t0:.0f} s elapsed)")
        for name in SIZE_PRESETS.get(size, tuple(PRESETS)):
            if only and name not in only:
                continue
            kw = PRESETS[name]
            for b in sorted(lengths, reverse=True):  # the longest first: the cells that matter most
                for s in seeds:
                    for schedule in SCHEDULES:
                        measure(size, cfg, name, "kprodigy", 1.0, kw, s, b, schedule, (b,))
            log(f"  {size}: K-Prodigy {name}: done ({time.time() - t0:.0f} s elapsed)")
    return {"sizes": list(sizes), "lengths": list(lengths), "adamw_tuning": tuning, "rows": rows}


# --------------------------------------------------------------------- report
def _sel(rows: list[dict], **kv: Any) -> list[dict]:
    return sorted((r for r in rows if all(r[k] == v for k, v in kv.items())), key=lambda r: r["seed"])


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs and all(math.isfinite(x) for x in xs) else math.nan


def loss_table(study: dict[str, Any], size: str, key: str) -> str:
    """One row per (optimizer, schedule), one column per length; the lowest mean of a column bold."""
    rows, lengths = [r for r in study["rows"] if r["size"] == size], study["lengths"]
    keys = [("adamw-tuned", "warmup+cosine")] + [(p, s) for p in PRESETS for s in SCHEDULES]
    means = {(o, s, b): _mean([r[key] for r in _sel(rows, optimizer=o, schedule=s, budget=b)])
             for o, s in keys for b in lengths}
    out = ["| optimizer | lr schedule | " + " | ".join(f"{b} steps" for b in lengths) + " |",
           "|---|---|" + "---|" * len(lengths)]
    for o, s in keys:
        if not _sel(rows, optimizer=o, schedule=s):
            continue  # a preset not run at this size
        cells = []
        for b in lengths:
            cell = L._cell([r[key] for r in _sel(rows, optimizer=o, schedule=s, budget=b)])
            col = [v for (o2, s2, b2), v in means.items() if b2 == b and math.isfinite(v)]
            cells.append(f"**{cell}**" if col and means[(o, s, b)] == min(col) else cell)
        label = "AdamW, lr tuned per length" if o == "adamw-tuned" else f"KProdigy {o}"
        out.append(f"| {label} | {s} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def safeguard_table(study: dict[str, Any], key: str = "test") -> str:
    """Adding safeguard_warmup to bias correction: loss(both) / loss(bc), geometric mean over seeds
    of the per-seed ratios, (k/n) = seeds on which both was lower; and both's gap to tuned AdamW."""
    rows, lengths = study["rows"], study["lengths"]
    out = ["| size | lr schedule | " + " | ".join(f"{b} steps: both / bc (k/n) | {b}: bc - AdamW | {b}: both - AdamW"
                                                 for b in lengths) + " |",
           "|---|---|" + "---|---|---|" * len(lengths)]
    for size in study["sizes"]:
        for s in SCHEDULES:
            cells = []
            for b in lengths:
                bc = _sel(rows, size=size, optimizer="bias_correction", schedule=s, budget=b)
                both = _sel(rows, size=size, optimizer="bc+safeguard", schedule=s, budget=b)
                adam = _mean([r[key] for r in _sel(rows, size=size, optimizer="adamw-tuned", budget=b)])
                ratios = [y[key] / x[key] for x, y in zip(bc, both) if x["seed"] == y["seed"]]
                if ratios and all(math.isfinite(q) and q > 0 for q in ratios):
                    g = math.exp(sum(math.log(q) for q in ratios) / len(ratios))
                    k = sum(q < 1 for q in ratios)
                    cell = f"{g:.3f} ({k}/{len(ratios)})"
                    cell = f"**{cell}**" if k == len(ratios) and g < 0.99 else cell
                else:
                    cell = "nan"
                mbc, mboth = _mean([r[key] for r in bc]), _mean([r[key] for r in both])
                cells += [cell, f"{mbc - adam:+.3f}", f"{mboth - adam:+.3f}"]
            out.append(f"| {size} | {s} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def d_table(study: dict[str, Any]) -> str:
    rows, lengths = study["rows"], study["lengths"]
    out = ["| size | preset | lr schedule | " + " | ".join(f"{b} steps" for b in lengths) + " |",
           "|---|---|---|" + "---|" * len(lengths)]
    for size in study["sizes"]:
        for p in PRESETS:
            for s in SCHEDULES:
                if not _sel(rows, size=size, optimizer=p, schedule=s):
                    continue
                ds = [_mean([r["d"] for r in _sel(rows, size=size, optimizer=p, schedule=s, budget=b)])
                      for b in lengths]
                out.append(f"| {size} | {p} | {s} | " + " | ".join(f"{d:.3g}" for d in ds) + " |")
    return "\n".join(out)


def report(results: dict[str, Any]) -> str:
    study = results["study"]
    out = ["# Transformer LMs: `safeguard_warmup` on top of bias correction, by size, schedule and length", "",
           "Generated by `benchmarks/lm_presets.py`; do not edit.", ""]
    if results.get("quick"):
        out += ["**SMOKE TEST (`--quick`)**: a tiny budget and model; these numbers are not results.", ""]
    train_min = sum(r["seconds"] for r in study["rows"] if r["optimizer"] != "adamw-tuned" or r["seed"] != 0) / 60
    out += [f"Machine: {results['machine']}. Code: {results['code']}. Date: {results.get('date', '?')}. "
            f"Wall time: {results['wall_seconds'] / 60:.1f} min; training time, the runs' seconds summed: "
            f"{train_min:.0f} min.",
            f"Command: `{results['command']}`."
            + (" It reused the runs listed in that file, from earlier invocations of this study on the same machine "
               "(interrupted, or split by size and preset over processes; the optimizer's code the same), and trained "
               "the others." if results.get("resumed_from") else ""),
            "",
            f"Text: {results['text']}; splits {results['split_bytes']} bytes (train, validation, test).",
            "Models: byte-level GPT (lm_task.py's), " + "; ".join(
                f"{k}: {c['n_layer']} layers, d_model {c['d_model']}, {c['n_head']} heads, context {c['context']}, "
                f"batch {c['batch']}, {results['n_params'][k]} parameters" for k, c in results["configs"].items())
            + f". Seeds {results['seeds']}.",
            "No weight decay. AdamW: 5% linear warm-up then cosine, lr chosen per (size, length) over "
            f"{list(ADAMW_GRID)} (size M: {list(SIZE_GRID.get('M', ADAMW_GRID))}) by the validation loss of seed "
            f"{results['seeds'][0]}. K-Prodigy: `lr=1`, "
            "untuned; `cosine` (to 0, no warm-up) or `warmup+cosine` (5% warm-up, then cosine). "
            "Each length is its own run. Loss in nats per byte, mean ± sd over seeds; lowest mean of each "
            "column bold.", "",
            "## Adding `safeguard_warmup` to `use_bias_correction=True` (test loss)", "",
            "both / bc: geometric mean over seeds of loss(bc + safeguard_warmup) / loss(bc alone); (k/n): "
            "seeds on which adding it lowered the loss; bold where lower on every seed by more than 1%. "
            "`- AdamW`: mean loss minus tuned AdamW's (nats; negative = better than tuned AdamW).", "",
            safeguard_table(study, "test"), ""]
    for size in study["sizes"]:
        out += [f"## Size {size}: test loss (held out, used for no choice)", "", loss_table(study, size, "test"), "",
                f"## Size {size}: validation loss (AdamW's lr was chosen on it)", "",
                loss_table(study, size, "val"), ""]
    lrs = sorted({float(lr) for t in study["adamw_tuning"].values() for lr in t["val_loss"]})
    out += ["## AdamW tuning (validation loss, seed 0)", "",
            "| size/length | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | chosen |",
            "|---|" + "---|" * (len(lrs) + 1)]
    for k, t in study["adamw_tuning"].items():
        edge = " (grid edge)" if t["at_edge"] else ""
        out.append(f"| {k} | " + " | ".join(f"{t['val_loss'][f'{lr:g}']:.4f}" if f"{lr:g}" in t["val_loss"] else "-"
                                             for lr in lrs)
                   + f" | {t['best_lr']:g}{edge} |")
    out += ["", "## D at the end of each run (mean over seeds)", "", d_table(study)]
    return "\n".join(out) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: tiny models, budgets and text; not results")
    p.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated sizes out of {list(SIZES)}")
    p.add_argument("--text", default=None, help=f"a UTF-8 text file instead of Debian's fortunes (or ${L.TEXT_ENV})")
    p.add_argument("--presets", default="", help=f"comma-separated presets out of {list(PRESETS)} (default: all)")
    p.add_argument("--resume", default="", help="the lm_presets_runs.jsonl of an interrupted run: its runs are reused")
    _output.add_study_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    _output.refuse_smoke_update(args.quick, args.update_results)
    if args.from_json:
        return _output.rerender(args.from_json, args.out, args.update_results, "lm_presets", report, "presets")
    torch.set_num_threads(args.threads)
    names = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in names if s not in SIZES]
    if unknown:
        raise SystemExit(f"unknown size(s) {unknown}; choices: {list(SIZES)}")
    if args.quick:
        sizes = {s: L.LMConfig(d_model=16 * (i + 1), n_layer=1, n_head=2, context=16, batch=4)
                 for i, s in enumerate(names)}
        lengths, seeds, windows = (8, 20), [0, 1], 8
        c = L.corpus(args.text, max_bytes=200_000)
    else:
        sizes, lengths, seeds, windows = {s: SIZES[s] for s in names}, LENGTHS, list(range(args.seeds)), 256
        c = L.corpus(args.text)
    out = _output.output_dir(args.out, args.update_results, subdir="presets")
    n_params = {k: sum(p.numel() for p in L.TinyGPT(cfg).parameters()) for k, cfg in sizes.items()}
    print(("SMOKE TEST (--quick): not results\n" if args.quick else "")
          + f"LM presets: {c.note}; sizes {n_params} parameters; lengths {list(lengths)} steps; seeds {seeds}; "
          f"writes to {out or 'nothing'}", flush=True)
    t0 = time.time()
    machine, code = C.machine_description(), C.code_version()
    jsonl, progress = None, None
    if out is not None:  # never into the committed results: a fresh benchmarks/out/ folder then
        progress = (_output.fresh_dir() if args.update_results else out) / "lm_presets_runs.jsonl"
        progress.parent.mkdir(parents=True, exist_ok=True)
        jsonl = open(progress, "w")  # noqa: SIM115
    try:
        previous = [json.loads(line) for line in open(args.resume)] if args.resume else None
        only = [x for x in args.presets.split(",") if x] or None
        study = run_study(c, sizes, tuple(lengths), seeds, windows, jsonl=jsonl, previous=previous, only=only)
    finally:
        if jsonl is not None:
            jsonl.close()
    results = {"machine": machine, "code": code, "quick": bool(args.quick), "date": time.strftime("%Y-%m-%d"),
               "command": "python benchmarks/lm_presets.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "resumed_from": args.resume or None,
               "text": c.note, "split_bytes": [len(c.train), len(c.val), len(c.test)],
               "configs": {k: cfg.__dict__ for k, cfg in sizes.items()}, "n_params": n_params, "seeds": seeds,
               "wall_seconds": time.time() - t0, "study": study}
    _output.write_report(out, "lm_presets", report(results), results)
    if progress is not None:
        progress.unlink()  # its rows are in lm_presets.json
    return results


if __name__ == "__main__":
    main()
