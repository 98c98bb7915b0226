"""Every ```python block of README.md and docs/*.md runs as written, as a reader pastes it.

The blocks of one page run in order in one fresh namespace, like a reader pasting them one after
the other into one interpreter: nothing is provided, so each page defines the small model and data
its blocks use (once, in its first block) and every name a block uses comes from an earlier block
of the same page. Two markers, on the line just above a block:

- ``<!-- needs: pkg[, pkg] -->``: the block needs an optional package (transformers, accelerate,
  lightning, ...); it runs where the package imports (``bash scripts/test.sh`` installs the
  ``integration`` extra) and is skipped, with its later blocks still run, where it does not;
- ``<!-- skip: reason -->``: the block cannot run here at all (a GPU, several processes, a line
  inside another project's script); the reason must be given, and such blocks stay few.
"""

from __future__ import annotations

import importlib.util
import re
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^[ \t]*```python[^\n]*\n(.*?)^[ \t]*```", re.S | re.M)
SKIP = re.compile(r"<!--\s*skip:\s*(\S.*?)\s*-->\s*$")
NEEDS = re.compile(r"<!--\s*needs:\s*(\S.*?)\s*-->\s*$")
MAX_SKIPPED = 8  # blocks that cannot run here, all pages together: keep them few


def _dedent(code: str) -> str:
    lines = code.splitlines(keepends=True)
    indent = min((len(line) - len(line.lstrip()) for line in lines if line.strip()), default=0)
    return "".join(line[indent:] for line in lines)


def blocks(page: Path) -> list[tuple[int, str, str | None, list[str]]]:
    """(line number, code, skip reason or None, packages needed) of every python block of ``page``."""
    text = page.read_text()
    out = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").splitlines()
        reason, needs = None, []
        if before:
            s, n = SKIP.search(before[-1]), NEEDS.search(before[-1])
            reason = s.group(1) if s else None
            needs = [x.strip() for x in n.group(1).split(",")] if n else []
        out.append((text.count("\n", 0, m.start()) + 1, _dedent(m.group(1)), reason, needs))
    return out


def test_pages_have_python_blocks_and_skips_say_why() -> None:
    assert (ROOT / "docs" / "index.md").exists()
    counts = {page.name: len(blocks(page)) for page in PAGES}
    assert counts["README.md"] >= 1 and sum(counts.values()) >= 20, counts
    skipped = []
    for page in PAGES:
        for line, _, reason, needs in blocks(page):
            assert reason is None or len(reason) > 5, f"{page.name}:{line}: say why the block is skipped"
            assert not (reason and needs), f"{page.name}:{line}: one marker per block"
            if reason:
                skipped.append(f"{page.name}:{line}")
    assert len(skipped) <= MAX_SKIPPED, f"too many blocks that never run: {skipped}"


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)], ids=lambda p: p.name)
def test_code_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The page's blocks, in order, in one namespace that starts empty (as a fresh interpreter)."""
    monkeypatch.chdir(tmp_path)  # blocks that save checkpoints or trainer outputs write here
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    namespace: dict = {"__name__": "__main__"}
    ran, missing = 0, set()
    try:
        for line, code, reason, needs in blocks(page):
            if reason is not None:
                continue
            absent = [pkg for pkg in needs if importlib.util.find_spec(pkg) is None]
            if absent:
                missing.update(absent)
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)  # e.g. a slow vmap fallback
                try:
                    exec(compile(code, f"{page.name}:{line}", "exec"), namespace)
                except Exception as exc:
                    raise AssertionError(f"the block at {page.name}:{line} failed: {exc!r}") from exc
            ran += 1
    finally:
        torch.set_num_threads(threads)
    assert ran > 0 or all(r for _, _, r, _ in blocks(page))
    if missing:
        pytest.skip(f"ran {ran} blocks; skipped those that need {sorted(missing)} (not installed)")
