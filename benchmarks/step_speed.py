"""Step time of K-Prodigy (each path) against peers, in one process, interleaved.

Usage (from the repository root)::

    PYTHONPATH=$PWD nice python benchmarks/step_speed.py                 # full sizes, CPU
    PYTHONPATH=$PWD python benchmarks/step_speed.py --size tiny --rounds 2 --out /tmp/bench

For each workload (300 small tensors; a GPT-like stack of ~30M params; 4 tensors of 4096x2048)
every optimizer gets its own copy of the params with a fixed gradient. The first step of each is
timed alone ("first step": compilation for the fused path). Then ``--rounds`` rounds run every
optimizer ``--steps`` steps each, in a shuffled order, and the per-step median over all rounds
is reported, with the speed-up over ``prodigyopt.Prodigy`` and the fraction of the memory floor
(13 words per parameter for Prodigy, 7 for AdamW) at the measured copy bandwidth. "Peak extra"
is the growth of the process's peak resident memory during one step (CPU) or of
``torch.cuda.max_memory_allocated`` (CUDA), beyond the params, grads and state.

A peer that is not installed is skipped with a note. Writes ``step_speed_<device>.md`` and
``step_speed_<device>.png`` into a fresh ``benchmarks/out/<timestamp>/`` (or ``--out``); the
committed ``benchmarks/results/`` only with ``--update-results``.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import random
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _output  # noqa: E402

Factory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]
WORDS = {"prodigy": 13, "adamw": 7}


def workloads(size: str) -> dict[str, list[tuple[int, ...]]]:
    """Name -> parameter shapes."""
    if size == "tiny":
        return {
            "300 small": [(8, 8)] * 30,
            "GPT-like": _gpt(vocab=256, d=32, layers=2),
            "4 large": [(256, 128)] * 4,
        }
    return {
        "300 small": [(64, 64)] * 300,
        "GPT-like": _gpt(vocab=8192, d=512, layers=8),
        "4 large": [(4096, 2048)] * 4,
    }


def _gpt(vocab: int, d: int, layers: int) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(vocab, d), (1024, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


def optimizers(device: torch.device) -> tuple[dict[str, tuple[Factory, str]], list[str]]:
    """Name -> (factory, word class); and notes on skipped peers."""
    from kprodigy.optim import KProdigy

    opts: dict[str, tuple[Factory, str]] = {
        "kprodigy default": (lambda ps: KProdigy(ps), "prodigy"),
        "kprodigy no skip": (lambda ps: KProdigy(ps, skip_nonfinite=False), "prodigy"),
        "kprodigy eager": (lambda ps: KProdigy(ps, fused=False), "prodigy"),
        "kprodigy foreach": (lambda ps: KProdigy(ps, fused=False, foreach=True), "prodigy"),
        "kprodigy fused": (lambda ps: KProdigy(ps, fused=True), "prodigy"),
    }
    if device.type == "cuda":
        opts["kprodigy fused graph"] = (lambda ps: GraphedStep(KProdigy(ps, fused=True, capturable=True)), "prodigy")
    notes: list[str] = []
    for name, module, attr in (
        ("prodigyopt", "prodigyopt", "Prodigy"),
        ("pytorch_optimizer", "pytorch_optimizer", "Prodigy"),
        ("prodigyplus SF", "prodigyplus", "ProdigyPlusScheduleFree"),
    ):
        try:
            cls = getattr(importlib.import_module(module), attr)
        except Exception as exc:  # noqa: BLE001 - any import failure: skip the peer
            notes.append(f"{name} skipped: {type(exc).__name__}: {exc}")
            continue
        opts[name] = ((lambda c: lambda ps: c(ps, lr=1.0))(cls), "prodigy")
    opts["AdamW foreach"] = (lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True), "adamw")
    opts["AdamW fused"] = (lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), "adamw")
    return opts, notes


class GraphedStep:
    """``opt.step()`` captured once in a CUDA graph, then replayed by ``step()`` (CUDA only).

    Warm-up steps on a side stream first (compilation, state creation), as CUDA graphs need;
    they and the capture happen at construction, outside the timed "first step".
    """

    def __init__(self, opt: torch.optim.Optimizer, warmup: int = 3) -> None:
        self.opt = opt
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                opt.step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            opt.step()

    def step(self) -> None:
        self.graph.replay()


def copy_bandwidth(device: torch.device, numel: int, reps: int = 7) -> float:
    """Attainable bandwidth in bytes/s: median of ``dst.copy_(src)`` (one read + one write)."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * src.element_size() * numel / statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_kib() -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+)", text)
    return int(match.group(1)) if match else 0


def _rss_kib() -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+)", text)
    return int(match.group(1)) if match else 0


def peak_extra_bytes(opt: torch.optim.Optimizer, device: torch.device) -> int | None:
    """Bytes allocated beyond what exists before the step, at the step's peak."""
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        opt.step()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    except OSError:
        return None
    base = _rss_kib()
    opt.step()
    return max(0, _peak_kib() - base) * 1024


def run_workload(
    shapes: list[tuple[int, ...]],
    opts: dict[str, tuple[Factory, str]],
    device: torch.device,
    rounds: int,
    steps: int,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """Per optimizer: first-step seconds, per-step median ms, peak extra bytes."""
    gen = torch.Generator().manual_seed(seed)
    base = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
    built: dict[str, torch.optim.Optimizer] = {}
    out: dict[str, dict[str, Any]] = {}
    for name, (factory, _) in opts.items():
        params = [torch.nn.Parameter(b.clone().to(device)) for b in base]
        for p, g in zip(params, grads):
            p.grad = g.to(device)
        opt = factory(params)
        if hasattr(opt, "train"):
            opt.train()  # schedule-free optimizers need train mode
        _sync(device)
        t = time.perf_counter()
        opt.step()
        _sync(device)
        out[name] = {"first_s": time.perf_counter() - t, "times": []}
        opt.step()  # second step: any recompilation on changed D happens here
        built[name] = opt
    for name, opt in built.items():
        out[name]["peak_extra"] = peak_extra_bytes(opt, device)
    order = list(built)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            opt = built[name]
            for _ in range(steps):
                _sync(device)
                t = time.perf_counter()
                opt.step()
                _sync(device)
                out[name]["times"].append(time.perf_counter() - t)
    for rec in out.values():
        rec["ms"] = 1e3 * statistics.median(rec["times"])
    return out


def table(results: dict[str, dict[str, dict[str, Any]]], sizes: dict[str, int], bw: float, opts: dict) -> str:
    lines = []
    for wl, res in results.items():
        n = sizes[wl]
        ref = res.get("prodigyopt", {}).get("ms")
        lines += [
            f"### {wl} ({n / 1e6:.2f}M params)",
            "",
            "| optimizer | ms/step | speed-up vs prodigyopt | floor fraction | first step (s) | peak extra (MiB) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, rec in res.items():
            words = WORDS[opts[name][1]]
            floor_ms = 1e3 * words * 4 * n / bw
            speed = f"{ref / rec['ms']:.2f}x" if ref else "n/a"
            peak = "n/a" if rec["peak_extra"] is None else f"{rec['peak_extra'] / 2**20:.1f}"
            lines.append(
                f"| {name} | {rec['ms']:.2f} | {speed} | {floor_ms / rec['ms']:.2f} ({words} words) "
                f"| {rec['first_s']:.2f} | {peak} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, dict[str, Any]]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (wl, res) in zip(axes[0], results.items()):
        names = list(res)
        ax.barh(names, [res[n]["ms"] for n in names])
        ax.set_title(wl)
        ax.set_xlabel("ms / step (median)")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def replot(md: Path) -> bool:
    """Redraw the plot of a results table (``--replot``), from its markdown alone."""
    results: dict[str, dict[str, dict[str, Any]]] = {}
    current: dict[str, dict[str, Any]] = {}
    for line in md.read_text().splitlines():
        if line.startswith("### "):
            current = results.setdefault(line[4:].split(" (")[0], {})
        elif line.startswith("| ") and not line.startswith("| optimizer"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            current[cells[0]] = {"ms": float(cells[1])}
    return plot(results, md.with_suffix(".png"))


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("tiny", "full"), default="full")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="steps per optimizer per round")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--only", default="", help="comma-separated workload names to run")
    ap.add_argument("--opts", default="", help="comma-separated optimizer names to run (default: all)")
    _output.add_arguments(ap)
    ap.add_argument("--replot", default="", help="only redraw the plot of this results .md file")
    args = ap.parse_args(argv)
    if args.replot:
        replot(Path(args.replot))
        return Path(args.replot)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    opts, notes = optimizers(device)
    if args.opts:
        opts = {k: v for k, v in opts.items() if k in args.opts.split(",")}
    wls = workloads(args.size)
    if args.only:
        wls = {k: v for k, v in wls.items() if k in args.only.split(",")}
    sizes = {wl: sum(torch.Size(s).numel() for s in shapes) for wl, shapes in wls.items()}
    bw = copy_bandwidth(device, 1 << 20 if args.size == "tiny" else 1 << 26)
    results = {}
    for i, (wl, shapes) in enumerate(wls.items()):
        print(f"workload {wl}: {len(shapes)} tensors, {sizes[wl]} params", file=sys.stderr)
        results[wl] = run_workload(shapes, opts, device, args.rounds, args.steps, seed=i)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()}-thread CPU"
    header = [
        f"# Step time, {machine}, torch {torch.__version__}, Python {platform.python_version()}",
        "",
        f"Command: `python benchmarks/step_speed.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
        f"median of {args.rounds} interleaved rounds x {args.steps} steps. Copy bandwidth {bw / 1e9:.2f} GB/s "
        "(floor fraction = words x 4 B x params / bandwidth / measured time).",
        "",
        *[f"- {n}" for n in notes],
        "",
    ]
    text = "\n".join(header) + table(results, sizes, bw, opts)
    out = _output.output_dir(args.out or None, args.update_results)
    assert out is not None
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"step_speed_{device.type}.md"
    md.write_text(text)
    plot(results, out / f"step_speed_{device.type}.png")
    print(text)
    print(f"written: {md}", file=sys.stderr)
    return md


if __name__ == "__main__":
    main()
