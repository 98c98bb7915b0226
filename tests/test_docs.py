"""Every ```python block of README.md and docs/*.md runs as written.

The blocks of one page run in order in one namespace, like a reader pasting them one after the
other, seeded with small stand-ins for the names the pages say are the reader's own: ``model``,
``batches``, ``loss_fn(model, batch)``, and for multi-component pages ``unet``, ``text_encoder``,
``text_encoder_1``, ``text_encoder_2``. A block preceded by ``<!-- skip: reason -->`` (needs a
framework or a GPU the tests do not have) is not run; the reason must be given.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)
SKIP = re.compile(r"<!--\s*skip:\s*(\S.*?)\s*-->\s*$")


def blocks(page: Path) -> list[tuple[int, str, str | None]]:
    """(line number, code, skip reason or None) of every python block of ``page``."""
    text = page.read_text()
    out = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").splitlines()
        reason = None
        if before:
            s = SKIP.search(before[-1])
            reason = s.group(1) if s else None
        out.append((text.count("\n", 0, m.start()) + 1, m.group(1), reason))
    return out


def stand_ins() -> dict:
    """The reader's things, small: a model, 8 batches of (x, y), a loss, and components."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(8):
        x = torch.randn(16, 8, generator=gen)
        batches.append((x, x.sum(dim=1, keepdim=True).sin()))

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(model(x), y)

    return {
        "torch": torch,
        "model": model,
        "batches": batches,
        "loss_fn": loss_fn,
        "unet": nn.Sequential(nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 8)),
        "text_encoder": nn.Linear(4, 4),
        "text_encoder_1": nn.Linear(4, 4),
        "text_encoder_2": nn.Linear(4, 4),
    }


def test_pages_have_python_blocks_and_skips_say_why() -> None:
    assert (ROOT / "docs" / "index.md").exists()
    counts = {page.name: len(blocks(page)) for page in PAGES}
    assert counts["README.md"] >= 1 and sum(counts.values()) >= 20, counts
    for page in PAGES:
        for line, _, reason in blocks(page):
            assert reason is None or len(reason) > 5, f"{page.name}:{line}: say why the block is skipped"


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)], ids=lambda p: p.name)
def test_code_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # blocks that save checkpoints write here
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    namespace = stand_ins()
    ran = 0
    try:
        for line, code, reason in blocks(page):
            if reason is not None:
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
    assert ran > 0 or all(r for _, _, r in blocks(page))
