"""Smoke runs of the presets studies (``benchmarks/lm_task.py``, ``benchmarks/bias_correction.py``):
their ``--quick`` modes run and write labelled outputs into the folder given, nothing committed is
rewritten, and the text corpus is found or a missing one named with the fix.

The studies themselves are benchmarks, not tests. The text here is this repository's own docs
(real English, and present on every checkout), passed with ``--text``; the studies read Debian's
``fortunes`` package by default.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
# the quick runs are short enough that bias correction + safeguard_warmup keeps D near d0: the
# optimizer's stuck-D warning is expected there
pytestmark = [pytest.mark.filterwarnings("ignore::kprodigy.KProdigyWarning"), pytest.mark.usefixtures("one_torch_thread")]

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import lm_task as L  # noqa: E402


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> str:
    """The repository's markdown as one text file (well above the 12 blocks the split needs)."""
    parts = [p.read_bytes() for p in sorted((ROOT / "docs").glob("*.md"))] + [(ROOT / "README.md").read_bytes()]
    data = b"\n".join(parts)
    while len(data) < 16 * L.BLOCK:
        data += data
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_bytes(data)
    return str(path)




def _committed() -> dict[Path, int]:
    import _output

    return {p: p.stat().st_mtime_ns for p in _output.RESULTS_DIR.rglob("*")}


def test_split_puts_every_byte_in_exactly_one_split() -> None:
    data = bytes(range(256)) * 400  # 102400 bytes, 25 blocks
    c = L.split_corpus(data)
    assert len(c.train) + len(c.val) + len(c.test) == len(data)
    assert len(c.val) == len(c.test) == L.BLOCK  # blocks 10 and 11 of 25
    with pytest.raises(SystemExit, match="too short"):
        L.split_corpus(data[: 5 * L.BLOCK])


def test_missing_corpus_names_the_package_and_the_way_out(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv(L.TEXT_ENV, raising=False)
    monkeypatch.setattr(L, "FORTUNES_DIR", str(tmp_path / "absent"))
    monkeypatch.setattr(L, "fortunes_files", lambda root=None: [])
    with pytest.raises(SystemExit, match=r"apt-get install fortunes.*--text FILE"):
        L.load_text()
    with pytest.raises(SystemExit, match="not found"):
        L.load_text(str(tmp_path / "nope.txt"))


def test_lm_quick_writes_a_labelled_smoke_run(tmp_path, text_file, capsys) -> None:
    before = _committed()
    res = L.main(["--quick", "--text", text_file, "--out", str(tmp_path / "lm")])
    out = capsys.readouterr().out
    md, js = (tmp_path / "lm" / "lm_task.md"), (tmp_path / "lm" / "lm_task.json")
    assert md.exists() and js.exists() and _committed() == before
    assert "SMOKE TEST" in out and "SMOKE TEST" in md.read_text()
    saved = json.loads(js.read_text())
    assert saved["quick"] and saved["text"].startswith(text_file)
    names = {r["optimizer"] for r in res["study"]["rows"]}
    assert {"adamw-tuned", *L.PRESETS} <= names
    for r in res["study"]["rows"]:  # every run finished with a finite loss
        assert r["val"] == r["val"] and r["test"] == r["test"], r
    assert "| AdamW, lr tuned per budget | warmup+cosine |" in md.read_text()
    with pytest.raises(SystemExit, match="smoke test"):
        L.main(["--quick", "--update-results", "--text", text_file])
    L.main(["--from-json", str(js), "--out", str(tmp_path / "again")])  # the tables from the saved numbers
    assert (tmp_path / "again" / "lm_task.md").read_text() == md.read_text()
    with pytest.raises(SystemExit, match="smoke test"):
        L.main(["--from-json", str(js), "--update-results"])
    assert _committed() == before


def test_lm_presets_quick_writes_a_labelled_smoke_run(tmp_path, text_file, capsys) -> None:
    import lm_presets as P

    before = _committed()
    res = P.main(["--quick", "--text", text_file, "--out", str(tmp_path / "lmp")])
    out = capsys.readouterr().out
    md = tmp_path / "lmp" / "lm_presets.md"
    assert md.exists() and (tmp_path / "lmp" / "lm_presets.json").exists() and _committed() == before
    assert not (tmp_path / "lmp" / "lm_presets_runs.jsonl").exists()  # progress file removed at the end
    assert "SMOKE TEST" in out and "SMOKE TEST" in md.read_text()
    rows = res["study"]["rows"]
    cells = {(r["size"], r["optimizer"], r["schedule"], r["budget"]) for r in rows if not r["optimizer"].startswith("adamw")}
    n_presets = sum(len(P.SIZE_PRESETS.get(size, P.PRESETS)) for size in P.SIZES)
    assert len(cells) == n_presets * len(P.SCHEDULES) * 2  # 2 lengths in --quick
    assert all(r["val"] == r["val"] for r in rows)
    text = md.read_text()
    assert "## Adding `safeguard_warmup`" in text and "| S | cosine |" in text and "| M | warmup+cosine |" in text
    assert "| S | defaults | cosine |" in text and "| M | defaults |" not in text  # SIZE_PRESETS
    with pytest.raises(SystemExit, match="smoke test"):
        P.main(["--quick", "--update-results", "--text", text_file])
    with pytest.raises(SystemExit, match="unknown size"):
        P.main(["--quick", "--sizes", "XL", "--text", text_file, "--out", ""])


def test_bias_correction_quick_writes_a_labelled_smoke_run(tmp_path, text_file, capsys) -> None:
    import bias_correction as B

    before = _committed()
    res = B.main(["--quick", "--tasks", "logreg-digits,lm", "--text", text_file, "--out", str(tmp_path / "bc")])
    out = capsys.readouterr().out
    md = tmp_path / "bc" / "bias_correction.md"
    assert md.exists() and (tmp_path / "bc" / "bias_correction.json").exists() and _committed() == before
    assert "SMOKE TEST" in out and "SMOKE TEST" in md.read_text()
    cells = {(r["task"], r["length"], r["warmup"], r["setting"]) for r in res["rows"]}
    # 2 lengths + 1 warm-up cell (the 1x/no-warm-up cell is shared for the suite task; the LM's
    # warm-up axis sits at 0.3x, also shared) for each of the 4 settings
    assert len(cells) == 2 * (2 + 1) * len(B.SETTINGS)
    assert all(r["loss"] == r["loss"] for r in res["rows"])
    assert "| bc / off |" in md.read_text() and "## lm (transformer LM" in md.read_text()
    with pytest.raises(SystemExit, match="unknown task"):
        B.main(["--quick", "--tasks", "nope"])


def test_warmup_zero_is_the_suites_cosine() -> None:
    import math

    import convergence as C

    for steps in (7, 100):
        for t in range(steps):
            assert C.cosine_multiplier(t, steps) == 0.5 * (1.0 + math.cos(math.pi * t / steps))
    assert [C.cosine_multiplier(t, 10, 0.3) for t in range(3)] == [1 / 3, 2 / 3, 1.0]
    assert L.lr_multiplier(5, 10, "constant") == 1.0


@pytest.mark.skipif(not L.fortunes_files(), reason="Debian's fortunes package is not installed")
def test_default_corpus_is_debians_fortunes() -> None:
    c = L.corpus()
    assert "fortunes" in c.note and len(c.train) > 1_000_000 and len(c.val) > 50_000
    assert os.path.isdir(L.FORTUNES_DIR)


def test_presets_page_points_at_results_of_the_current_version() -> None:
    """Every table of docs/presets.md names the committed results file it was copied from, and that
    file was written by a full run (not a smoke test) of the current version."""
    import re

    import kprodigy

    page = (ROOT / "docs" / "presets.md").read_text()
    sources = re.findall(r"<!-- figures: (\S+) -->", page)
    assert sources, "docs/presets.md names no results file"
    for src in sources:
        text = (ROOT / src).read_text()
        assert f"kprodigy {kprodigy.__version__}" in text, src
        assert "SMOKE TEST" not in text, src
