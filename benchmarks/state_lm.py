"""bfloat16 params on a small LM: the default state (bfloat16) against float32 state (issue 22).

Run: ``PYTHONPATH=. nice python benchmarks/state_lm.py`` (CPU, 1 thread, about 10 minutes).
``lm_task.py``'s byte-level TinyGPT (0.13M params) on its fortunes text, cast to bfloat16, trained
``--steps`` steps (default 1000, the study's 1x budget) with the warm-up + cosine schedule and
K-Prodigy's defaults but ``d0=1e-4`` (bfloat16 weights lose steps of 1e-6), for each state: float32 state, "auto" (bfloat16 with stochastic rounding),
"int8" with ``slice_p=11``, and prodigyopt (its state in the param dtype). Reports the final test
and validation loss (nats per byte), mean over ``--seeds`` seeds, the ratio to float32 state and
the final D. With ``--out``/``--update-results`` it writes ``state_lm.md``/``.json``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _output  # noqa: E402
import lm_task as L  # noqa: E402

torch.set_num_threads(1)

D0 = 1e-4  # bfloat16 weights of ~0.02 lose steps of d0 = 1e-6 (KProdigyWarning's advice: a larger d0)

CONFIGS = [
    ("float32 state", "kprodigy", {"state_precision": "float32"}),
    ("auto (bfloat16)", "kprodigy", {}),
    ("int8, slice_p=11", "kprodigy", {"state_precision": "int8", "slice_p": 11}),
    ("prodigyopt", "prodigyopt", {}),
]


def train(c: L.Corpus, kind: str, kwargs: dict, seed: int, steps: int) -> dict[str, float]:
    cfg = L.LMConfig()
    torch.manual_seed(seed)
    model = L.TinyGPT(cfg).bfloat16()
    if kind == "prodigyopt":
        import prodigyopt

        opt: torch.optim.Optimizer = prodigyopt.Prodigy(model.parameters(), lr=1.0, d0=D0)
    else:
        from kprodigy import KProdigy

        opt = KProdigy(model.parameters(), d0=D0, **kwargs)
    gen = torch.Generator().manual_seed(1_000 + seed)
    t0 = time.perf_counter()
    for t in range(steps):
        for g in opt.param_groups:
            g["lr"] = L.lr_multiplier(t, steps, "cosine")
        xb, yb = L.batch(c.train, cfg, gen)
        loss = L.lm_loss(model, xb, yb).float()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not math.isfinite(loss.item()):
            break
    return {"val": L.evaluate(model, c.val), "test": L.evaluate(model, c.test), "d": float(opt.param_groups[0]["d"]),
            "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=L.BUDGET)
    parser.add_argument("--seeds", type=int, default=3)
    _output.add_arguments(parser)
    args = parser.parse_args(argv)
    c = L.corpus()
    seeds = list(range(args.seeds))
    results: dict = {}
    rows = []
    base = None
    for label, kind, kw in CONFIGS:
        runs = [train(c, kind, kw, s, args.steps) for s in seeds]
        results[label] = runs
        test = statistics.mean(r["test"] for r in runs)
        val = statistics.mean(r["val"] for r in runs)
        d = statistics.mean(r["d"] for r in runs)
        base = base or (test, val, d)
        rows.append(
            f"| {label} | {test:.4f} ({test / base[0]:.3f}) | {val:.4f} ({val / base[1]:.3f}) | {d:.3g} ({d / base[2]:.3f}) |"
        )
        print(rows[-1], [round(r["test"], 4) for r in runs], flush=True)
    text = "\n".join(
        [
            "# bfloat16 TinyGPT: final loss by optimizer state",
            "",
            f"{c.note}; {args.steps} steps, warm-up + cosine, d0={D0}, seeds {seeds}, bfloat16 params; "
            f"torch {torch.__version__}, 1 thread. Mean over seeds (ratio to float32 state).",
            "",
            "| state | test loss (nats/byte) | validation loss | final D |",
            "|---|---:|---:|---:|",
            *rows,
        ]
    )
    _output.write_report(_output.output_dir(args.out, args.update_results), "state_lm", text, results)


if __name__ == "__main__":
    main()
