"""A byte-level transformer LM on real text: untuned K-Prodigy presets against tuned AdamW.

A small GPT-style model on English text, K-Prodigy's presets untuned against AdamW tuned over a
learning-rate sweep:

    python benchmarks/lm_task.py                    # the study: 58 min on the shared 2-core CPU
    python benchmarks/lm_task.py --quick            # smoke test (seconds): its numbers are not results
    python benchmarks/lm_task.py --update-results   # write benchmarks/results/presets/lm_task.{md,json}

Text: the English fortune-cookie files of Debian's ``fortunes`` package (``apt-get install
fortunes``; about 2.6 MB of quotations, poems, definitions and jokes under
``/usr/share/games/fortunes``), read from disk, never downloaded. ``--text FILE`` (or the
environment variable ``KPRODIGY_LM_TEXT``) takes any other UTF-8 text file instead. The bytes are
cut into 4 KiB blocks; every 20th block goes to validation, the next one to test, the rest to
training, so the three splits come from every file.

Model: a GPT-style decoder (pre-LayerNorm, causal self-attention, GELU MLP, learned positions,
tied input/output embedding), byte vocabulary 256; by default 2 layers, d_model 64, 4 heads,
context 64, batch 16 (about 0.13M parameters). Loss: cross-entropy in nats per byte.

Optimizers, no weight decay for any of them:
- AdamW (betas 0.9, 0.999) with a linear warm-up over 5% of the steps then cosine to 0 (what users
  do), its lr chosen per budget from ``ADAMW_GRID`` by the validation loss of seed 0, then run with
  every seed at that lr;
- K-Prodigy, untuned (``lr=1``): the defaults, ``use_bias_correction=True``,
  ``safeguard_warmup=True`` and both, each with a constant lr and with the same warm-up + cosine.
Budgets are separate runs of 0.1x, 0.3x and 1x ``BUDGET`` steps (the schedule spans the run);
with a constant lr a run is a prefix of the longer one, so one run is evaluated at every budget.
Reported: test loss (a split used for nothing else) and validation loss, mean ± sd over seeds.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _output  # noqa: E402
import convergence as C  # noqa: E402

FORTUNES_DIR = "/usr/share/games/fortunes"
TEXT_ENV = "KPRODIGY_LM_TEXT"
BUDGET = 1000  # steps of the 1x budget
FRACTIONS = (0.1, 0.3, 1.0)
ADAMW_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
WARMUP = 0.05  # warm-up fraction of the warm-up + cosine schedule
BLOCK = 4096  # bytes per block of the train/validation/test assignment
PRESETS: dict[str, dict[str, bool]] = {
    "defaults": {},
    "bias_correction": {"use_bias_correction": True},
    "safeguard_warmup": {"safeguard_warmup": True},
    "bc+safeguard": {"use_bias_correction": True, "safeguard_warmup": True},
}


# ------------------------------------------------------------------------ text
def fortunes_files(root: str = FORTUNES_DIR) -> list[Path]:
    """The fortune text files of Debian's ``fortunes`` package (not the ``.dat`` indexes, not the
    ``.u8`` links to the same files), sorted by name."""
    d = Path(root)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8"))


def load_text(path: str | None = None) -> tuple[bytes, str]:
    """The corpus as bytes and a sentence saying where it came from.

    ``path`` (or ``$KPRODIGY_LM_TEXT``) names a text file; otherwise Debian's ``fortunes``.
    """
    path = path or os.environ.get(TEXT_ENV) or None
    if path:
        if not os.path.isfile(path):
            raise SystemExit(f"text file {path!r} not found")
        data = Path(path).read_bytes()
        return data, f"{path} ({len(data)} bytes)"
    files = fortunes_files()
    if not files:
        raise SystemExit(
            f"no text corpus: the LM task reads the English fortune files of Debian's 'fortunes' package "
            f"under {FORTUNES_DIR}. Install them with `apt-get install fortunes` (as root), or give any "
            f"UTF-8 text file with --text FILE or ${TEXT_ENV}=FILE.")
    data = b"".join(f.read_bytes() for f in files)
    return data, (f"Debian package 'fortunes' ({len(files)} files under {FORTUNES_DIR}, {len(data)} bytes)")


@dataclass
class Corpus:
    """Byte tokens of the three splits (int64 1-D tensors) and where they came from."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    note: str


def split_corpus(data: bytes, note: str = "", block: int = BLOCK) -> Corpus:
    """Blocks of ``block`` bytes: block i goes to validation if i % 20 == 10, to test if
    i % 20 == 11, else to training."""
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)
    blocks = list(torch.split(t, block))
    parts: dict[int, list[torch.Tensor]] = {0: [], 1: [], 2: []}
    for i, b in enumerate(blocks):
        parts[{10: 1, 11: 2}.get(i % 20, 0)].append(b)
    if not parts[1] or not parts[2]:
        raise SystemExit(f"text too short ({len(data)} bytes): need at least {12 * block} bytes")
    return Corpus(*(torch.cat(parts[k]) for k in (0, 1, 2)), note=note)


def corpus(path: str | None = None, max_bytes: int | None = None) -> Corpus:
    """Load and split the text; ``max_bytes`` keeps a prefix (smoke runs)."""
    data, note = load_text(path)
    if max_bytes is not None and len(data) > max_bytes:
        data, note = data[:max_bytes], note + f", first {max_bytes} bytes"
    return split_corpus(data, note)


# ----------------------------------------------------------------------- model
@dataclass(frozen=True)
class LMConfig:
    vocab: int = 256
    d_model: int = 64
    n_layer: int = 2
    n_head: int = 4
    context: int = 64
    batch: int = 16


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then a 4x GELU MLP."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(),
                                 nn.Linear(4 * cfg.d_model, cfg.d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_head, c // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A GPT-style byte-level language model (tied embeddings)."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Parameter(torch.zeros(cfg.context, cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln = nn.LayerNorm(cfg.d_model)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.ln(x) @ self.tok.weight.t()


def lm_loss(model: TinyGPT, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    logits = model(xb)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1))


def batch(tokens: torch.Tensor, cfg: LMConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``cfg.batch`` random windows of ``cfg.context`` bytes and their next bytes."""
    starts = torch.randint(0, len(tokens) - cfg.context - 1, (cfg.batch,), generator=gen)
    idx = starts[:, None] + torch.arange(cfg.context + 1)
    w = tokens[idx]
    return w[:, :-1], w[:, 1:]


@torch.no_grad()
def evaluate(model: TinyGPT, tokens: torch.Tensor, n_windows: int = 256, chunk: int = 64) -> float:
    """Mean loss (nats per byte) over ``n_windows`` evenly spaced windows of the split."""
    ctx = model.cfg.context
    starts = torch.linspace(0, len(tokens) - ctx - 1, n_windows).long()
    idx = starts[:, None] + torch.arange(ctx + 1)
    total = 0.0
    for i in range(0, n_windows, chunk):
        w = tokens[idx[i : i + chunk]]
        total += lm_loss(model, w[:, :-1], w[:, 1:]).item() * len(w)
    return total / n_windows


# -------------------------------------------------------------------- training
def lr_multiplier(t: int, steps: int, schedule: str, warmup: float = WARMUP) -> float:
    """The lr factor at step ``t`` of ``steps``: ``constant``, or ``cosine`` after a linear warm-up
    over ``warmup * steps`` steps (``warmup=0``: the convergence suite's plain cosine)."""
    return 1.0 if schedule == "constant" else C.cosine_multiplier(t, steps, warmup)


def make_optimizer(kind: str, params: list[nn.Parameter], lr: float, kwargs: dict) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, **kwargs)
    from kprodigy import KProdigy

    return KProdigy(params, lr=lr, **kwargs)


def train(c: Corpus, kind: str, lr: float, kwargs: dict, seed: int, steps: int, schedule: str,
          warmup: float = WARMUP, eval_at: tuple[int, ...] = (), cfg: LMConfig = LMConfig(),
          eval_windows: int = 256) -> dict[str, Any]:
    """Train one model; evaluate validation and test loss at each step count in ``eval_at`` (and at
    the end). Returns the per-budget losses, final train-batch loss and D."""
    torch.manual_seed(seed)
    model = TinyGPT(cfg)
    opt = make_optimizer(kind, list(model.parameters()), lr, kwargs)
    gen = torch.Generator().manual_seed(1_000 + seed)
    at = sorted(set(eval_at) | {steps})
    evals: dict[int, dict[str, float]] = {}
    recent: list[float] = []
    t0 = time.perf_counter()
    for t in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * lr_multiplier(t, steps, schedule, warmup)
        xb, yb = batch(c.train, cfg, gen)
        loss = lm_loss(model, xb, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        recent = (recent + [loss.item()])[-20:]
        if not math.isfinite(recent[-1]):
            break
        if t + 1 in at:
            evals[t + 1] = {"val": evaluate(model, c.val, eval_windows), "test": evaluate(model, c.test, eval_windows),
                            "train_batch": sum(recent) / len(recent),
                            "d": float(opt.param_groups[0].get("d", math.nan))}
    nan = {"val": math.nan, "test": math.nan, "train_batch": math.nan, "d": math.nan}
    return {"evals": {s: evals.get(s, nan) for s in at}, "seconds": time.perf_counter() - t0,
            "diverged": not all(math.isfinite(evals.get(s, nan)["val"]) for s in at)}


# ----------------------------------------------------------------------- study
def budgets(scale: float = 1.0) -> list[int]:
    return [max(5, int(round(BUDGET * f * scale))) for f in FRACTIONS]


def run_study(c: Corpus, seeds: list[int], scale: float = 1.0, cfg: LMConfig = LMConfig(),
              log: Any = print, eval_windows: int = 256) -> dict[str, Any]:
    """AdamW tuned per budget, the K-Prodigy presets untuned; rows of (optimizer, schedule,
    budget, seed, val, test, d)."""
    bs = budgets(scale)
    rows: list[dict[str, Any]] = []
    tuning: dict[int, dict[str, Any]] = {}
    t0 = time.time()

    def add(name: str, schedule: str, lr: float, seed: int, budget: int, e: dict[str, float], sec: float) -> None:
        rows.append({"optimizer": name, "schedule": schedule, "lr": lr, "seed": seed, "budget": budget,
                     "seconds": sec, **e})

    for b in bs:  # AdamW: the grid with seed 0, scored on validation
        scores = {}
        for lr in ADAMW_GRID:
            r = train(c, "adamw", lr, {}, seeds[0], b, "cosine", cfg=cfg, eval_windows=eval_windows)
            scores[lr] = r["evals"][b]["val"] if not r["diverged"] else math.inf
            add(f"adamw lr={lr:g}", "warmup+cosine", lr, seeds[0], b, r["evals"][b], r["seconds"])
        best = min(ADAMW_GRID, key=lambda lr: scores[lr])
        tuning[b] = {"val_loss": {f"{k:g}": v for k, v in scores.items()}, "best_lr": best,
                     "at_edge": best in (ADAMW_GRID[0], ADAMW_GRID[-1])}
        for s in seeds:
            if s == seeds[0]:
                e = next(r for r in rows if r["optimizer"] == f"adamw lr={best:g}" and r["budget"] == b)
                add("adamw-tuned", "warmup+cosine", best, s, b, {k: e[k] for k in ("val", "test", "train_batch", "d")},
                    e["seconds"])
                continue
            r = train(c, "adamw", best, {}, s, b, "cosine", cfg=cfg, eval_windows=eval_windows)
            add("adamw-tuned", "warmup+cosine", best, s, b, r["evals"][b], r["seconds"])
        log(f"  AdamW, {b} steps: lr {best:g} chosen on validation ({time.time() - t0:.0f} s elapsed)")
    for name, kw in PRESETS.items():
        for s in seeds:  # constant lr: one run, evaluated at every budget
            r = train(c, "kprodigy", 1.0, kw, s, bs[-1], "constant", eval_at=tuple(bs), cfg=cfg,
                      eval_windows=eval_windows)
            for b in bs:
                add(name, "constant", 1.0, s, b, r["evals"][b], r["seconds"] * b / bs[-1])
            for b in bs:
                r = train(c, "kprodigy", 1.0, kw, s, b, "cosine", cfg=cfg, eval_windows=eval_windows)
                add(name, "warmup+cosine", 1.0, s, b, r["evals"][b], r["seconds"])
        log(f"  K-Prodigy {name}: done ({time.time() - t0:.0f} s elapsed)")
    return {"budgets": bs, "adamw_tuning": {str(k): v for k, v in tuning.items()}, "rows": rows}


# --------------------------------------------------------------------- report
def _stats(xs: list[float]) -> tuple[float, float]:
    if not xs or not all(math.isfinite(x) for x in xs):
        return math.nan, math.nan
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def _cell(xs: list[float]) -> str:
    m, sd = _stats(xs)
    if not math.isfinite(m):
        return "nan"
    return f"{m:.4f} ± {sd:.4f}" if len(xs) > 1 else f"{m:.4f}"


def table(study: dict[str, Any], key: str = "test") -> str:
    """Markdown: one row per (optimizer, schedule), one column per budget; the lowest mean bold."""
    bs, rows = study["budgets"], study["rows"]
    keys: list[tuple[str, str]] = []
    for r in rows:
        if not r["optimizer"].startswith("adamw lr=") and (r["optimizer"], r["schedule"]) not in keys:
            keys.append((r["optimizer"], r["schedule"]))
    means = {(o, s, b): _stats([r[key] for r in rows if (r["optimizer"], r["schedule"], r["budget"]) == (o, s, b)])[0]
             for o, s in keys for b in bs}
    lines = ["| optimizer | lr schedule | " + " | ".join(f"{b} steps" for b in bs) + " |",
             "|---|---|" + "---|" * len(bs)]
    for o, s in keys:
        cells = []
        for b in bs:
            cell = _cell([r[key] for r in rows if (r["optimizer"], r["schedule"], r["budget"]) == (o, s, b)])
            col = [means[(o2, s2, b)] for o2, s2 in keys if math.isfinite(means[(o2, s2, b)])]
            cells.append(f"**{cell}**" if col and means[(o, s, b)] == min(col) else cell)
        label = f"KProdigy {o}" if o in PRESETS else ("AdamW, lr tuned per budget" if o == "adamw-tuned" else o)
        lines.append(f"| {label} | {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(results: dict[str, Any]) -> str:
    study = results["study"]
    quick = results.get("quick")
    out = ["# Small transformer LM: K-Prodigy presets against tuned AdamW", "",
           "Generated by `benchmarks/lm_task.py`; do not edit.", ""]
    if quick:
        out += ["**SMOKE TEST (`--quick`)**: a tiny budget and model; these numbers are not results.", ""]
    c = results["config"]
    out += [f"Machine: {results['machine']}. Code: {results['code']}. Wall time: {results['wall_seconds'] / 60:.1f} min.",
            f"Command: `{results['command']}`.", "",
            f"Text: {results['text']}; splits {results['split_bytes']} bytes (train, validation, test).",
            f"Model: byte-level GPT, {c['n_layer']} layers, d_model {c['d_model']}, {c['n_head']} heads, context "
            f"{c['context']}, batch {c['batch']}, {results['n_params']} parameters. Seeds {results['seeds']}.",
            "No weight decay. AdamW: warm-up over 5% of the steps then cosine, lr chosen per budget over "
            f"{list(ADAMW_GRID)} by the validation loss of seed {results['seeds'][0]}. K-Prodigy: `lr=1`, untuned, "
            "constant or the same warm-up + cosine. Loss in nats per byte, mean ± sd over seeds; lowest mean "
            "of each column bold.", "", "## Test loss (held out, used for no choice)", "", table(study, "test"), "",
            "## Validation loss (AdamW's lr was chosen on it)", "", table(study, "val"), "", "## AdamW tuning", "",
            "| budget | " + " | ".join(f"lr {lr:g}" for lr in ADAMW_GRID) + " | chosen |",
            "|---|" + "---|" * (len(ADAMW_GRID) + 1)]
    for b, t in study["adamw_tuning"].items():
        edge = " (grid edge)" if t["at_edge"] else ""
        out.append(f"| {b} | " + " | ".join(f"{t['val_loss'][f'{lr:g}']:.4f}" for lr in ADAMW_GRID)
                   + f" | {t['best_lr']:g}{edge} |")
    out += ["", "## D at the end of each budget (mean over seeds)", "",
            "| preset | lr schedule | " + " | ".join(f"{b} steps" for b in study["budgets"]) + " |",
            "|---|---|" + "---|" * len(study["budgets"])]
    for name in PRESETS:
        for s in ("constant", "warmup+cosine"):
            ds = [_stats([r["d"] for r in study["rows"] if (r["optimizer"], r["schedule"], r["budget"]) == (name, s, b)])[0]
                  for b in study["budgets"]]
            out.append(f"| {name} | {s} | " + " | ".join(f"{d:.3g}" for d in ds) + " |")
    return "\n".join(out) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=float, default=1.0, help=f"multiplier of the budgets (1x = {BUDGET} steps)")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny model, budget and text; not results")
    p.add_argument("--text", default=None, help=f"a UTF-8 text file instead of Debian's fortunes (or ${TEXT_ENV})")
    _output.add_study_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    _output.refuse_smoke_update(args.quick, args.update_results)
    if args.from_json:
        return _output.rerender(args.from_json, args.out, args.update_results, "lm_task", report, "presets")
    torch.set_num_threads(args.threads)
    if args.quick:
        cfg, scale, seeds, windows = LMConfig(d_model=32, n_layer=1, context=32, batch=8), 0.03 * args.steps, [0], 16
        c = corpus(args.text, max_bytes=200_000)
    else:
        cfg, scale, seeds, windows = LMConfig(), args.steps, list(range(args.seeds)), 256
        c = corpus(args.text)
    out = _output.output_dir(args.out, args.update_results, subdir="presets")
    n_params = sum(p.numel() for p in TinyGPT(cfg).parameters())
    print(("SMOKE TEST (--quick): not results\n" if args.quick else "")
          + f"LM task: {c.note}; {n_params} parameters; budgets {budgets(scale)} steps; seeds {seeds}; "
          f"writes to {out or 'nothing'}", flush=True)
    t0 = time.time()
    machine, code = C.machine_description(), C.code_version()
    study = run_study(c, seeds, scale, cfg, eval_windows=windows)
    results = {"machine": machine, "code": code, "quick": bool(args.quick),
               "command": "python benchmarks/lm_task.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "text": c.note, "split_bytes": [len(c.train), len(c.val), len(c.test)],
               "config": cfg.__dict__, "n_params": n_params, "seeds": seeds, "wall_seconds": time.time() - t0,
               "study": study}
    _output.write_report(out, "lm_task", report(results), results)
    return results


if __name__ == "__main__":
    main()
