"""Random param sets (layouts x state formats x settings) stepped with a checkpoint round trip
mid-run: every run steps, continues after ``state_dict``/``torch.save``/``load_state_dict`` as it
would have without, and (float64, float32 state, prodigyopt's settings) follows prodigyopt 1.1.2.

The param sets mix what the packed and sliced layouts must handle: params with no elements,
0-dim ones, channels_last conv weights (dense, dim 0 outermost), transposed strides, large ones
stepped in slices. Bounded: ``N_EXAMPLES`` seeds (a wider run found the bugs its examples name in
CHANGELOG.md, "Fixed").
"""

from __future__ import annotations

import io
import random
import warnings
from typing import Any

import prodigyopt
import pytest
import torch

from kprodigy import KProdigy

N_EXAMPLES = 100
POOL = [(3,), (0,), (4, 5), (2, 0), (3, 2, 2, 2), (8, 4, 3, 3), (6, 2), (1,), (), (150, 151), (16, 16, 24, 24)]
STEPS = 10


def _laid(x: torch.Tensor, kind: str) -> torch.Tensor:
    """``x`` with the same values, in channels_last ("cl", 4-D) or with transposed strides ("t", 2-D)."""
    if kind == "cl" and x.dim() == 4:
        return x.to(memory_format=torch.channels_last)
    if kind == "t" and x.dim() == 2:
        return x.t().contiguous().t()
    return x


def _example(seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, Any], int]:
    rng = random.Random(seed)
    shapes = [rng.choice(POOL) for _ in range(rng.randint(1, 6))]
    kinds = [rng.choice(["", "", "cl", "t"]) for _ in shapes]
    kw: dict[str, Any] = {}
    if rng.random() < 0.3:
        kw["weight_decay"] = 0.01
    if rng.random() < 0.2:
        kw["betas"] = (0.0, 0.999)
    if rng.random() < 0.2:
        kw["slice_p"] = 3
    if rng.random() < 0.25:
        kw["state_precision"] = rng.choice(["bfloat16", "int8"])
    if rng.random() < 0.15:
        kw["d_update_freq"] = 2
    dtype = torch.float32 if "state_precision" in kw else torch.float64
    gen = torch.Generator().manual_seed(seed)
    init = [_laid(torch.randn(s, generator=gen, dtype=dtype), k) for s, k in zip(shapes, kinds)]
    pulls = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    return init, pulls, kw, rng.randint(1, STEPS - 1)


def _grads(ps: list[torch.Tensor], pulls: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    return [(p.detach() - t - 0.01 * k).clone(memory_format=torch.preserve_format) for p, t in zip(ps, pulls)]


def _reloaded(opt: Any, cls: Any, ps: list[torch.nn.Parameter], kw: dict[str, Any]) -> Any:
    """A ``cls`` over ``ps`` that loaded ``opt``'s state dict through ``torch.save``/``torch.load``."""
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    new = cls(ps, **kw)
    new.load_state_dict(torch.load(buf))
    return new


def _run(seed: int, cls: Any, reload_at: int | None) -> tuple[list[torch.nn.Parameter], Any]:
    init, pulls, kw, _ = _example(seed)
    torch.manual_seed(seed)  # (the compact formats' stochastic rounding draws from it)
    ps = [torch.nn.Parameter(x.clone(memory_format=torch.preserve_format)) for x in init]
    opt = cls(ps, **kw)
    for k in range(STEPS):
        if k == reload_at:
            opt = _reloaded(opt, cls, ps, kw)
        for p, g in zip(ps, _grads(ps, pulls, k)):
            p.grad = g
        opt.step()
    return ps, opt


@pytest.mark.parametrize("seed", range(N_EXAMPLES))
def test_random_layouts_step_and_continue_after_a_checkpoint(seed: int) -> None:
    init, _, kw, reload_at = _example(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (prodigyopt prints, the D diagnostics warn on short runs)
        ours, opt = _run(seed, KProdigy, None)
        again, _ = _run(seed, KProdigy, reload_at)
        for p, q in zip(ours, again):  # (float32: the checkpoint normalizes the scaled state)
            assert p.shape == q.shape and p.stride() == q.stride()
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
        if "state_precision" in kw or "d_update_freq" in kw:
            return  # (not prodigyopt's: compared with themselves above)
        theirs, popt = _run(seed, prodigyopt.Prodigy, None)
    d, want = opt.param_groups[0]["d"], popt.param_groups[0]["d"]
    assert abs(d - want) <= 1e-9 * want, f"D {d} vs prodigyopt {want}"
    for p, q, x0 in zip(ours, theirs, init):
        if p.numel():
            moved = float((q.detach() - x0).abs().max())
            assert float((p - q).abs().max()) <= 1e-8 * max(moved, 1e-12) + 1e-12


def test_the_examples_hold_what_they_are_for() -> None:
    """A guard on the generator: the layouts, formats and settings above occur."""
    examples = [_example(s) for s in range(N_EXAMPLES)]
    xs = [x for init, _, _, _ in examples for x in init]
    assert sum(x.numel() == 0 for x in xs) >= 5
    assert sum(x.dim() == 4 and not x.is_contiguous() for x in xs) >= 5
    assert sum(x.dim() == 2 and not x.is_contiguous() for x in xs) >= 5
    assert sum(x.numel() > 65_536 for x in xs) >= 5
    assert sum("state_precision" in kw for _, _, kw, _ in examples) >= 5
    assert sum("state_precision" not in kw and "d_update_freq" not in kw for _, _, kw, _ in examples) >= 20


@pytest.mark.parametrize("seed", range(N_EXAMPLES // 2))
def test_random_layouts_checkpoints_move_between_prodigyopt_and_us(seed: int) -> None:
    """A prodigyopt checkpoint taken mid-run loads into KProdigy and continues as prodigyopt would
    (even seeds), and ours into prodigyopt (odd seeds): float64, prodigyopt's settings, the same
    random param sets (channels_last, transposed, no elements)."""
    init, pulls, kw, switch = _example(seed)
    kw = {k: v for k, v in kw.items() if k not in ("state_precision", "d_update_freq")}
    init = [x.double() for x in init]
    pulls = [t.double() for t in pulls]
    first, second = (prodigyopt.Prodigy, KProdigy) if seed % 2 == 0 else (KProdigy, prodigyopt.Prodigy)
    ps = [torch.nn.Parameter(x.clone(memory_format=torch.preserve_format)) for x in init]
    qs = [torch.nn.Parameter(x.clone(memory_format=torch.preserve_format)) for x in init]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt, ref = first(ps, **kw), prodigyopt.Prodigy(qs, **kw)
        for k in range(STEPS):
            if k == switch:
                opt = _reloaded(opt, second, ps, kw)
            for p, g in zip(ps, _grads(ps, pulls, k)):
                p.grad = g
            for q, g in zip(qs, _grads(qs, pulls, k)):
                q.grad = g
            opt.step()
            ref.step()
    d, want = opt.param_groups[0]["d"], ref.param_groups[0]["d"]
    assert abs(d - want) <= 1e-9 * want, f"D {d} vs prodigyopt {want}"
    for p, q, x0 in zip(ps, qs, init):
        if p.numel():
            moved = float((q.detach() - x0).abs().max())
            assert float((p - q).abs().max()) <= 1e-8 * max(moved, 1e-12) + 1e-12
