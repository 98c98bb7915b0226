"""Same-process interleaved A/B of the eager and compiled paths: another tree's ``kprodigy``
against this one's, medians of shuffled rounds, 1 thread (separate processes on a shared machine
read 15-90% apart between identical runs).

Usage (the other tree's package copied under another name, e.g. main's)::

    git -C <repo> archive <commit> kprodigy | tar -x -C /tmp/ab && mv /tmp/ab/kprodigy /tmp/ab/kprodigy_base
    BASE_DIR=/tmp/ab PYTHONPATH=$PWD python benchmarks/core_ab.py "300 small" 30 [eager,foreach,...]
"""

import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.environ.get("BASE_DIR", "/tmp/ab"))
import kprodigy_base  # noqa: E402

import kprodigy  # noqa: E402


def _gpt(vocab: int, d: int, layers: int) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(vocab, d), (1024, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


WORKLOADS = {"300 small": [(64, 64)] * 300, "GPT-like": _gpt(8192, 512, 8), "4 large": [(4096, 2048)] * 2}
CONFIGS = {
    "default": dict(),
    "eager": dict(fused=False, foreach=False),
    "foreach": dict(fused=False, foreach=True),
    "fused": dict(fused=True),
    "eager_noskip": dict(fused=False, foreach=False, skip_nonfinite=False),
    "foreach_noskip": dict(fused=False, foreach=True, skip_nonfinite=False),
}


def main() -> None:
    torch.set_num_threads(1)
    name, rounds = sys.argv[1], int(sys.argv[2])
    names = sys.argv[3].split(",") if len(sys.argv) > 3 else ["eager", "foreach", "fused"]

    def make(mod, **kw):  # type: ignore[no-untyped-def]
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(*s)) for s in WORKLOADS[name]]
        for p in ps:
            p.grad = torch.randn_like(p) * 1e-2
        return mod.KProdigy(ps, **kw)

    opts = {(v, c): make(mod, **CONFIGS[c]) for c in names for v, mod in (("base", kprodigy_base), ("new", kprodigy))}
    for o in opts.values():  # compile and warm up
        o.step()
        o.step()
    times: dict[tuple[str, str], list[float]] = {k: [] for k in opts}
    for _ in range(rounds):
        keys = list(opts)
        random.shuffle(keys)
        for k in keys:
            t = time.perf_counter()
            opts[k].step()
            times[k].append(time.perf_counter() - t)
    for c in names:
        b, n = statistics.median(times[("base", c)]), statistics.median(times[("new", c)])
        print(f"{name:10s} {c:15s} base {b * 1e3:8.2f} ms  new {n * 1e3:8.2f} ms  new/base {n / b:.3f}")


if __name__ == "__main__":
    main()
