"""Where the benchmarks write: a fresh folder per run, committed results only when asked.

Every benchmark that writes files takes ``--out DIR`` and ``--update-results``. By default a run
writes to a new folder ``benchmarks/out/<YYYYmmdd-HHMMSS>/`` (git-ignored), so that no run, quick or
full, rewrites the files committed under ``benchmarks/results/``. ``--update-results`` writes
there instead (what a release does to refresh the published figures).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"  # committed: changed only with --update-results
OUT_ROOT = HERE / "out"  # git-ignored: one fresh folder per run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--out`` and ``--update-results`` to a benchmark's command line."""
    parser.add_argument("--out", default=None,
                        help="folder to write into (default: a fresh benchmarks/out/<timestamp>/; '' writes nothing)")
    parser.add_argument("--update-results", action="store_true",
                        help=f"overwrite the committed results in {RESULTS_DIR.relative_to(HERE.parent)}/")


def fresh_dir(root: Path | None = None) -> Path:
    """Create and return a new, empty folder ``root/<timestamp>`` (suffixed if that exists)."""
    root = OUT_ROOT if root is None else Path(root)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, i = root / stamp, 1
    while path.exists():
        path, i = root / f"{stamp}-{i}", i + 1
    path.mkdir(parents=True)
    return path


def output_dir(out: str | None, update_results: bool, root: Path | None = None, subdir: str = "") -> Path | None:
    """The folder a run writes into: ``--out`` if given ('' means none), the committed results
    (their ``subdir``) with ``--update-results``, else a fresh folder under ``root`` (default
    ``benchmarks/out``)."""
    if update_results and out is not None:
        raise SystemExit("give either --out or --update-results, not both")
    if update_results:
        (RESULTS_DIR / subdir).mkdir(parents=True, exist_ok=True)
        return RESULTS_DIR / subdir if subdir else RESULTS_DIR
    if out is not None:
        return Path(out) if out else None
    return fresh_dir(root)


def write_report(out: Path | None, name: str, text: str, results: dict) -> None:
    """Print ``text`` and write ``name.md`` (``text``) and ``name.json`` (``results``) into ``out``
    (nothing when ``out`` is None); a ``quick`` run is said to be a smoke test."""
    import json

    print(text)
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))
    print(f"results written under {out}" + (" (a smoke test: not results)" if results.get("quick") else ""))


def refuse_smoke_update(quick: bool, update_results: bool) -> None:
    """``--quick`` numbers are a smoke test: they never replace the committed results."""
    if quick and update_results:
        raise SystemExit("--quick is a smoke test: its numbers must not replace the committed results "
                         "(drop --update-results)")


def rerender(path: str, out: str | None, update_results: bool, name: str, report, subdir: str = "") -> dict:
    """``--from-json``: no training; ``report(results)`` of the saved numbers, written as a run would."""
    import json

    with open(path) as f:
        results = json.load(f)
    refuse_smoke_update(bool(results.get("quick")), update_results)
    write_report(output_dir(out, update_results, subdir=subdir), name, report(results), results)
    return results


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every study shares: ``--seeds``, ``--threads``, ``--from-json``, ``--out``,
    ``--update-results``."""
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1), default 3")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these sizes)")
    parser.add_argument("--from-json", default="", help="no training: re-render the tables from a saved json")
    add_arguments(parser)
