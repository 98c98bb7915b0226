"""Step time of the default KProdigy against prodigyopt and torch's fused AdamW, small to large.

Usage (from the repository root)::

    PYTHONPATH=$PWD python benchmarks/small_models.py --out /tmp/bench   # [--rounds N] [--quick]
    git archive <rev> kprodigy | tar -x -C /tmp/before && mv /tmp/before/kprodigy /tmp/before/kprodigy_before
    PYTHONPATH=$PWD python benchmarks/small_models.py --before /tmp/before     # adds that version

Workloads: a 10-64-1 MLP (769 params, 4 tensors), a small CNN (~100k params, 10 tensors), 400
LoRA-like rank-8 factors of 512 (1.6M params), 300 tensors of 64x64, 4 tensors of 4096x2048.
Peers: the default KProdigy, KProdigy(fused=True) (the compiled kernels), prodigyopt, torch's
fused AdamW. The first step of each (state creation, and for fused=True the compile) is reported
in seconds beside the steady medians. Gradients come from a quadratic pull (g = 0.1 (x - 0.5)
+ fixed noise), recomputed outside the timed region, so that D settles instead of overflowing
(a fixed gradient makes D grow until every step is skipped, which measures the skip). Every
optimizer owns a copy of the params; rounds step each optimizer a few times in a shuffled order
(one process, interleaved); the per-step median is reported, with ratios to prodigyopt and to
fused AdamW. A second table (unless ``--no-settings``) steps KProdigy against prodigyopt with
the same setting on the MLP, the CNN and 300 x 64x64: prodigyopt's options a user carries over
(slice_p=11, betas[0]=0, weight decay decoupled and coupled, bias correction with
safeguard_warmup, bfloat16 params) and ours (d_update_freq, D frozen by d_steps), so that
"never slower than prodigyopt" is measured beyond the defaults. Writes ``small_models.md`` into ``--out`` (a fresh folder under benchmarks/out/ by
default, never over benchmarks/results/).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import convergence as C  # code_version, machine_description: the header every benchmark writes
import torch

from kprodigy import KProdigy

BEFORE: list[Any] = []  # KProdigy classes of another version (--before)


class Functional:
    """``kprodigy.functional.step`` (``pure``: new tensors each step) or ``step_`` (in place) over
    a model's params, as an optimizer with ``step()``: the params take the step's new values."""

    def __init__(self, params: list[torch.nn.Parameter], pure: bool) -> None:
        import kprodigy.functional as F

        self.F, self.params, self.pure, self.hp = F, params, pure, F.Hyperparams()
        self.xs = [p.detach() for p in params]
        self.state = F.init_state(self.xs, self.hp)
        self.param_groups = [{"skipped_steps": 0}]

    def step(self) -> None:
        grads = [p.grad for p in self.params]
        if self.pure:
            self.xs, self.state = self.F.step(self.xs, grads, self.state, self.hp)
            for p, x in zip(self.params, self.xs):
                p.data = x
        else:
            self.state = self.F.step_(self.xs, grads, self.state, self.hp)


def shapes(name: str) -> list[tuple[int, ...]]:
    if name == "MLP 769":
        return [(64, 10), (64,), (1, 64), (1,)]
    if name == "CNN ~100k":
        return [(32, 3, 3, 3), (32,), (64, 32, 3, 3), (64,), (64, 64, 3, 3), (64,), (128, 64), (128,), (10, 128), (10,)]
    if name == "400 LoRA r8":
        return [(8, 512), (512, 8)] * 200
    if name == "300 x 64x64":
        return [(64, 64)] * 300
    if name == "4 x 4096x2048":
        return [(4096, 2048)] * 4
    raise KeyError(name)


def peers() -> dict[str, Any]:
    out: dict[str, Any] = {"kprodigy": lambda ps: KProdigy(ps), "kprodigy-fused": lambda ps: KProdigy(ps, fused=True)}
    out["functional-step"] = lambda ps: Functional(ps, pure=True)
    out["functional-step_"] = lambda ps: Functional(ps, pure=False)
    for cls in BEFORE:
        out["kprodigy-before"] = lambda ps, cls=cls: cls(ps)
    try:
        import prodigyopt

        out["prodigyopt"] = lambda ps: prodigyopt.Prodigy(ps)
    except ImportError:
        print("prodigyopt not installed: skipped", file=sys.stderr)
    out["adamw-fused"] = lambda ps: torch.optim.AdamW(ps, fused=True)
    return out


def bench(
    name: str,
    rounds: int,
    steps: int,
    makers: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    base: list[torch.Tensor] | None = None,
) -> dict[str, float]:
    """Median ms per step of each peer (``makers``: name -> factory over a list of params) on the
    workload ``name``, or on params made from ``base`` (their layout kept, the noise laid alike)."""
    gen = torch.Generator().manual_seed(0)
    if base is None:
        base = [torch.randn(s, generator=gen).to(dtype) for s in shapes(name)]
    noise = [torch.empty_like(b).copy_(0.01 * torch.randn(b.shape, generator=gen).to(b.dtype)) for b in base]
    runs = {}
    for peer, make in (peers() if makers is None else makers).items():
        ps = [torch.nn.Parameter(b.clone()) for b in base]
        runs[peer] = (ps, make(ps), [])
    first: dict[str, float] = {}
    order = list(runs)
    for r in range(rounds + 1):
        random.Random(r).shuffle(order)
        for peer in order:
            ps, opt, times = runs[peer]
            for _ in range(steps):
                with torch.no_grad():
                    for p, n in zip(ps, noise):
                        p.grad = torch.add(n, p, alpha=0.1).sub_(0.05)
                t = time.perf_counter()
                opt.step()
                dt = time.perf_counter() - t
                if r > 0:  # round 0 warms up (state creation, compiling)
                    times.append(dt)
                first.setdefault(peer, dt)
    out = {peer: statistics.median(times) * 1e3 for peer, (_, _, times) in runs.items()}
    out.update({f"first {peer}": dt for peer, dt in first.items()})
    out["skipped"] = float(runs["kprodigy"][1].param_groups[0]["skipped_steps"])
    return out


# (label, KProdigy settings, prodigyopt settings or None for its defaults, param dtype): prodigyopt's
# options a user carries over, and ours (compared with prodigyopt at its defaults)
SETTINGS: list[tuple[str, dict[str, Any], dict[str, Any] | None, torch.dtype]] = [
    ("defaults", {}, {}, torch.float32),
    ("slice_p=11", {"slice_p": 11}, {"slice_p": 11}, torch.float32),
    ("betas=(0, 0.999)", {"betas": (0.0, 0.999)}, {"betas": (0.0, 0.999)}, torch.float32),
    ("weight_decay=0.01", {"weight_decay": 0.01}, {"weight_decay": 0.01}, torch.float32),
    ("weight_decay=0.01, decouple=False", {"weight_decay": 0.01, "decouple": False}, None, torch.float32),
    (
        "bias correction + safeguard_warmup",
        {"use_bias_correction": True, "safeguard_warmup": True},
        {"use_bias_correction": True, "safeguard_warmup": True},
        torch.float32,
    ),
    ("bfloat16 params, fp32 state", {"state_precision": "float32"}, {}, torch.bfloat16),
    ("bfloat16 params (bf16 state, the default)", {}, {}, torch.bfloat16),
    ("ours: d_update_freq=5", {"d_update_freq": 5}, None, torch.float32),
    ("ours: d_steps=2 (D frozen)", {"d_steps": 2}, None, torch.float32),
]


def settings_table(names: list[str], rounds: int) -> list[str]:
    """Per workload and setting: KProdigy against prodigyopt with the same setting (``None``: at
    its defaults, for a setting it does not have; ``decouple=False`` is prodigyopt's coupled decay)."""
    import prodigyopt

    lines = [
        "| workload | setting | kprodigy ms | prodigyopt ms | prodigyopt / kprodigy |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        for label, ours, theirs, dtype in SETTINGS:
            if theirs is None and "decouple" in ours:
                theirs = dict(ours)
            makers = {
                "kprodigy": lambda ps, kw=ours: KProdigy(ps, **kw),
                "prodigyopt": lambda ps, kw=theirs or {}: prodigyopt.Prodigy(ps, **kw),
            }
            res = bench(name, rounds, 20, makers, dtype)
            k, p = res["kprodigy"], res["prodigyopt"]
            lines.append(f"| {name} | {label} | {k:.3f} | {p:.3f} | {p / k:.2f}x |")
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out") / time.strftime("%Y%m%d-%H%M%S"))
    parser.add_argument("--quick", action="store_true", help="skip the 4 x 4096x2048 workload")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--before", type=Path, default=None, help="a folder holding a package kprodigy_before")
    parser.add_argument("--no-settings", action="store_true", help="skip the table of settings against prodigyopt")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.before:
        sys.path.insert(0, str(args.before))
        import kprodigy_before  # type: ignore[import-not-found]

        BEFORE.append(kprodigy_before.KProdigy)
    names = ["MLP 769", "CNN ~100k", "400 LoRA r8", "300 x 64x64"] + ([] if args.quick else ["4 x 4096x2048"])
    lines = [
        f"{C.code_version()}; {C.machine_description()}; median ms per step, {args.rounds} rounds"
        " (a third of them, 2 steps each, on 4 x 4096x2048); first step in seconds",
        "",
        "| workload | kprodigy ms | fused=True ms | before ms | prodigyopt ms | fused AdamW ms | prodigyopt / kprodigy"
        " | kprodigy / AdamW | functional.step / kprodigy | functional.step_ / kprodigy"
        " | first step kprodigy s | first step fused=True s | skipped |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        big = name.startswith("4 x")
        res = bench(name, max(3, args.rounds // 3) if big else args.rounds, 2 if big else 20)
        k, f, a = res["kprodigy"], res["kprodigy-fused"], res["adamw-fused"]
        p, b = res.get("prodigyopt", float("nan")), res.get("kprodigy-before", float("nan"))
        pure, inplace = res["functional-step"] / k, res["functional-step_"] / k
        lines.append(
            f"| {name} | {k:.3f} | {f:.3f} | {b:.3f} | {p:.3f} | {a:.3f} | {p / k:.2f}x | {k / a:.2f}x"
            f" | {pure:.2f}x | {inplace:.2f}x"
            f" | {res['first kprodigy']:.2f} | {res['first kprodigy-fused']:.2f} | {int(res['skipped'])} |"
        )
        print(lines[-1], flush=True)
    if not args.no_settings:
        lines += ["", "Settings: each against prodigyopt with the same setting (ours: against its defaults)", ""]
        lines += settings_table(["MLP 769", "CNN ~100k", "300 x 64x64"], args.rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "small_models.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'small_models.md'}")


if __name__ == "__main__":
    main()
