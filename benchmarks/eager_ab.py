# ruff: noqa: E402
"""A/B of the eager kernels: old _foreach/_single (copies at OLD_DIR) vs the current ones, and
prodigyopt, in one process, interleaved, medians. 4 x 1024x1024 fp32, 1 thread.
Usage: OLD_DIR=<dir with _foreach_old.py, _single_old.py> python benchmarks/eager_ab.py [rounds]
The old modules must have the kernel contract of the current ones (``_single.py``: statistics,
update, update_moments, update_params); the A/B of the earlier accumulate/apply kernels ran
with that contract's names (NOTES.md, changes 2 and 3).
"""

import importlib.util
import os
import statistics
import sys
import time

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import prodigyopt

import kprodigy
from kprodigy.functional import _foreach as F
from kprodigy.functional import _single as S

OLD = os.environ.get("OLD_DIR", "/tmp/pp")


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    m = importlib.util.module_from_spec(spec)
    m.__package__ = "kprodigy.functional"
    spec.loader.exec_module(m)
    return m


oldF = load("kprodigy.functional._foreach_old", os.path.join(OLD, "_foreach_old.py"))
oldS = load("kprodigy.functional._single_old", os.path.join(OLD, "_single_old.py"))
NAMES = ("statistics", "update", "update_moments", "update_params")  # the kernel contract
newF = {n: getattr(F, n) for n in NAMES}
newS = {n: getattr(S, n) for n in NAMES}


def setk(fm, sm):
    for n in NAMES:
        setattr(F, n, fm[n])
        setattr(S, n, sm[n])


OLD = ({n: getattr(oldF, n) for n in NAMES}, {n: getattr(oldS, n) for n in NAMES})
NEW = (newF, newS)


def mk(opt_fn):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(1024, 1024)) for _ in range(4)]
    for p in ps:
        p.grad = torch.randn_like(p) * 1e-2
    return ps, opt_fn(ps)


cfgs = {"prodigy": (None, lambda ps: prodigyopt.Prodigy(ps, lr=1.0))}
cfgs["new_default"] = (NEW, lambda ps: kprodigy.KProdigy(ps, lr=1.0))
for tag, k in (("old", OLD), ("new", NEW)):
    cfgs[f"{tag}_foreach"] = (k, lambda ps: kprodigy.KProdigy(ps, lr=1.0, foreach=True))
    cfgs[f"{tag}_single"] = (k, lambda ps: kprodigy.KProdigy(ps, lr=1.0, foreach=False))
    cfgs[f"{tag}_foreach_noskip"] = (k, lambda ps: kprodigy.KProdigy(ps, lr=1.0, foreach=True, skip_nonfinite=False))
    cfgs[f"{tag}_single_noskip"] = (k, lambda ps: kprodigy.KProdigy(ps, lr=1.0, foreach=False, skip_nonfinite=False))
objs = {k: (kk, mk(f)) for k, (kk, f) in cfgs.items()}


def run(k):
    kk, (ps, o) = objs[k]
    if kk:
        setk(*kk)
    t = time.perf_counter()
    o.step()
    return time.perf_counter() - t


for k in objs:
    run(k)
    run(k)
times = {k: [] for k in objs}
R = int(sys.argv[1]) if len(sys.argv) > 1 else 7
for _r in range(R):
    for k in objs:
        times[k].append(run(k))
base = statistics.median(times["prodigy"])
for k, v in times.items():
    m = statistics.median(v)
    print(f"{k:22s} {m * 1e3:7.2f} ms  ratio/prodigyopt {m / base:5.2f}")
