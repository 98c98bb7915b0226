"""Smoke run of the convergence benchmark: every task, every optimizer, a tiny budget.

The full suite (``python benchmarks/convergence.py``) is a benchmark, not a test.
"""

from __future__ import annotations

import math
import os
import sys

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("mnist1d")
pytest.importorskip("dadaptation")
pytest.importorskip("prodigyopt")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import convergence as C  # noqa: E402

SCALE = 0.05  # step budgets x0.05 and small data sets
STEPS = 40


def _configs(task: C.T.Task) -> list[C.OptConfig]:
    if task.two_component:
        return C.two_component_configs((1e-3, 1e-4))
    return C.standard_configs(3e-2 if task.convex else 1e-3)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(C.build_tasks(SCALE)))
def test_every_optimizer_runs_and_lowers_the_loss(name: str) -> None:
    task = C.build_tasks(SCALE)[name]
    data = task.build_data(SCALE)
    for cfg in _configs(task):
        run = C.train_run(task, data, cfg, seed=0, steps=STEPS, scale=SCALE)
        loss, start = run["train_loss"], run["initial_train_loss"]
        assert not run["diverged"], (name, cfg.name)
        assert math.isfinite(loss) and loss < start, (name, cfg.name, start, loss)
        assert 0.0 <= run["test_acc"] <= 1.0
        if cfg.kind != "adamw":
            assert run["d_curve"] and all(d > 0 for d in run["d_curve"][0]), (name, cfg.name)
        if task.two_component:
            assert 0.0 <= run["retention_acc"] <= 1.0 and run["encoder_drift"] >= 0.0


def test_cli_quick_writes_tables_and_plots(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")  # plots only; not in the test extras
    C.main(["--quick", "--tasks", "logreg-iris", "--seeds", "1", "--no-progress", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| kprodigy |" in out and "Targets" in out
    for f in ("convergence.md", "convergence.json", "convergence_logreg-iris.png", "convergence_overview.png"):
        assert (tmp_path / f).exists(), f
