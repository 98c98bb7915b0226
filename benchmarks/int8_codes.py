"""Which int8 code map for ``state_precision="int8"`` (issue 22): log maps vs linear, measured.

Run: ``PYTHONPATH=. nice python benchmarks/int8_codes.py`` (CPU, 1 thread, a few minutes).

1. The moments of a real run: fmnist-mlp (``convergence_tasks``) trained with float32 state; m
   and v of its weights (>= 4096 elements) taken at steps 50 and 400. Each candidate map encodes
   and decodes them (stochastic rounding, blocks of 256 as shipped); reported: the relative
   error of m, of v, and of the Adam direction m / sqrt(v) that the step applies.
2. The same task trained with each map (m map x v map) for 400 steps, 2 seeds: final training
   loss relative to float32 state.

Candidates (``_formats.Int8Codec``): m signed with 127 levels per sign, log (8 levels per octave,
down to 2^-15.9 of the block's largest) or linear (steps of 1/127); v as sqrt(v) with 256 levels,
log (16 per octave, down to 2^-16 of the largest sqrt(v), i.e. 2^-32 of v) or linear (1/255).
Prints a markdown table; with ``--out``/``--update-results`` also writes it (``_output``).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _output  # noqa: E402
import convergence as C  # noqa: E402

from kprodigy.functional import _formats  # noqa: E402
from kprodigy.functional._formats import BLOCK, Int8Codec  # noqa: E402

torch.set_num_threads(1)

M_MAPS = {
    "log8": Int8Codec(signed=True, log=True, per_octave=8.0, sr=True),
    "linear": Int8Codec(signed=True, log=False, per_octave=8.0, sr=True),
}
V_MAPS = {
    "sqrt-log16": Int8Codec(signed=False, log=True, per_octave=16.0, sr=True),
    "sqrt-linear": Int8Codec(signed=False, log=False, per_octave=16.0, sr=True),
}


def roundtrip(codec: Int8Codec, x: torch.Tensor) -> torch.Tensor:
    """decode(encode(x)) in blocks of ``BLOCK`` (x padded with zeros to whole blocks)."""
    n = x.numel()
    blocks = -(-n // BLOCK)
    full = torch.zeros(blocks * BLOCK)
    full[:n] = x.reshape(-1).float()
    codes = torch.zeros(blocks, BLOCK, dtype=torch.uint8)
    scales = torch.zeros(blocks)
    codec.encode(full.view(blocks, BLOCK), codes, scales)
    return codec.decode(codes, scales).reshape(-1)[:n]


def snapshots(steps: tuple[int, ...] = (50, 400)) -> list[tuple[int, torch.Tensor, torch.Tensor, float]]:
    """(step, m, v, d) of every weight of >= 4096 elements, from a float32-state run of fmnist-mlp."""
    task = C.build_tasks()["fmnist-mlp"]
    data = task.build_data(1.0)
    out: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []
    cfg = C.OptConfig("kprodigy", "kprodigy", kwargs={"state_precision": "float32"})
    opt_box: list[torch.optim.Optimizer] = []
    seen = [0]

    def on_step() -> None:
        seen[0] += 1
        if seen[0] in steps:
            opt = opt_box[0]
            d = float(opt.param_groups[0]["d"])
            for st in opt.state.values():
                if st["exp_avg"].numel() >= _formats.INT8_MIN:
                    out.append((seen[0], st["exp_avg"].clone(), st["exp_avg_sq"].clone(), d))

    make = C.make_optimizer

    def keep(cfg: C.OptConfig, groups: list[dict]) -> torch.optim.Optimizer:
        opt_box.append(make(cfg, groups))
        return opt_box[-1]

    C.make_optimizer = keep
    try:
        C.train_run(task, data, cfg, 0, max(steps), on_step=on_step)
    finally:
        C.make_optimizer = make
    return out


def errors(snaps: list, m_map: str, v_map: str) -> dict[str, float]:
    """Relative errors (norm of the error / norm of the value, over all snapshots)."""
    torch.manual_seed(0)
    sums = {"m": [0.0, 0.0], "v": [0.0, 0.0], "direction": [0.0, 0.0]}
    for _, m, v, d in snaps:
        mq, vq = roundtrip(M_MAPS[m_map], m), roundtrip(V_MAPS[v_map], v)
        u = m.reshape(-1) / (v.reshape(-1).sqrt() + d * 1e-8)
        uq = mq / (vq.sqrt() + d * 1e-8)
        for key, a, b in (("m", mq, m.reshape(-1)), ("v", vq, v.reshape(-1)), ("direction", uq, u)):
            sums[key][0] += float((a - b).square().sum())
            sums[key][1] += float(b.square().sum())
    return {k: (num / den) ** 0.5 for k, (num, den) in sums.items()}


def final_loss(m_map: str, v_map: str | None, seed: int) -> float:
    """fmnist-mlp's final training loss with int8 state under these maps (None: float32 state)."""
    task = C.build_tasks()["fmnist-mlp"]
    data = task.build_data(1.0)
    kw = {"state_precision": "float32"} if v_map is None else {"state_precision": "int8"}
    saved = (_formats.M_CODEC, _formats.V_CODEC)
    if v_map is not None:
        _formats.M_CODEC, _formats.V_CODEC = M_MAPS[m_map], V_MAPS[v_map]
    try:
        return float(C.train_run(task, data, C.OptConfig("k", "kprodigy", kwargs=copy.deepcopy(kw)), seed, task.steps)["train_loss"])
    finally:
        _formats.M_CODEC, _formats.V_CODEC = saved


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    _output.add_arguments(parser)
    args = parser.parse_args(argv)
    snaps = snapshots()
    base = [final_loss("", None, s) for s in range(args.seeds)]
    rows = []
    results = {"float32_loss": base, "maps": {}}
    for m_map in M_MAPS:
        for v_map in V_MAPS:
            err = errors(snaps, m_map, v_map)
            losses = [final_loss(m_map, v_map, s) for s in range(args.seeds)]
            ratio = sum(a / b for a, b in zip(losses, base)) / len(base)
            results["maps"][f"{m_map}/{v_map}"] = {**err, "losses": losses, "loss_ratio": ratio}
            rows.append(f"| {m_map} | {v_map} | {err['m']:.3g} | {err['v']:.3g} | {err['direction']:.3g} | {ratio:.3f} |")
    text = "\n".join(
        [
            "# int8 code maps (fmnist-mlp, blocks of 256, stochastic rounding)",
            "",
            f"{len(snaps)} moment snapshots (steps 50 and 400); final loss over {args.seeds} seeds, "
            f"float32 state {sum(base) / len(base):.4g}. Torch {torch.__version__}, 1 thread.",
            "",
            "| m map | v map | m rel. error | v rel. error | m/sqrt(v) rel. error | final loss / float32 state |",
            "|---|---|---:|---:|---:|---:|",
            *rows,
        ]
    )
    out = _output.output_dir(args.out, args.update_results)
    _output.write_report(out, "int8_codes", text, results)


if __name__ == "__main__":
    main()
