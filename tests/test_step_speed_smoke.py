"""The step-speed benchmark runs end to end at a tiny size (no timings are checked)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_step_speed_runs_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("step_speed", ROOT / "benchmarks" / "step_speed.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        md = bench.main(
            ["--size", "tiny", "--rounds", "1", "--steps", "1", "--only", "4 large", "--out", str(tmp_path)]
        )
    finally:
        torch.set_num_threads(threads)
    text = md.read_text()
    assert "| kprodigy fused |" in text and "| prodigyopt |" in text and "| AdamW fused |" in text
    assert "nan" not in text.lower()


def test_fused_kernels_benchmark_runs_tiny():
    spec = importlib.util.spec_from_file_location("fused_kernels", ROOT / "benchmarks" / "fused_kernels.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    text = bench.main(["--numel", "4096", "--calls", "1"])
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| kernel")]
    assert len(rows) == 6 and "| AdamW fused step (7 words) |" in text
    for row in rows:
        ms, ratio = (float(cell) for cell in row.strip("| ").split(" | ")[1:])
        assert ms >= 0 and ratio >= 0  # NaN fails both (a tiny copy may print 0.00)
