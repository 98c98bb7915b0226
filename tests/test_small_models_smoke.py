"""The small-model benchmark's settings table runs end to end (no timings are checked)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_settings_table_runs(one_torch_thread: None) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))  # small_models imports convergence
    try:
        spec = importlib.util.spec_from_file_location("small_models", ROOT / "benchmarks" / "small_models.py")
        assert spec is not None and spec.loader is not None
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        lines = bench.settings_table(["MLP 769"], rounds=1)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    rows = lines[2:]
    assert len(rows) == len(bench.SETTINGS)
    for row in rows:
        cells = row.strip("| ").split(" | ")
        ours, theirs = float(cells[2]), float(cells[3])
        assert math.isfinite(ours) and math.isfinite(theirs) and ours > 0 and theirs > 0
