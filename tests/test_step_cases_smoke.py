"""The step-cases benchmark runs end to end and its cases are what they say (no timings checked)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_step_cases_run(one_torch_thread: None, tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))  # step_cases imports convergence and _output
    try:
        spec = importlib.util.spec_from_file_location("step_cases", ROOT / "benchmarks" / "step_cases.py")
        assert spec is not None and spec.loader is not None
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        gen = torch.Generator().manual_seed(0)
        cl = bench.CASES["ConvNet, channels_last conv weights"](gen)
        assert any(x.dim() == 4 and not x.is_contiguous() for x in cl)
        assert sum(not x.is_contiguous() for x in bench.CASES["24 tensors, one with transposed strides"](gen)) == 1
        bench.main(["--rounds", "1", "--out", str(tmp_path)])
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    rows = [line for line in (tmp_path / "step_cases_cpu.md").read_text().splitlines() if line.startswith("| ")][1:]
    assert len(rows) == len(bench.CASES)
    for row in rows:
        ours, theirs = (float(c) for c in row.strip("| ").split(" | ")[1:3])
        assert math.isfinite(ours) and math.isfinite(theirs) and ours > 0 and theirs > 0
