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


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


def test_cli_quick_writes_a_labelled_smoke_run_into_a_fresh_folder(tmp_path, monkeypatch, capsys) -> None:
    """The main job's rules: a fresh output folder by default, committed results untouched,
    a header first, the best marked, and a quick run labelled a smoke test with no verdicts."""
    pytest.importorskip("matplotlib")  # plots only
    import _output

    results = _output.RESULTS_DIR
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*")}
    monkeypatch.setattr(_output, "OUT_ROOT", tmp_path / "out")
    C.main(["--quick", "--tasks", "logreg-iris", "--seeds", "1", "--no-progress"])
    out = capsys.readouterr().out
    (run_dir,) = (tmp_path / "out").iterdir()
    for f in ("convergence.md", "convergence.json", "convergence_logreg-iris.png", "convergence_overview.png"):
        assert (run_dir / f).exists(), f
    assert {p: p.stat().st_mtime_ns for p in results.rglob("*")} == before  # nothing committed was rewritten
    assert out.index("SMOKE TEST") < out.index("Convergence benchmark: 1 task(s)") < out.index("### logreg-iris")
    assert "estimated:" in out and f"writes to:  {run_dir}" in out
    assert "| kprodigy |" in out or "| **kprodigy** (best) |" in out
    assert "(best) marks the lowest" in out and "Best per task" in out and "Targets" in out
    assert "MISSED" not in out and "**no**" not in out and ": met" not in out  # no verdicts in a smoke test
    assert "SMOKE TEST" in (run_dir / "convergence.md").read_text()


def test_output_folder_rules(tmp_path) -> None:
    import _output

    a, b = _output.fresh_dir(tmp_path), _output.fresh_dir(tmp_path)
    assert a != b and a.is_dir() and b.is_dir() and not any(a.iterdir())
    assert _output.output_dir("", False) is None
    assert _output.output_dir(str(tmp_path / "x"), False) == tmp_path / "x"
    assert _output.output_dir(None, True) == _output.RESULTS_DIR
    with pytest.raises(SystemExit):
        _output.output_dir(str(tmp_path), True)
    with pytest.raises(SystemExit, match="smoke test"):
        C.main(["--quick", "--update-results", "--tasks", "logreg-iris"])


def test_header_states_the_run_range_and_every_fallback(monkeypatch) -> None:
    """The header's run count is a range that holds the counter's final total, and a missing
    Fashion-MNIST is announced in the header and in the summary, not only in a task's table."""
    tasks = C.build_tasks(SCALE)
    names = list(tasks)
    counts = {n: C.run_counts(tasks[n], 2, None) for n in names}
    for n, (fewest, most) in counts.items():
        assert fewest <= most and (fewest == most) != tasks[n].convex, n
        assert C.plan([tasks[n]], 2, None)[n][0] == most
    monkeypatch.setattr(C.T, "fashion_available", lambda: False)
    head = C.header(names, tasks, [0, 1], SCALE, True, None, "out")
    total = f"{sum(c[0] for c in counts.values())} to {sum(c[1] for c in counts.values())} training runs"
    assert total in head
    assert "FALLBACK:   Fashion-MNIST not found" in head and "fmnist-mlp, fmnist-cnn" in head
    assert C.fallbacks(["logreg-iris"]) == [] or not C.kprodigy_available()
    import convergence_report as R

    results = {"machine": "m", "seeds": [0], "step_scale": SCALE, "command": "c", "code": "k", "quick": True,
               "tasks": {}, "fallbacks": C.fallbacks(names)}
    monkeypatch.setattr(R, "targets", lambda res: ("", None))
    for name in ("grid_table", "best_table", "defaults_table"):
        monkeypatch.setattr(R, name, lambda *a, **k: "")
    assert "**FALLBACK**: Fashion-MNIST not found" in R.summary(results)
